package upgrade

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// ParentEnv is the variable tableflip sets in a new master's environment. It
// must never reach a worker: a worker that sees it would take fds 3 and 4 for
// tableflip's pipes (DESIGN §4, "Don't leak tableflip into workers").
const ParentEnv = "TABLEFLIP_HAS_PARENT_7DIU3"

// Names of the files a master passes to the next one. Listeners go under
// listenerPrefix+name, so they never collide with the channel or the
// files passed by PassFile.
const (
	listenerPrefix = "molt.listener."
	filePrefix     = "molt.file."
	channelFile    = "molt.channel"
)

// Handover owns this process's tableflip.Upgrader, and molt's own
// handover (fresh.go) for when that Upgrader is spent: tableflip allows
// one successful upgrade per process, and a master that took the
// service back after its successor died upgrades again by molt's own
// means. Nothing outside this package sees which way an upgrade went.
type Handover struct {
	upg      *tableflip.Upgrader
	log      hclog.Logger
	children *Channel // this master's end towards the masters it starts

	mu sync.Mutex
	// passed mirrors tableflip's registered files (name to a raw,
	// close-on-exec duplicate, never in the runtime's poller): tableflip
	// closes its own at its commit, and molt's own handover passes these.
	passed map[string]int
	// spent: tableflip's Upgrade has committed once; every later upgrade
	// goes by molt's own handover.
	spent bool
	// fresh is the parent of a master started by molt's own handover
	// (nil otherwise), and inherited what it passed and this master has
	// not taken yet (closed at Ready, as tableflip does).
	fresh     *freshParent
	inherited map[string]int
	keep      []*os.File // the write ends of parent pipes, open until this process exits
}

// New creates the process's one Handover. It fails if called twice in one
// process (tableflip allows a single Upgrader) or if the inherited state
// from a parent master is unreadable; an invalid HandoverEnv wraps
// ErrHandoverEnv. log may be nil.
//
// tableflip's own upgrade timeout is set effectively infinite: molt enforces
// its ready and probation deadlines itself (DESIGN §4).
func New(log hclog.Logger) (*Handover, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: time.Duration(math.MaxInt64)})
	if err != nil {
		return nil, fmt.Errorf("upgrade: start handover: %w", err)
	}
	if upg.HasParent() {
		// tableflip leaves its two pipes to the parent at fds 3 and 4 without
		// close-on-exec; set it so no worker inherits them.
		unix.CloseOnExec(3)
		unix.CloseOnExec(4)
	}
	h := &Handover{upg: upg, log: log, passed: map[string]int{}}
	if val, ok := os.LookupEnv(HandoverEnv); ok {
		// Removed at once: this master's own children get their own.
		_ = os.Unsetenv(HandoverEnv)
		if upg.HasParent() {
			return nil, fmt.Errorf("upgrade: %w: tableflip's %s is set too", ErrHandoverEnv, ParentEnv)
		}
		files, err := parseHandoverEnv(val)
		if err != nil {
			return nil, err
		}
		h.fresh = newFreshParent(files)
		h.inherited = files
	}
	return h, nil
}

// HasParent reports whether this master was started by another master's
// upgrade.
func (h *Handover) HasParent() bool { return h.upg.HasParent() || h.fresh != nil }

// take returns a duplicate of the file the parent passed under key, or
// nil; the file stays registered for this master's children.
func (h *Handover) take(key string) (*os.File, error) {
	if h.fresh == nil {
		f, err := h.upg.File(key)
		if err == nil && f != nil {
			err = h.mirror(key, f)
		}
		return f, err
	}
	h.mu.Lock()
	fd, ok := h.inherited[key]
	delete(h.inherited, key)
	h.mu.Unlock()
	if !ok {
		return nil, nil
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("dup %s: %w", key, err)
	}
	f := os.NewFile(uintptr(dup), key)
	if err := h.upg.AddFile(key, f); err != nil {
		_ = unix.Close(fd)
		_ = f.Close()
		return nil, err
	}
	h.mu.Lock()
	h.replacePassed(key, fd)
	h.mu.Unlock()
	return f, nil
}

