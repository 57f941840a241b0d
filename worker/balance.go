package worker

import (
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The accept table (docs/worker-protocol.md, "Balance"): a sealed memfd
// the master shares among the workers of its generation, one 64-byte line
// per worker process. Line 0 is the header: a uint32 at offset 0, the
// number of entries in use. Entry i is line i+1: the worker's open
// connections (int64 at 0), its accepts so far (uint64 at 8) and its state
// (uint32 at 16). The master zeroes an entry before it starts a worker in
// it and after that worker exits, and never reads the table; each worker
// writes its own entry and reads the others'. Workers are untrusted: a
// value read from the table only ever makes this worker wait, and never
// longer than balanceBound per connection.
const (
	// EnvAcceptTable is the fd number of the accept table.
	EnvAcceptTable = "MOLT_ACCEPT_TABLE"
	// EnvAcceptEntry is this worker's entry in the accept table.
	EnvAcceptEntry = "MOLT_ACCEPT_ENTRY"
	// EnvAcceptPeerTable is the fd number of the old generation's accept
	// table, read-only, passed to a canary only (docs/worker-protocol.md,
	// "Balance"): the canary accepts no more than the least busy worker
	// of the old generation, so that it meets about its share of new
	// connections.
	EnvAcceptPeerTable = "MOLT_ACCEPT_PEER_TABLE"
	// EnvAcceptBalance set to "off" makes Balance return its listener
	// unchanged: the worker accepts as fast as it can, whatever its
	// siblings hold.
	EnvAcceptBalance = "MOLT_ACCEPT_BALANCE"

	// TableLine is the size of the header and of each entry.
	TableLine = 64
	// TableOffActive, TableOffAccepts and TableOffState are the offsets
	// of an entry's fields.
	TableOffActive  = 0
	TableOffAccepts = 8
	TableOffState   = 16
	// EntryAbsent (zero: no worker, or one not serving yet), EntryAccepting
	// and EntryNotAccepting (draining) are the states of an entry.
	EntryAbsent       = 0
	EntryAccepting    = 1
	EntryNotAccepting = 2
	// MaxTableEntries bounds the table a worker maps.
	MaxTableEntries = 4096
)

// Gating parameters. balanceSlack is how many more connections than its
// least loaded sibling a worker may hold after an accept; balanceStep is
// the wait between looks while over its share (Go's timers round a sleep
// this short up to about a millisecond when the process is idle);
// balanceBound ends the wait: then the worker accepts anyway. A sibling
// that accepted nothing during a whole bound while a connection waited is
// ignored for balanceIgnore: a hung worker costs each sibling one bounded
// wait per period, not one per connection.
const (
	balanceSlack  = 1
	balanceStep   = 250 * time.Microsecond
	balanceBound  = 20 * time.Millisecond
	balanceIgnore = time.Second
	// peerSlack is how many more connections than the least busy
	// accepting worker of the old generation a canary may have accepted
	// since it started.
	peerSlack = 2
)

var (
	balancerOnce sync.Once
	procBalancer *balancer
)

// Balance returns ln wrapped so that this worker does not take more than
// its share of the connections when molt passed an accept table: before
// each accept, while it holds more than balanceSlack connections more than
// the least loaded accepting sibling of its generation and a connection is
// waiting, it leaves the connection to the siblings for a few
// milliseconds at most. Connections it returns count as open until
// closed, hijacked ones included. Without a table (systemd, "molt demo",
// MOLT_ACCEPT_BALANCE=off), or for a listener that is not a
// syscall.Conn, it returns ln itself. ServeHTTP calls it on every
// listener; an app with its own accept loop calls it on the listeners it
// accepts from. Its connections are not *net.TCPConn themselves (they
// count themselves closed): their NetConn method returns the one
// underneath. ServeHTTP's are (it counts them through ConnState). Closing
// the returned listener closes ln; once every balanced listener is
// closed, siblings stop waiting for this worker.
func Balance(ln net.Listener) net.Listener {
	if b := theBalancer(); b != nil {
		return b.wrap(ln, true)
	}
	return ln
}

// theBalancer is this process's balancer, or nil without a table.
func theBalancer() *balancer {
	balancerOnce.Do(func() { procBalancer = openBalancer() })
	return procBalancer
}

// openBalancer maps the accept table passed to this process, or returns
// nil if there is none that it can use safely.
func openBalancer() *balancer {
	if os.Getenv(EnvAcceptBalance) == "off" {
		return nil
	}
	fd, err1 := strconv.Atoi(os.Getenv(EnvAcceptTable))
	self, err2 := strconv.Atoi(os.Getenv(EnvAcceptEntry))
	if err1 != nil || err2 != nil || fd < 0 || self < 0 {
		return nil
	}
	// Only a process the listeners are meant for owns the table: a child
	// of the app that inherited the variables does not.
	if pid, err := strconv.Atoi(os.Getenv(EnvListenPID)); err != nil || pid != os.Getpid() {
		return nil
	}
	defer unix.Close(fd) // the mapping outlives the fd
	peerFD, err := strconv.Atoi(os.Getenv(EnvAcceptPeerTable))
	if err == nil && peerFD >= 0 && peerFD != fd {
		defer unix.Close(peerFD)
	} else {
		peerFD = -1
	}
	mem := mapTable(fd, unix.PROT_READ|unix.PROT_WRITE)
	if mem == nil {
		return nil
	}
	b := newBalancer(mem, self)
	if b == nil {
		_ = unix.Munmap(mem)
		return nil
	}
	if peerFD >= 0 {
		b.peer = openPeer(peerFD)
	}
	return b
}

// mapTable maps the accept table fd with prot, or returns nil if it is
// not one: it must be sealed against shrinking (or whoever else holds it
// could truncate it under the mapping and kill this process with SIGBUS)
// and hold a header and whole lines; at most MaxTableEntries are mapped.
func mapTable(fd, prot int) []byte {
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size < 2*TableLine || st.Size%TableLine != 0 {
		return nil
	}
	size := min(int(st.Size), (MaxTableEntries+1)*TableLine)
	mem, err := unix.Mmap(fd, 0, size, prot, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	return mem
}

// openPeer maps the old generation's table passed to a canary, read-only,
// or returns nil (the canary then balances within its generation only).
func openPeer(fd int) *peerTable {
	mem := mapTable(fd, unix.PROT_READ)
	if mem == nil {
		return nil
	}
	p := newPeerTable(mem)
	if p == nil {
		_ = unix.Munmap(mem)
	}
	return p
}

// peerTable is the old generation's accept table as a canary sees it: it
// only reads it. Its workers are untrusted too: what they write only
// ever makes the canary wait, never longer than balanceBound per
// connection, or lets it accept more (skewed balance, not a stop).
type peerTable struct {
	mem []byte
	cap int
	// base[i] is entry i's accepts when the canary started counting (or
	// when a new worker took the entry: its count fell).
	base         []atomic.Int64
	ignoredUntil []atomic.Int64
}

func newPeerTable(mem []byte) *peerTable {
	n := len(mem)/TableLine - 1
	if n < 1 || uintptr(unsafe.Pointer(&mem[0]))%8 != 0 {
		return nil
	}
	p := &peerTable{mem: mem, cap: n, base: make([]atomic.Int64, n), ignoredUntil: make([]atomic.Int64, n)}
	for i := range n {
		p.base[i].Store(p.accepts(i))
	}
	return p
}

func (p *peerTable) accepts(i int) int64 {
	return atomic.LoadInt64((*int64)(unsafe.Pointer(&p.mem[(i+1)*TableLine+TableOffAccepts])))
}

func (p *peerTable) accepting(i int) bool {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&p.mem[(i+1)*TableLine+TableOffState]))) == EntryAccepting
}

