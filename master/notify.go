package master

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/master/safefile"
)

// Each worker gets a notify socket of its own, bound before it starts in
// a directory the master creates (0711: others may reach a socket they
// know the name of, not list or create anything), mode 0600 and owned by
// the worker's user: no other user can send to it at all, and its reader
// takes only datagrams from the worker's session (notify.SpeaksFor). A
// flood at one socket fills that socket's queue, not a sibling's, and
// its reader drops it before it reaches the loop.

// openNotifyDir creates the master's private directory of worker
// sockets.
func (m *Master) openNotifyDir() error {
	dir, err := notify.PrivateDir("molt-", 0o711)
	if err != nil {
		return err
	}
	// The longest name a socket here gets ("w" and a counter).
	if len(dir)+len("/w")+len(strconv.Itoa(maxInt)) > notify.MaxPathLen {
		_ = os.Remove(dir)
		return fmt.Errorf("%w: notify socket directory %s: too long for a unix socket path (%d bytes at most); set RUNTIME_DIRECTORY or TMPDIR to a shorter one", ErrConfig, dir, notify.MaxPathLen)
	}
	if c := m.cfg.Credential; c != nil {
		if err := searchable(filepath.Dir(dir), c); err != nil {
			_ = os.Remove(dir)
			return fmt.Errorf("%w: notify socket directory %s: workers run as uid %d cannot reach it: %v; set RUNTIME_DIRECTORY or TMPDIR to a directory they can", ErrConfig, dir, c.Uid, err)
		}
	}
	m.notifyDir = dir
	m.rejected = notify.NewRejected(m.log, dir, notify.RejectedLogEvery)
	m.log.Debug("notify sockets", "dir", dir)
	return nil
}

const maxInt = int(^uint(0) >> 1)

