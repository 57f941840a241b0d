package upgrade

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
)

// OldState is where an old master is in an upgrade it started.
type OldState int

const (
	// OldIdle: serves alone; USR2 starts an upgrade.
	OldIdle OldState = iota
	// OldSettling: a QUIT waits out QuitSettle for a USR2 that would
	// make it "upgrade, then retire".
	OldSettling
	// OldStarting: the new master starts (Upgrade runs), and the new
	// binary's pre-flight runs alongside; it does not serve yet. This
	// generation serves.
	OldStarting
	// OldServingBoth: the new generation serves too (its probation, or
	// the wait for a manual commit).
	OldServingBoth
	// OldStandby: WINCH stopped this generation's workers; the new one
	// serves alone, uncommitted. HUP respawns them.
	OldStandby
	// OldCommitting: QUIT asked the new master to commit.
	OldCommitting
	// OldRollingBack: the new master gave up; this generation serves
	// again and releases it once all its workers are ready.
	OldRollingBack
	// OldRetiring: the new generation committed; this one drains and
	// exits, and takes the service back should its successor die first.
	OldRetiring
	// OldTookBack: the successor died after its commit and this master
	// serves again; USR2 upgrades again (the Handover starts the new
	// master by molt's own means: tableflip allows one upgrade per
	// process).
	OldTookBack
	// OldStopping: this generation stops (QUIT, TERM, a stop request).
	OldStopping
)

var oldStateNames = [...]string{"idle", "settling", "starting", "serving-both", "standby",
	"committing", "rolling-back", "retiring", "took-back", "stopping"}

func (s OldState) String() string { return oldStateNames[s] }

// OldConfig is an old master's settings of the dance.
type OldConfig struct {
	Pid          int // this master's
	Preflight    bool
	ManualCommit bool
	ReadyTimeout time.Duration
	Probation    time.Duration
	Now          func() time.Time // time.Now if nil
}

// Pre-flight states of an Attempt.
const (
	PreflightNone    = ""        // no pre-flight configured
	PreflightRunning = "running" // alongside the new master's start
	PreflightPassed  = "passed"
	PreflightFailed  = "failed" // the attempt rolls back
)

// Attempt is one upgrade in flight, as the old master follows it.
type Attempt struct {
	ID           int // numbers the attempts of this master
	Started      time.Time
	Preflight    string // PreflightRunning, ...
	Pid          int    // the new master's pid, once known
	PGIDs        []int  // its workers' process groups, as it reported them
	Serving      bool
	Ready, Want  int  // its workers ready, of how many
	Failed       *Msg // its failure report, if it sent one
	releaseSent  bool
	quitPending  bool // a QUIT waits for the new generation to serve
	killed       bool
	seq          int       // of the current deadline
	preflightErr string    // why the pre-flight failed
	extendUntil  time.Time // the probation's end the new master last asked for (KindExtend)
	tl           timeline
}

// Phases returns the milestones reached so far.
func (a *Attempt) Phases() Phases { return a.tl.phases(a.Started) }

// Result is how the last upgrade ended.
type Result struct {
	Outcome string `json:"outcome"` // committed, rolled back, taken back
	Reason  string `json:"reason,omitempty"`
	// Cause is Reason's stable short form (FailureCause): "ok" for a
	// commit. Metrics label by it.
	Cause  string    `json:"cause,omitempty"`
	NewPID int       `json:"new_pid,omitempty"`
	At     time.Time `json:"at"`
	// Phases: the milestones the upgrade reached (docs/upgrades.md).
	Phases Phases `json:"phases,omitempty"`
}

// OldSide is the old master's side of the dance: every master has one.
type OldSide struct {
	cfg     OldConfig
	log     hclog.Logger
	state   OldState
	up      *Attempt
	standby bool // WINCH stopped the workers (through committing too)
	// successor is the committed new master while this one drains;
	// noTakeBack: it stops on purpose, or this one was told to stop.
	successor  int
	noTakeBack bool
	stopAll    bool // every generation stops: a failed new master is released at once
	last       *Result
	seq        int
	attempts   int
	acts       []Action
}

// NewOldSide returns the machine of a master in OldIdle.
func NewOldSide(cfg OldConfig, log hclog.Logger) *OldSide {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &OldSide{cfg: cfg, log: log}
}

// SetLogger replaces the logger (the master's gains fields).
func (o *OldSide) SetLogger(log hclog.Logger) { o.log = log }

// State is the machine's state.
func (o *OldSide) State() OldState { return o.state }

// InFlight reports whether an upgrade is in flight (from its pre-flight
// to Upgrade's return).
func (o *OldSide) InFlight() bool { return o.up != nil }

// Standby reports whether WINCH stopped this generation's workers.
func (o *OldSide) Standby() bool { return o.standby }

// Retiring reports whether a new generation committed.
func (o *OldSide) Retiring() bool { return o.state == OldRetiring }

// Attempt returns a copy of the upgrade in flight, or nil.
func (o *OldSide) Attempt() *Attempt {
	if o.up == nil {
		return nil
	}
	a := *o.up
	a.PGIDs = append([]int(nil), a.PGIDs...)
	return &a
}