func (p *peerTable) entries() int {
	n := int(atomic.LoadUint32((*uint32)(unsafe.Pointer(&p.mem[0]))))
	return max(0, min(n, p.cap))
}

// since is what entry i accepted since its base; a count that fell (a
// new worker in the entry, or a lie) becomes the new base.
func (p *peerTable) since(i int) int64 {
	acc, base := p.accepts(i), p.base[i].Load()
	if acc < base {
		p.base[i].Store(acc)
		return 0
	}
	return acc - base
}

// least is the fewest connections an accepting, not ignored worker of
// the old generation accepted since the canary started; false if none
// accepts.
func (p *peerTable) least(now int64) (int64, bool) {
	lo, any := int64(0), false
	n := p.entries()
	for i := 0; i < n; i++ {
		if !p.accepting(i) || p.ignoredUntil[i].Load() > now {
			continue
		}
		if d := p.since(i); !any || d < lo {
			lo, any = d, true
		}
	}
	return lo, any
}

// snapshot records the accepts of every accepting entry.
func (p *peerTable) snapshot() map[int]int64 {
	snap := map[int]int64{}
	n := p.entries()
	for i := 0; i < n; i++ {
		if p.accepting(i) {
			snap[i] = p.accepts(i)
		}
	}
	return snap
}

