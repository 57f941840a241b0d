package upgrade

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
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

// Handover owns this process's tableflip.Upgrader.
type Handover struct {
	upg      *tableflip.Upgrader
	log      hclog.Logger
	children *Channel // this master's end towards the masters it starts
}

// New creates the process's one Handover. It fails if called twice in one
// process (tableflip allows a single Upgrader) or if the inherited state
// from a parent master is unreadable. log may be nil.
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
	return &Handover{upg: upg, log: log}, nil
}

// HasParent reports whether this master was started by another master's
// upgrade.
func (h *Handover) HasParent() bool { return h.upg.HasParent() }

// Listener returns the listening socket called name: inherited from the
// parent master if it passed one under that name, else the one bind
// creates, which is then registered for the next upgrade. The returned file
// is the caller's to close; the Handover keeps its own duplicate. bind is
// not called when the socket is inherited.
func (h *Handover) Listener(name string, bind func() (*os.File, error)) (f *os.File, inherited bool, err error) {
	key := listenerPrefix + name
	f, err = h.upg.File(key)
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
	if err := h.upg.AddFile(key, f); err != nil {
		_ = f.Close() // the bind is undone: nothing else holds it yet
		return nil, false, fmt.Errorf("upgrade: register listener %s: %w", name, err)
	}
	return f, false, nil
}

// InheritedListener returns the listener the parent passed under name, or
// nil. Call it before Ready (which closes what was not taken).
func (h *Handover) InheritedListener(name string) (*os.File, error) {
	f, err := h.upg.File(listenerPrefix + name)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherit listener %s: %w", name, err)
	}
	return f, nil
}

// Replace registers f under name in place of the listener inherited
// there (whose address the configuration changed); the caller closes the
// inherited one.
func (h *Handover) Replace(name string, f *os.File) error {
	if err := h.upg.AddFile(listenerPrefix+name, f); err != nil {
		return fmt.Errorf("upgrade: register listener %s: %w", name, err)
	}
	return nil
}

// Ready tells tableflip this process serves. For a master with no parent it
// only enables Upgrade; for a new master it is the commit: the parent's
// Upgrade returns nil and the parent retires. Safe to call more than once.
func (h *Handover) Ready() error {
	if err := h.upg.Ready(); err != nil {
		return fmt.Errorf("upgrade: ready: %w", err)
	}
	return nil
}

// PassFile passes a duplicate of f to every new master this one starts,
// under name (the pid-file lock travels this way: a duplicate shares the
// flock). Passing a name again replaces the earlier file.
func (h *Handover) PassFile(name string, f *os.File) error {
	if err := h.upg.AddFile(filePrefix+name, f); err != nil {
		return fmt.Errorf("upgrade: pass %s: %w", name, err)
	}
	return nil
}

// InheritedFile returns the file the parent master passed under name, or
// nil if there is none. It stays registered for this master's own
// children. The caller owns the returned duplicate.
func (h *Handover) InheritedFile(name string) (*os.File, error) {
	f, err := h.upg.File(filePrefix + name)
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
	f, err := h.upg.File(channelFile)
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
	if err := h.upg.AddFile(channelFile, childEnd); err != nil {
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
func (h *Handover) Upgrade() error {
	if err := h.upg.Upgrade(); err != nil {
		runtime.GC() // queues the finalizers of the attempt's lost pipe ends
		return classify(err)
	}
	return nil
}

// WaitForParent blocks until the parent master has exited (at once for a
// master with no parent) or ctx is done.
func (h *Handover) WaitForParent(ctx context.Context) error {
	return h.upg.WaitForParent(ctx)
}
