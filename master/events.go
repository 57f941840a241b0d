package master

import (
	"fmt"
	"os"
	"strings"

	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
)

// event is anything that reaches the master loop. Every goroutine other
// than the loop only sends events (STYLE.md principle 1).
type event interface {
	fmt.Stringer
}

// signalBatch is every signal that was pending when the first one arrived;
// repeats are merged (os/signal delivers lowest number first and merges).
type signalBatch struct {
	sigs []os.Signal
}

func (e signalBatch) String() string {
	names := make([]string, len(e.sigs))
	for i, s := range e.sigs {
		names[i] = s.String()
	}
	return "signals " + strings.Join(names, ",")
}

// childExited reports that a worker process has been reaped.
type childExited struct {
	pid   int
	state *os.ProcessState // nil if wait failed
	err   error
}

func (e childExited) String() string { return fmt.Sprintf("child %d exited", e.pid) }

// notified carries one datagram from a worker's notify socket, from a
// sender its reader found in the worker's session. The loop signals ack
// once it has applied it: each reader has at most one message in the
// loop's queue.
type notified struct {
	notify.Msg
	worker int // the pid of the worker it speaks for
	ack    chan<- struct{}
	stats  *stats.Figures // its MOLT_STATS=, parsed, if one was taken
}

func (e notified) String() string {
	return fmt.Sprintf("notify from pid %d for worker %d", e.Pid, e.worker)
}

// timerKind names what a timer event is for.
type timerKind int

const (
	// readyDeadline: the worker must be ready by now (--ready-timeout).
	readyDeadline timerKind = iota
	// readyDelayOver: a worker that never notifies counts as ready now.
	readyDelayOver
	// drainDeadline: a stopping worker must be gone by now; then SIGKILL.
	drainDeadline
	// respawnDue: the backoff of a slot has passed.
	respawnDue
	// killDeadline: processes killed with SIGKILL must be reaped by now.
	killDeadline
	// upgradeTimer: a deadline of the upgrade (its upgrade.Timer says
	// which).
	upgradeTimer
	// reloadDeadline: a reload's new workers must all be ready by now.
	reloadDeadline
	// watchdogCheck: a ready worker must have pinged (WATCHDOG=1) within
	// the watchdog interval by now; else it is killed.
	watchdogCheck
	// recycleDue: a ready worker has reached its lifetime
	// (--max-worker-lifetime); it is replaced.
	recycleDue
	// listenerCheck: time to check that the listeners still listen, in
	// non-blocking mode (heal.go).
	listenerCheck
)

var timerNames = [...]string{"ready deadline", "ready delay over", "drain deadline", "respawn due",
	"kill deadline", "upgrade timer", "reload deadline", "watchdog check", "recycle due", "listener check"}

// timerFired is a timer's event. Handlers check that the pid or slot and
// its sequence number still match: a timer can fire after what it was for
// has changed, and is then ignored.
type timerFired struct {
	kind timerKind
	ut   upgrade.Timer // upgradeTimer
	pid  int
	s    *slot // respawnDue
	slot int
	seq  int
}

func (e timerFired) String() string {
	if e.kind == upgradeTimer {
		return "timer " + e.ut.String()
	}
	return fmt.Sprintf("timer %s pid=%d slot=%d", timerNames[e.kind], e.pid, e.slot)
}

// upgradeDone carries the result of Handover.Upgrade (old master): nil
// when the new master committed.
type upgradeDone struct{ err error }

func (e upgradeDone) String() string { return fmt.Sprintf("upgrade done: %v", e.err) }

// fromChild is a message from a new master (or a broken packet).
type fromChild struct {
	msg upgrade.Msg
	err error
}

func (e fromChild) String() string { return "from new master: " + e.msg.Kind }

// fromParent is a message from the old master (or a broken packet).
type fromParent struct {
	msg upgrade.Msg
	err error
}

func (e fromParent) String() string { return "from old master: " + e.msg.Kind }

// parentExited reports (new master) that the old master has exited.
type parentExited struct{}

func (parentExited) String() string { return "parent exited" }

// preflightDone is the result of a new binary's pre-flight run for the
// upgrade attempt numbered attempt.
type preflightDone struct {
	attempt int
	out     string
	err     error
}

func (e preflightDone) String() string { return fmt.Sprintf("pre-flight done: %v", e.err) }
