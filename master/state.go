package master

import (
	"net"
	"os"
	"time"

	"github.com/molt-server/molt/master/internal/notify"
)

// phase is where the master is in its life.
type phase int

const (
	// phaseStarting: workers are starting; not all have been ready yet.
	phaseStarting phase = iota
	// phaseServing: every slot has had a ready worker; respawns keep it so.
	phaseServing
	// phaseDraining: QUIT; workers drain, nothing is respawned.
	phaseDraining
	// phaseStopping: TERM/INT; workers are killed, nothing is respawned.
	phaseStopping
	// phaseStopped: every worker is gone; Run returns.
	phaseStopped
)

var phaseNames = [...]string{"starting", "serving", "draining", "stopping", "stopped"}

func (p phase) String() string { return phaseNames[p] }

// setPhase is the one transition of the master's own life: every change
// is logged once, with from, to and why, under a stable event key
// (master.phase), as the upgrade's sides log theirs (upgrade.state).
func (m *Master) setPhase(to phase, why string) {
	if m.phase == to {
		return
	}
	m.log.Info("master phase", "event", "master.phase", "from", m.phase.String(), "to", to.String(), "why", why)
	m.phase = to
}

// running reports whether the master still keeps its slots filled.
func (p phase) running() bool { return p == phaseStarting || p == phaseServing }

// workerState is a worker process's state as the master sees it.
type workerState int

const (
	workerStarting workerState = iota // started, not ready yet
	workerReady                       // sent READY=1 (or the ready delay passed)
	workerStopping                    // told to stop, or said STOPPING=1
)

var workerStateNames = [...]string{"starting", "ready", "stopping"}

func (s workerState) String() string { return workerStateNames[s] }

// proc is one live worker process.
type proc struct {
	pid  int
	p    *os.Process
	s    *slot       // its slot; see Master.slotOf for whether it still owns it
	slot int         // the slot's number, for logs
	spec *workerSpec // how it was started
	// epoch is Master.listenerEpoch when it was started: an older one
	// holds a listening socket since replaced.
	epoch int
	// state and its times.
	state            workerState
	started, readyAt time.Time
	// stopAt is when it was told to stop, or said STOPPING=1 (the
	// drain's start; zero if neither).
	stopAt time.Time
	// status is the last STATUS= it sent.
	status string
	// lastPing is the time of its last WATCHDOG=1.
	lastPing time.Time
	// killed is set once SIGKILL was sent to its group;
	// watchdogKilled if the watchdog did it.
	killed, watchdogKilled bool
	// recycleWhy is why its recycling was asked for ("lifetime", ...),
	// kept while it waits for a better moment.
	recycleWhy string
	// notify is its own notify socket (nil in unit tests); closed and
	// removed once it is reaped.
	notify *notify.Socket
	// entry is 1 + its entry in the accept table; 0 if it has none.
	entry int
	// health is the master's end of its health socket (health.go), until
	// its check takes it; checking while the check runs; healthy once it
	// passed.
	health            net.Conn
	checking, healthy bool
}

// slot is one place in the worker pool. Its worker may come and go; the
// slot keeps the count of restarts and the crash-loop backoff.
type slot struct {
	n       int
	spec    *workerSpec // how its workers start
	removed bool        // out of service (TTOU, reload): never respawned
	pending bool        // started by a reload in flight
	pid     int         // its live worker, 0 while none
	// successor is the worker that replaces pid when it is ready (a
	// recycling in progress), 0 if none.
	successor int
	seq       int // changes whenever a respawn timer is armed or voided
	backoff   backoff
	restarts  int
	lastExit  string
	// restartAt is when a respawn delayed by the backoff is due (zero when
	// none is).
	restartAt time.Time
}

// role is this master's place among the generations (DESIGN §3's columns).
type role int

const (
	// rolePrimary: serves on its own, and may start an upgrade.
	rolePrimary role = iota
	// roleNew: started by an upgrade, not committed: its parent, the old
	// master, still decides.
	roleNew
	// roleCommitted: committed, while its parent still drains; it becomes
	// primary when the parent has exited.
	roleCommitted
)

var roleNames = [...]string{"primary", "new", "committed"}

// The role derives from the two sides of the dance: see Master.role.

func (r role) String() string { return roleNames[r] }