// ignoreStill leaves out, for ignore, every entry behind mine that
// accepted nothing for a whole bound while a connection waited.
func (p *peerTable) ignoreStill(snap map[int]int64, mine int64, now int64, ignore time.Duration) {
	for i, acc := range snap {
		if p.accepts(i) == acc && mine > p.since(i)+peerSlack {
			p.ignoredUntil[i].Store(now + ignore.Nanoseconds())
		}
	}
}

// balancer gates the accepts of this process by the accept table in mem.
type balancer struct {
	mem   []byte // the table: header line, then entries
	cap   int    // entries mem holds
	self  int
	slack int64
	step  time.Duration
	bound time.Duration
	// ignore is how long a sibling seen hung is left out.
	ignore time.Duration
	// ignoredUntil[i] is when entry i counts again (UnixNano), local to
	// this process.
	ignoredUntil []atomic.Int64

	// fewer gets a token when one of this worker's connections closes:
	// a waiting accept looks again at once.
	fewer chan struct{}

	// counted holds the connections accepted unwrapped (ServeHTTP's)
	// until release.
	counted sync.Map

	mu   sync.Mutex
	open int // balanced listeners not yet closed

	// peer is the old generation's table for a canary, else nil; mine
	// counts this worker's accepts since it started, for the comparison.
	peer *peerTable
	mine atomic.Int64
}

// newBalancer gates with the table in mem (8-byte aligned, a whole number
// of lines), this process being entry self; nil if self is not in it.
func newBalancer(mem []byte, self int) *balancer {
	n := len(mem)/TableLine - 1
	if self < 0 || self >= n || uintptr(unsafe.Pointer(&mem[0]))%8 != 0 {
		return nil
	}
	return &balancer{
		mem: mem, cap: n, self: self, slack: balanceSlack,
		step: balanceStep, bound: balanceBound, ignore: balanceIgnore,
		ignoredUntil: make([]atomic.Int64, n),
		fewer:        make(chan struct{}, 1),
	}
}

func (b *balancer) word64(entry, off int) *int64 {
	return (*int64)(unsafe.Pointer(&b.mem[(entry+1)*TableLine+off]))
}

func (b *balancer) state(entry int) *uint32 {
	return (*uint32)(unsafe.Pointer(&b.mem[(entry+1)*TableLine+TableOffState]))
}

// entries is the number of entries in use, as the header says, within
// what is mapped.
func (b *balancer) entries() int {
	n := int(atomic.LoadUint32((*uint32)(unsafe.Pointer(&b.mem[0]))))
	return max(0, min(n, b.cap))
}

// active is entry i's open connections; a negative value (a sibling
// writing nonsense) counts as none.
func (b *balancer) active(i int) int64 {
	return max(0, atomic.LoadInt64(b.word64(i, TableOffActive)))
}