// add registers f under key for this master's children.
func (h *Handover) add(key string, f *os.File) error {
	if err := h.upg.AddFile(key, f); err != nil {
		return err
	}
	return h.mirror(key, f)
}

// mirror keeps a raw duplicate of f under key for molt's own handover
// (without touching f's blocking mode: the listeners' mode is shared
// with every worker).
func (h *Handover) mirror(key string, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("dup %s: %w", key, err)
	}
	dup := -1
	if cerr := rc.Control(func(fd uintptr) {
		dup, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3)
	}); cerr != nil {
		return fmt.Errorf("dup %s: %w", key, cerr)
	}
	if err != nil {
		return fmt.Errorf("dup %s: %w", key, err)
	}
	h.mu.Lock()
	h.replacePassed(key, dup)
	h.mu.Unlock()
	return nil
}

// replacePassed sets key's passed fd, closing the one it replaces.
func (h *Handover) replacePassed(key string, fd int) {
	if old, ok := h.passed[key]; ok && old != fd {
		_ = unix.Close(old)
	}
	h.passed[key] = fd
}

// Listener returns the listening socket called name: inherited from the
// parent master if it passed one under that name, else the one bind
// creates, which is then registered for the next upgrade. The returned file
// is the caller's to close; the Handover keeps its own duplicate. bind is
// not called when the socket is inherited.
func (h *Handover) Listener(name string, bind func() (*os.File, error)) (f *os.File, inherited bool, err error) {
	key := listenerPrefix + name
	f, err = h.take(key)
	if err != nil {
		return nil, false, fmt.Errorf("upgrade: inherit listener %s: %w", name, err)
	}
	if f != nil {
		return f, true, nil
	}
	f, err = bind()
	if err != nil {
		return nil, false, err
	}
	if err := h.add(key, f); err != nil {
		_ = f.Close() // the bind is undone: nothing else holds it yet
		return nil, false, fmt.Errorf("upgrade: register listener %s: %w", name, err)
	}
	return f, false, nil
}

// InheritedListener returns the listener the parent passed under name, or
// nil. Call it before Ready (which closes what was not taken).
func (h *Handover) InheritedListener(name string) (*os.File, error) {
	f, err := h.take(listenerPrefix + name)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherit listener %s: %w", name, err)
	}
	return f, nil
}

// Replace registers f under name in place of the listener inherited
// there (whose address the configuration changed); the caller closes the
// inherited one.
func (h *Handover) Replace(name string, f *os.File) error {
	if err := h.add(listenerPrefix+name, f); err != nil {
		return fmt.Errorf("upgrade: register listener %s: %w", name, err)
	}
	return nil
}

// Ready tells tableflip this process serves. For a master with no parent it
// only enables Upgrade; for a new master it is the commit: the parent's
// Upgrade returns nil and the parent retires. What the parent passed and
// this master did not take is closed. Safe to call more than once.
func (h *Handover) Ready() error {
	if err := h.upg.Ready(); err != nil {
		return fmt.Errorf("upgrade: ready: %w", err)
	}
	if h.fresh == nil {
		return nil
	}
	h.mu.Lock()
	for key, fd := range h.inherited {
		_ = unix.Close(fd)
		delete(h.inherited, key)
	}
	h.mu.Unlock()
	if err := h.fresh.sendReady(); err != nil {
		return fmt.Errorf("upgrade: ready: %w", err)
	}
	return nil
}

// PassFile passes a duplicate of f to every new master this one starts,
// under name (the pid-file lock travels this way: a duplicate shares the
// flock). Passing a name again replaces the earlier file.
func (h *Handover) PassFile(name string, f *os.File) error {
	if err := h.add(filePrefix+name, f); err != nil {
		return fmt.Errorf("upgrade: pass %s: %w", name, err)
	}
	return nil
}

// InheritedFile returns the file the parent master passed under name, or
// nil if there is none. It stays registered for this master's own
// children. The caller owns the returned duplicate.
func (h *Handover) InheritedFile(name string) (*os.File, error) {
	f, err := h.take(filePrefix + name)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherit %s: %w", name, err)
	}
	return f, nil
}