// Last returns how the last upgrade ended, or nil.
func (o *OldSide) Last() *Result { return o.last }

func (o *OldSide) to(s OldState, why string) {
	if s == o.state {
		return
	}
	logTransition(o.log, "old", o.state.String(), s.String(), why)
	o.state = s
}

func (o *OldSide) do(a ...Action) { o.acts = append(o.acts, a...) }

// Handle applies ev and returns what the master must do, in order.
func (o *OldSide) Handle(env Env, ev Event) []Action {
	o.acts = nil
	switch ev := ev.(type) {
	case SigUSR2:
		o.onUSR2(env)
	case SigQUIT:
		o.onQUIT()
	case CtlStop:
		if o.up == nil && o.state != OldRetiring {
			o.to(OldStopping, "stop requested")
			o.do(Shutdown{})
		} else {
			o.onQUIT()
		}
	case StopAll:
		o.onStopAll()
	case SigTERM:
		if o.up != nil {
			o.tell(Msg{Kind: KindStop})
			o.arm(KillReapTimeout) // if it does not go by itself, it is killed with its workers
		}
		o.noTakeBack = true
		if o.state != OldRetiring { // a retiring master's files are its successor's
			o.to(OldStopping, "TERM: both generations stop fast")
		}
		o.do(Shutdown{Fast: true})
	case SigWINCH:
		o.onWINCH()
	case SigHUP:
		if o.standby {
			o.resume("HUP: the manual rollback step")
			o.releaseIfServing(env)
		}
	case TimerFired:
		o.onTimer(ev)
	case PreflightDone:
		o.onPreflightDone(ev)
	case BeginFailed:
		if o.up != nil && o.up.Preflight == PreflightRunning {
			o.do(CancelPreflight{})
		}
		o.up = nil
		o.to(OldIdle, "upgrade not started")
		o.log.Error("upgrade not started: "+ev.What, "event", "upgrade.not_started", "error", ev.Err)
		o.do(Finish{Error: "upgrade not started: " + ev.What + ": " + ev.Err.Error()})
	case FromChild:
		o.onChildMsg(env, ev)
	case UpgradeDone:
		o.onUpgradeDone(env, ev.Err)
	case SuccessorExited:
		o.onSuccessorExited(ev.Pid)
	case WorkersServing:
		o.releaseIfServing(env)
	case Scaled:
		if up := o.up; up != nil && up.Pid != 0 && !up.Serving && up.Preflight != PreflightFailed {
			o.sendConfig()
		}
	}
	return o.acts
}

// refuse refuses a USR2; cause is the stable short form of why, for
// alerts and tests (docs/upgrades.md).
func (o *OldSide) refuse(cause, why string) {
	o.log.Warn("USR2 refused: "+why, "event", "upgrade.usr2_refused", "signal", "SIGUSR2", "cause", cause, "reason", why)
	o.do(Refused{Why: why})
}

func (o *OldSide) onUSR2(env Env) {
	switch {
	case o.up != nil:
		o.refuse("in_flight", fmt.Sprintf("an upgrade is already in flight (new master pid %d)", o.up.Pid))
		return
	case env.Reloading:
		o.refuse("reloading", "a reload is in flight; upgrade once it has ended")
		return
	case !env.Running || o.state == OldStopping || o.state == OldRetiring:
		o.refuse("shutting_down", "the master is shutting down")
		return
	}
	now := o.cfg.Now()
	o.attempts++
	o.up = &Attempt{ID: o.attempts, Started: now, quitPending: o.state == OldSettling}
	o.up.tl.since = now
	if o.cfg.Preflight {
		// Alongside the new master's start, not before it: the pre-flight
		// adds no cold start of its own to the upgrade, and the commit
		// waits for it (the new master is told to Hold).
		o.up.Preflight = PreflightRunning
		o.do(RunPreflight{Attempt: o.up.ID})
	}
	o.to(OldStarting, "USR2")
	o.up.tl.mark(PhaseStart, o.cfg.Now())
	o.do(Begin{QuitPending: o.up.quitPending})
	o.arm(o.cfg.ReadyTimeout + Slack)
}

func (o *OldSide) onPreflightDone(ev PreflightDone) {
	up := o.up
	if up == nil || ev.Attempt != up.ID || up.Preflight != PreflightRunning {
		return // from an attempt that has ended
	}
	up.tl.mark(PhasePreflight, o.cfg.Now())
	ms := up.Phases()[PhasePreflight]
	if ev.Err == nil {
		up.Preflight = PreflightPassed
		o.log.Info("pre-flight passed", "event", "upgrade.preflight_passed", "output", ev.Out, PhasePreflight, ms)
		if up.Pid != 0 && up.Failed == nil {
			o.tell(Msg{Kind: KindPreflightOK}) // a new master told to Hold may commit
			if up.Serving && !o.cfg.ManualCommit {
				o.arm(max(o.cfg.Probation, up.extendUntil.Sub(o.cfg.Now())) + Slack) // the commit is due now
			}
		}
		return
	}
	up.Preflight = PreflightFailed
	up.preflightErr = "the new binary failed its pre-flight check: " + ev.Err.Error()
	o.log.Error("pre-flight failed: rolling back", "event", "upgrade.preflight_failed", "reason", up.preflightErr, PhasePreflight, ms)
	o.do(Progress{Line: "pre-flight failed: rolling back"})
	switch {
	case up.Failed != nil, up.killed:
		// Giving up already.
	case up.Pid != 0:
		o.tell(Msg{Kind: KindAbort, Reason: up.preflightErr})
		o.arm(o.cfg.ReadyTimeout + Slack) // it must be gone by then
	default:
		// No hello yet: the new master has no workers; it is killed, and
		// one that still says hello is told to abort.
		up.killed = true
		o.do(KillTree{})
	}
}

