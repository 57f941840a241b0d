package master

import (
	"fmt"
	"os"
	"strings"
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

// notified carries one datagram from the notify socket.
type notified struct{ notifyMsg }

func (e notified) String() string { return fmt.Sprintf("notify from pid %d", e.pid) }

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
	// healthyMark: the worker has been ready for healthyAfter.
	healthyMark
	// killDeadline: processes killed with SIGKILL must be reaped by now.
	killDeadline
)

var timerNames = [...]string{"ready deadline", "ready delay over", "drain deadline", "respawn due", "healthy", "kill deadline"}

// timerFired is a timer's event. Handlers check that the pid or slot and
// its sequence number still match: a timer can fire after what it was for
// has changed, and is then ignored.
type timerFired struct {
	kind timerKind
	pid  int
	slot int
	seq  int
}

func (e timerFired) String() string {
	return fmt.Sprintf("timer %s pid=%d slot=%d", timerNames[e.kind], e.pid, e.slot)
}
