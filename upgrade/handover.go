package upgrade

import (
	"fmt"
	"math"
	"os"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// ParentEnv is the variable tableflip sets in a new master's environment. It
// must never reach a worker: a worker that sees it would take fds 3 and 4 for
// tableflip's pipes (DESIGN §4, "Don't leak tableflip into workers").
const ParentEnv = "TABLEFLIP_HAS_PARENT_7DIU3"

// filePrefix keeps molt's names apart from any other file passed through
// the same Upgrader (the G1↔G2 channel, the pid-file lock).
const filePrefix = "molt.listener."

// Handover owns this process's tableflip.Upgrader.
type Handover struct {
	upg *tableflip.Upgrader
	log hclog.Logger
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
	key := filePrefix + name
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

// Ready tells tableflip this process serves. For a master with no parent it
// only enables Upgrade; for a new master it is the commit: the parent's
// Upgrade returns nil and the parent retires. Safe to call more than once.
func (h *Handover) Ready() error {
	if err := h.upg.Ready(); err != nil {
		return fmt.Errorf("upgrade: ready: %w", err)
	}
	return nil
}