func (b *balancer) accepts(i int) int64 {
	return atomic.LoadInt64(b.word64(i, TableOffAccepts))
}

// over reports whether this worker holds more than slack connections more
// than its least loaded accepting sibling that is not ignored, or, for a
// canary, has accepted more than peerSlack connections more than the least
// busy accepting worker of the old generation since it started.
func (b *balancer) over(now int64) bool {
	if b.peer != nil {
		if lo, ok := b.peer.least(now); ok && b.mine.Load() > lo+peerSlack {
			return true
		}
	}
	mine := b.active(b.self)
	n := b.entries()
	for i := 0; i < n; i++ {
		if i == b.self || atomic.LoadUint32(b.state(i)) != EntryAccepting || b.ignoredUntil[i].Load() > now {
			continue
		}
		if mine > b.active(i)+b.slack {
			return true
		}
	}
	return false
}

// ignoreStill leaves out, for b.ignore, every sibling below this worker's
// share whose accepts are still those of snap: it accepted nothing for a
// whole bound while a connection waited.
func (b *balancer) ignoreStill(snap map[int]int64, now int64) {
	mine := b.active(b.self)
	for i, acc := range snap {
		if b.accepts(i) == acc && mine > b.active(i)+b.slack {
			b.ignoredUntil[i].Store(now + b.ignore.Nanoseconds())
		}
	}
}

// snapshot records the accepts of every accepting sibling.
func (b *balancer) snapshot() map[int]int64 {
	snap := map[int]int64{}
	n := b.entries()
	for i := 0; i < n; i++ {
		if i != b.self && atomic.LoadUint32(b.state(i)) == EntryAccepting {
			snap[i] = b.accepts(i)
		}
	}
	return snap
}

func (b *balancer) opened() {
	b.mine.Add(1)
	atomic.AddInt64(b.word64(b.self, TableOffActive), 1)
	atomic.AddInt64(b.word64(b.self, TableOffAccepts), 1)
}

func (b *balancer) closed() {
	atomic.AddInt64(b.word64(b.self, TableOffActive), -1)
	select {
	case b.fewer <- struct{}{}:
	default:
	}
}

// wrap returns ln gated by b, and marks this worker accepting; with
// wrapConns its connections count themselves closed (track), else they
// stay what ln returns and count until release. It waits
// for connections on a duplicate of ln's descriptor, registered with Go's
// poller as an *os.File: a listener's own RawConn cannot wait for
// readability, and a blocking poll(2) would hold the worker's P.
func (b *balancer) wrap(ln net.Listener, wrapConns bool) net.Listener {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return ln
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return ln
	}
	dup := -1
	if err := rc.Control(func(fd uintptr) {
		// The duplicate shares the socket's file description, and so its
		// (non-blocking) mode; os.NewFile does not change it.
		dup, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil || dup < 0 {
		return ln
	}
	wait := os.NewFile(uintptr(dup), "accept-wait")
	wrc, err := wait.SyscallConn()
	if err != nil {
		_ = wait.Close()
		return ln
	}
	b.mu.Lock()
	b.open++
	atomic.StoreUint32(b.state(b.self), EntryAccepting)
	b.mu.Unlock()
	return &balancedListener{Listener: ln, b: b, wait: wait, wrc: wrc, wrapConns: wrapConns}
}

// listenerClosed marks this worker not accepting once its last balanced
// listener is closed (its drain has begun).
func (b *balancer) listenerClosed() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.open--
	if b.open == 0 {
		atomic.StoreUint32(b.state(b.self), EntryNotAccepting)
	}
}

type balancedListener struct {
	net.Listener
	b         *balancer
	wait      *os.File // a duplicate of the listener's fd, to wait on
	wrc       syscall.RawConn
	wrapConns bool
	closeOnce sync.Once
}