// Parent returns the channel to the master that started this one, or nil
// for a master with no parent. Call it once, before Children.
func (h *Handover) Parent() (*Channel, error) {
	if !h.HasParent() {
		return nil, nil
	}
	f, err := h.take(channelFile)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherit the channel: %w", err)
	}
	if f == nil {
		return nil, errors.New("upgrade: the parent master passed no channel (an older molt?)")
	}
	return &Channel{f: f}, nil
}

// Children returns this master's end of the channel to the new masters it
// starts. The socket pair is made on the first call and its other end
// registered with tableflip once, for every attempt (re-registering would
// leak a descriptor: tableflip's AddFile overwrites without closing). In a
// master that has a parent, the registration replaces the end inherited
// from the parent, which this master no longer passes on (tableflip drops
// that duplicate, which the garbage collector then closes).
func (h *Handover) Children() (*Channel, error) {
	if h.children != nil {
		return h.children, nil
	}
	mine, childEnd, err := newChannelPair()
	if err != nil {
		return nil, err
	}
	defer childEnd.Close() // tableflip keeps its own duplicate
	if err := h.add(channelFile, childEnd); err != nil {
		_ = mine.Close()
		return nil, fmt.Errorf("upgrade: register the channel: %w", err)
	}
	h.children = mine
	return mine, nil
}

// Upgrade starts a new master (the binary at this process's original path,
// os.Args[0], resolved now: a new file there is the new version) with
// every registered file, and blocks until it commits (nil: this master
// must retire) or fails: it could not be started, it exited, or Stop was
// called. It refuses while this master has not called Ready, or while its
// own parent lives. Run it in a goroutine of its own. Its errors are
// *UpgradeError.
//
// Each attempt opens two pipes in tableflip (v1.2.3) and leaves the new
// master's ends of them (its readiness pipe's write end, its names pipe's
// read end) to their *os.File finalizers. A failed attempt therefore
// collects them at once: without that, every failed upgrade would hold
// two descriptors until some later collection, and a run of them (a
// deploy script retrying a broken binary) would pile them up. Closing
// them by number instead would be wrong: the finalizer would later close
// whatever reused the number, perhaps a listener.
//
// Once tableflip's Upgrader has committed an upgrade (spent: this master
// took the service back since), Upgrade starts the new master by molt's
// own handover (fresh.go) with the same files and the same outcomes.
func (h *Handover) Upgrade() error {
	h.mu.Lock()
	spent := h.spent
	var files map[string]int
	var err error
	if spent {
		// Duplicates: a Replace meanwhile closes what it replaces.
		files, err = dupAll(h.passed)
	}
	h.mu.Unlock()
	if spent {
		if err != nil {
			return &UpgradeError{Kind: FailedStart, Err: fmt.Errorf("can't start child: %w", err)}
		}
		defer closeAll(files)
		return h.startFresh(files)
	}
	if err := h.upg.Upgrade(); err != nil {
		runtime.GC() // queues the finalizers of the attempt's lost pipe ends
		return classify(err)
	}
	h.mu.Lock()
	h.spent = true
	h.mu.Unlock()
	return nil
}

// WaitForParent blocks until the parent master has exited (at once for a
// master with no parent) or ctx is done.
func (h *Handover) WaitForParent(ctx context.Context) error {
	if h.fresh == nil {
		return h.upg.WaitForParent(ctx)
	}
	var err error
	select {
	case err = <-h.fresh.result:
	case <-ctx.Done():
		return ctx.Err()
	}
	h.fresh.result <- err // for a later call
	return err
}

// dupAll duplicates every fd of files (close-on-exec).
func dupAll(files map[string]int) (map[string]int, error) {
	dups := make(map[string]int, len(files))
	for k, fd := range files {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			closeAll(dups)
			return nil, fmt.Errorf("dup %s: %w", k, err)
		}
		dups[k] = dup
	}
	return dups, nil
}

// closeAll closes every fd of files.
func closeAll(files map[string]int) {
	for _, fd := range files {
		_ = unix.Close(fd)
	}
}
