package upgrade

import (
	"time"

	"github.com/hashicorp/go-hclog"
)

// The dance (DESIGN §4) as two state machines, one per side: Old is the
// master that starts an upgrade, New the master an upgrade started, until
// it is primary. Each is a pure core: the master feeds it events (the
// signals as they concern the upgrade, the channel's messages, Upgrade's
// result, deadlines, its workers' readiness as numbers) and carries out
// the actions it returns (start or stop workers, set their count, move the
// pid file and control socket, tell the other side, commit, shut down). A
// machine knows nothing of workers, processes or files; it logs every
// change of state as event="upgrade.state" with from, to and why.

// Env is what a machine needs to know of its master at each event.
type Env struct {
	// Running: the master keeps its slots filled (not draining or
	// stopping).
	Running bool
	// Serving: every slot has had a ready worker since the master started
	// (or since its workers were last respawned).
	Serving bool
	// AllReady: every slot has a ready worker now.
	AllReady bool
	// Reloading: a reload is in flight.
	Reloading bool
	// Workers is the number of slots, ReadyWorkers how many have a ready
	// worker.
	Workers, ReadyWorkers int
}

// Ready is the number of slots with a ready worker.
func (e Env) Ready() int { return e.ReadyWorkers }

// Event is something that happened to a master, as it concerns the
// upgrade.
type Event interface{ event() }

// Signals, as they concern the upgrade.
type (
	SigUSR2  struct{}
	SigQUIT  struct{}
	SigTERM  struct{} // TERM or INT: a fast stop
	SigWINCH struct{}
	// SigHUP is HUP to an old master in standby: the manual rollback.
	SigHUP struct{}
	// StopAll is the control request {"cmd":"stop","all":true}: every
	// live generation ends gracefully.
	StopAll struct{}
)

// TimerFired is a deadline the machine armed (Arm) coming due.
type TimerFired struct {
	Timer Timer
	Seq   int
}

func (SigUSR2) event()    {}
func (SigQUIT) event()    {}
func (SigTERM) event()    {}
func (SigWINCH) event()   {}
func (SigHUP) event()     {}
func (StopAll) event()    {}
func (TimerFired) event() {}

// Timer names a deadline of the dance.
type Timer int

const (
	// TimerDeadline (old): the new master must serve, or commit, by now.
	TimerDeadline Timer = iota
	// TimerSettle (old): a QUIT's settle window is over.
	TimerSettle
	// TimerConfig (new): the old master's configuration must have come.
	TimerConfig
	// TimerReady (new): every worker must be ready by now.
	TimerReady
	// TimerProbation (new): the probation is over.
	TimerProbation
	// TimerRelease (new): a new master that gave up waited long enough for
	// the old one to serve again.
	TimerRelease
)

var timerNames = [...]string{"upgrade deadline", "quit settled", "config deadline", "new ready deadline", "probation over", "release deadline"}

func (t Timer) String() string { return timerNames[t] }

// Action is something a machine asks its master to do.
type Action interface{ action() }

// Actions common to both sides.
type (
	// Arm asks for TimerFired{Timer, Seq} after D.
	Arm struct {
		Timer Timer
		D     time.Duration
		Seq   int
	}
	// Tell sends Msg to the other side over the channel (the master sets
	// Pid on a new master's messages).
	Tell struct{ Msg Msg }
	// Shutdown stops this master's workers: drained, or killed if Fast.
	Shutdown struct{ Fast bool }
	// SetWorkers sets the number of slots (new: the old master's count).
	SetWorkers struct{ N int }
	// SupervisorReady: tell the supervisor this master is the primary and
	// serves (MAINPID=, READY=1), with Status.
	SupervisorReady struct{ Status string }
)

func (Arm) action()             {}
func (Tell) action()            {}
func (Shutdown) action()        {}
func (SetWorkers) action()      {}
func (SupervisorReady) action() {}

// Settings of the dance.
const (
	// QuitSettle is how long a QUIT to a lone master waits for a USR2 that
	// arrives as a delivery of its own (kill -USR2; kill -QUIT): with one,
	// the QUIT means "upgrade, then retire", never a total outage.
	QuitSettle = time.Second
	// Slack is added to the new master's deadlines for its own start-up
	// and for the commit round trip.
	Slack = 5 * time.Second
	// ConfigTimeout bounds a new master's wait for the old master's
	// configuration.
	ConfigTimeout = 10 * time.Second
	// KillReapTimeout bounds the wait for a new master told to stop fast;
	// then it is killed with its workers.
	KillReapTimeout = 10 * time.Second
)

// logTransition is the one log line of every change of state.
func logTransition(log hclog.Logger, side, from, to, why string) {
	log.Info("upgrade state: "+from+" -> "+to, "event", "upgrade.state", "side", side, "from", from, "to", to, "why", why)
}