// Accept waits its turn while this worker is over its share, then accepts.
func (l *balancedListener) Accept() (net.Conn, error) {
	for l.b.over(time.Now().UnixNano()) {
		if l.waitTurn() {
			break
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.b.opened()
	if l.wrapConns {
		return l.b.track(c), nil
	}
	l.b.counted.Store(c, struct{}{})
	return c, nil
}

// release counts c, accepted unwrapped, as closed; nil-safe, and a no-op
// for a connection b did not count (or already released).
func (b *balancer) release(c net.Conn) {
	if b == nil {
		return
	}
	// ConnState gets what the server made of the accepted connection: a
	// *tls.Conn over it under ServeTLS.
	for range 4 {
		if _, ok := b.counted.LoadAndDelete(c); ok {
			b.closed()
			return
		}
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return
		}
		c = nc.NetConn()
	}
}

// waitTurn waits until a connection is pending, then for at most b.bound
// while this worker is over its share. It returns true to accept now, and
// false when a sibling took the pending connection meanwhile.
func (l *balancedListener) waitTurn() bool {
	if err := l.wrc.Read(pollIn); err != nil {
		return true // closed: Accept reports it
	}
	b := l.b
	start := time.Now()
	snap := b.snapshot()
	var peerSnap map[int]int64
	if b.peer != nil {
		peerSnap = b.peer.snapshot()
	}
	step := time.NewTimer(b.step)
	defer step.Stop()
	for {
		now := time.Now()
		if !b.over(now.UnixNano()) {
			return true
		}
		if now.Sub(start) >= b.bound {
			b.ignoreStill(snap, now.UnixNano())
			if b.peer != nil {
				b.peer.ignoreStill(peerSnap, b.mine.Load(), now.UnixNano(), b.ignore)
			}
			return true
		}
		// Until this worker closes a connection, or for a step: a sibling
		// catching up is seen at the next look.
		step.Reset(b.step)
		select {
		case <-b.fewer:
		case <-step.C:
		}
		pending := false
		if err := l.wrc.Control(func(fd uintptr) { pending = pollIn(fd) }); err != nil {
			return true
		}
		if !pending {
			return false
		}
	}
}

// pollIn reports whether accept on the listening socket fd would not
// block, without accepting: a connection waits in its queue, or the
// socket no longer listens (a reload dropped it: POLLHUP), which Accept
// then reports.
func pollIn(fd uintptr) bool {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	return err == nil && n > 0 && pfd[0].Revents != 0
}

func (l *balancedListener) Close() error {
	// The listener first: a waitTurn the closed wait file ends then finds
	// Accept failing, not taking one more connection.
	err := l.Listener.Close()
	l.closeOnce.Do(func() {
		_ = l.wait.Close()
		l.b.listenerClosed()
	})
	return err
}

// track returns c counting as open until its first Close. A *net.TCPConn
// stays one underneath (sendfile, CloseWrite and the rest are promoted);
// NetConn returns it, for code that needs the concrete type.
func (b *balancer) track(c net.Conn) net.Conn {
	if tc, ok := c.(*net.TCPConn); ok {
		return &balancedTCPConn{TCPConn: tc, b: b}
	}
	return &balancedConn{Conn: c, b: b}
}

type balancedTCPConn struct {
	*net.TCPConn
	b      *balancer
	closed atomic.Bool
}

// NetConn returns the underlying *net.TCPConn, as tls.Conn.NetConn does.
func (c *balancedTCPConn) NetConn() net.Conn { return c.TCPConn }

func (c *balancedTCPConn) Close() error {
	if !c.closed.Swap(true) {
		c.b.closed()
	}
	return c.TCPConn.Close()
}

type balancedConn struct {
	net.Conn
	b      *balancer
	closed atomic.Bool
}

// NetConn returns the underlying connection.
func (c *balancedConn) NetConn() net.Conn { return c.Conn }

func (c *balancedConn) Close() error {
	if !c.closed.Swap(true) {
		c.b.closed()
	}
	return c.Conn.Close()
}