// searchable checks that a process with credential c may search dir and
// every directory above it (the execute bit), as a worker must to reach
// its socket below.
func searchable(dir string, c *syscall.Credential) error {
	for d := dir; ; d = filepath.Dir(d) {
		var st syscall.Stat_t
		if err := syscall.Stat(d, &st); err != nil {
			return err
		}
		bit := uint32(0o001)
		switch {
		case st.Uid == c.Uid:
			bit = 0o100
		case st.Gid == c.Gid || slices.Contains(c.Groups, st.Gid):
			bit = 0o010
		}
		if st.Mode&bit == 0 {
			return fmt.Errorf("%s (mode %o) is not searchable", d, st.Mode&0o777)
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

// closeNotifyDir removes the directory and whatever sockets are left in
// it (a master that crashes leaves it behind: nothing listens there any
// more).
func (m *Master) closeNotifyDir() {
	if m.rejected != nil {
		m.rejected.Close()
	}
	if m.notifyDir == "" {
		return
	}
	if err := notify.RemoveDir(m.notifyDir); err != nil {
		m.log.Warn("notify socket directory not removed", "event", "notify.remove_failed", "path", m.notifyDir, "error", err)
	}
	m.notifyDir = ""
}

// workerNotifySocket binds the notify socket of a worker about to start
// with sp: 0600, owned by the user it runs as.
func (m *Master) workerNotifySocket(sp *workerSpec) (*notify.Socket, error) {
	m.notifySeq++
	uid, gid := -1, -1
	if c := sp.credential; c != nil {
		uid, gid = int(c.Uid), int(c.Gid)
	}
	return notify.Listen(filepath.Join(m.notifyDir, "w"+strconv.Itoa(m.notifySeq)), 0o600, uid, gid)
}

// dropNotifySocket closes a worker's socket, which ends its reader, and
// removes its file. Called from any goroutine, with the logger the loop
// had when it started it (the loop may replace m.log meanwhile).
func dropNotifySocket(log hclog.Logger, s *notify.Socket) {
	_ = s.Close()
	if err := safefile.RemoveSocket(s.Addr); err != nil {
		log.Warn("notify socket not removed", "event", "notify.remove_failed", "path", s.Addr, "error", err)
	}
}

// readNotify reads the notify socket of the worker whose pid is worker
// until it is closed. The sender is checked first, here and not in the
// loop: what no process of the worker's session sent is counted and
// dropped (a few log lines per interval, whatever the rate), and never
// queues ahead of the operator's signals. What passes waits for the loop
// to apply it before the next datagram is read: one message per worker
// at most in the loop's queue. Every datagram read, whatever becomes of
// it (dropped, rejected or applied), takes a token of the reader's own
// budget (notifyReadRate): a flood of datagrams the reader drops waits in
// the socket's queue and its senders' sendto, and costs the master a
// bounded share of a core, not one.
func (m *Master) readNotify(log hclog.Logger, s *notify.Socket, worker int) {
	ack := make(chan struct{}, 1)
	var lim stats.Limiter
	var pace pacer
	reads := pacer{rate: notifyReadRate, burst: notifyReadRate}
	paced, readPaced := false, false
	// throttle waits out p's delay, if any, logging notify.paced the first
	// time (what: which budget); false once the master is done.
	throttle := func(p *pacer, warned *bool, rate float64, what, msg string) bool {
		d := p.delay(time.Now())
		if d <= 0 {
			return true
		}
		if !*warned {
			*warned = true
			log.Warn(msg, "event", "notify.paced", "worker_pid", worker, "rate", rate, "what", what)
		}
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-m.done:
			return false
		}
	}
	for {
		msg, err := s.Read()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				log.Error("notify socket failed; this worker can no longer report", "event", "notify.read_failed", "worker_pid", worker, "error", err)
			}
			return
		}
		// Checking the sender, parsing and dropping cost as much as the
		// sender's sendto: without a budget, one process sending
		// datagrams that are all dropped (reports past one a second,
		// malformed ones, from outside the worker's session) kept a
		// core of the master's busy.
		if !throttle(&reads, &readPaced, notifyReadRate, "datagrams read",
			"datagrams arrive at a worker's notify socket faster than the master reads them; pacing the reads") {
			return
		}
		if ok, why := notify.SpeaksFor(notify.SessionOf, msg.Pid, worker); !ok {
			m.rejected.Add(msg.Pid, why)
			continue
		}
		if msg.Err != nil {
			m.rejected.Add(msg.Pid, msg.Err.Error())
			continue
		}
		fig := m.takeStats(&msg, &lim)
		if fig == nil && len(msg.Fields.Fields) == 0 && !msg.FDsDiscarded {
			continue // a report dropped, and nothing else
		}
		if !m.send(notified{Msg: msg, worker: worker, ack: ack, stats: fig}) {
			return
		}
		select {
		case <-ack:
		case <-m.done:
			return
		}
		// A flood of messages the loop must apply (STATUS=, say) waits
		// here, in the socket's queue and then the sender's sendto:
		// delayed, in order, none lost, and the loop's cost bounded
		// whatever the rate.
		if !throttle(&pace, &paced, notifyRate, "messages applied",
			"a worker sends notify messages faster than the master applies them; pacing it") {
			return
		}
	}
}

// notifyRate and notifyBurst pace what one worker's notify socket sends
// the loop: a token bucket of notifyBurst messages, refilled at
// notifyRate a second. A worker sends a few a second (READY=1, STATUS=,
// WATCHDOG=1, its figures); a flood costs the loop notifyRate events a
// second, not a core.
const (
	notifyRate  = 100
	notifyBurst = 100
)

// notifyReadRate bounds the datagrams one worker's notify socket's reader
// reads a second, whatever becomes of them (burst as many): ten times
// what reaches the loop, so that what is applied is never held back by
// it, and a flood of dropped datagrams costs a percent or so of a core.
// The socket's queue is short (net.unix.max_dgram_qlen, 10 by default):
// a message waits behind at most that many of a flood.
const notifyReadRate = 10 * notifyRate

// pacer is a worker reader's token bucket; the zero pacer is full and
// refills at notifyRate (burst notifyBurst), unless rate and burst say.
type pacer struct {
	spent       float64 // tokens spent: 0 is full
	last        time.Time
	rate, burst float64 // 0: notifyRate, notifyBurst
}

// delay takes a token for a message taken at now and returns how long
// the reader must wait before it reads the next one (0: at once).
func (p *pacer) delay(now time.Time) time.Duration {
	rate, burst := p.rate, p.burst
	if rate <= 0 {
		rate, burst = notifyRate, notifyBurst
	}
	if !p.last.IsZero() {
		p.spent = max(0, p.spent-now.Sub(p.last).Seconds()*rate)
	}
	p.last = now
	p.spent++
	if over := p.spent - burst; over > 0 {
		return time.Duration(over / rate * float64(time.Second))
	}
	return 0
}