// onQUIT: QUIT to an old (or lone) master (DESIGN §3).
func (o *OldSide) onQUIT() {
	up := o.up
	switch {
	case o.state == OldRetiring:
		// Already draining; and the operator wants it gone, so it will not
		// take the service back should the new master die.
		o.noTakeBack = true
	case up != nil && up.Serving && up.Failed == nil:
		o.log.Info("QUIT: asking the new generation to commit; this generation retires then", "event", "upgrade.commit_asked")
		o.tell(Msg{Kind: KindCommit})
		up.quitPending = true
		o.to(OldCommitting, "QUIT")
	case up != nil:
		up.quitPending = true
		o.log.Info("QUIT waits for the new generation to serve; this generation retires once it commits", "event", "upgrade.quit_pending")
	case o.state == OldSettling, o.state == OldStopping:
	default:
		o.to(OldSettling, "QUIT")
		o.log.Info("QUIT: graceful shutdown unless a USR2 arrives within the settle window", "event", "upgrade.quit_settling", "settle", QuitSettle.String())
		o.do(Arm{Timer: TimerSettle, D: QuitSettle})
	}
}

// onStopAll: every live generation ends gracefully.
func (o *OldSide) onStopAll() {
	o.noTakeBack = true
	if o.state == OldRetiring {
		return // draining already; its successor stops by the same request
	}
	if up := o.up; up != nil {
		o.stopAll = true
		if up.Pid != 0 && up.Failed == nil {
			o.tell(Msg{Kind: KindAbort})
		}
		if up.Failed != nil && !up.releaseSent {
			up.releaseSent = true
			o.tell(Msg{Kind: KindRelease})
		}
	}
	o.to(OldStopping, "every generation stops")
	o.do(Shutdown{})
}

func (o *OldSide) onWINCH() {
	up := o.up
	if up == nil || !up.Serving || up.Failed != nil {
		o.log.Warn("WINCH refused: no other generation is serving, so stopping these workers would stop the service",
			"event", "upgrade.winch_refused", "signal", "SIGWINCH")
		return
	}
	if o.standby {
		return
	}
	o.standby = true
	o.log.Info("standby: stopping this generation's workers; the new generation serves", "event", "upgrade.standby")
	if o.state == OldServingBoth {
		o.to(OldStandby, "WINCH")
	}
	o.do(StopWorkers{})
}

// resume makes this master serve again: workers a WINCH stopped are
// respawned.
func (o *OldSide) resume(why string) {
	if !o.standby || o.state == OldStopping {
		return
	}
	o.standby = false
	o.log.Info("respawning this generation's workers (it was in standby)", "event", "upgrade.standby_ended", "why", why)
	if o.state == OldStandby {
		o.to(OldServingBoth, why)
	}
	o.do(Respawn{})
}

// releaseIfServing tells a failed new master to go once this generation
// serves on its own (no gap), or at once when every generation stops.
func (o *OldSide) releaseIfServing(env Env) {
	up := o.up
	if up == nil || up.Failed == nil || up.releaseSent {
		return
	}
	if !o.stopAll && (o.standby || !env.AllReady) {
		return
	}
	up.releaseSent = true
	o.tell(Msg{Kind: KindRelease})
}

func (o *OldSide) tell(m Msg) {
	if o.up == nil {
		return
	}
	m.To = o.up.Pid
	o.do(Tell{Msg: m})
}

// arm (re)arms the deadline of the attempt; a zero d only voids it.
func (o *OldSide) arm(d time.Duration) {
	o.seq++
	o.up.seq = o.seq
	if d > 0 {
		o.do(Arm{Timer: TimerDeadline, D: d, Seq: o.seq})
	}
}

func (o *OldSide) onTimer(ev TimerFired) {
	switch ev.Timer {
	case TimerSettle:
		if o.state != OldSettling || o.up != nil {
			return
		}
		o.to(OldStopping, "no USR2 within the settle window")
		o.do(Shutdown{})
	case TimerDeadline:
		up := o.up
		if up == nil || ev.Seq != up.seq {
			return
		}
		o.log.Error("the new master did not serve in time; killing it and its workers",
			"event", "upgrade.deadline", "new_pid", up.Pid, "workers", len(up.PGIDs),
			"elapsed", o.cfg.Now().Sub(up.Started).Round(time.Millisecond).String())
		up.killed = true
		o.do(KillTree{Pid: up.Pid, PGIDs: append([]int(nil), up.PGIDs...)})
	}
}
