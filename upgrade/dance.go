package upgrade

import (
	"time"

	"github.com/hashicorp/go-hclog"
)

// The dance (DESIGN §4) as two state machines, one per side: OldSide is
// the master that starts an upgrade (every master has one), NewSide the
// master an upgrade started, until it is primary. Each is a pure core: the master feeds it events (the
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
	// TimerGateWait (new): the probation's extension for the gates'
	// minimum of requests is over (MaxGateWait).
	TimerGateWait
)

var timerNames = [...]string{"upgrade deadline", "quit settled", "config deadline", "new ready deadline", "probation over", "release deadline", "gates wait over"}

func (t Timer) String() string { return timerNames[t] }

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
	// MaxExtend bounds one extension of the probation a new master asks
	// for (KindExtend): a new master cannot hold the old one's deadline
	// off for long.
	MaxExtend = 5 * time.Minute
)

// logTransition is the one log line of every change of state.
func logTransition(log hclog.Logger, side, from, to, why string) {
	log.Info("upgrade state: "+from+" -> "+to, "event", "upgrade.state", "side", side, "from", from, "to", to, "why", why)
}
