package upgrade

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
)

// NewState is where a new master is in the upgrade that started it.
type NewState int

const (
	// NewAwaitingConfig: said hello; waits for the old master's
	// configuration (ConfigTimeout).
	NewAwaitingConfig NewState = iota
	// NewStarting: its workers start; all must be ready within the ready
	// timeout.
	NewStarting
	// NewProbation: every worker is ready; it serves alongside the old
	// generation until the probation ends (or, manual, until QUIT to the
	// old master).
	NewProbation
	// NewGateWait: the probation is over but the new generation has not
	// served the gates' minimum of requests yet: it serves on until it
	// has, by at most MaxGateWait.
	NewGateWait
	// NewCompleting: the canary passed its probation and the gates; the
	// rest of the workers start, and the commit follows once all are
	// ready and the gates still pass (within the ready timeout).
	NewCompleting
	// NewFailing: it gave up; the old master serves again and releases
	// it, or the release deadline passes.
	NewFailing
	// NewStopping: stopped before its commit (TERM to either master).
	NewStopping
	// NewCommitted: it called Ready; the old master drains.
	NewCommitted
	// NewPrimary: committed, and the old master has exited.
	NewPrimary
)

var newStateNames = [...]string{"awaiting-config", "starting", "probation", "gates-waiting", "completing", "failing", "stopping", "committed", "primary"}

func (s NewState) String() string { return newStateNames[s] }

// NewConfig is a new master's settings of the dance.
type NewConfig struct {
	Pid          int // this master's
	Version      string
	ManualCommit bool
	ReadyTimeout time.Duration
	Probation    time.Duration
	// Gates judge the probation (gates.go); the zero value judges nothing.
	Gates Gates
	// Canary, if not zero and below the worker count, is how many workers
	// serve during the probation; the rest start once the gates pass.
	Canary int
	Now    func() time.Time // time.Now if nil
}

// NewSide is the new master's side of the dance, from its start to being
// primary.
type NewSide struct {
	cfg          NewConfig
	log          hclog.Logger
	state        NewState
	configured   bool
	parentPid    int // the old master, from its configuration
	parentGone   bool
	exit         *ExitError
	deferredUSR2 bool
	// hold: the old master's pre-flight runs; the commit waits for
	// KindPreflightOK. heldWhy is a commit that waits (its why).
	hold    bool
	heldWhy string
	started time.Time
	tl      timeline
	last    *Result
	acts    []Action
	// want is the old master's worker count; canary: this probation
	// starts Canary of them first (decided at the first configuration).
	want   int
	canary bool
	// traffic is the last figures of both generations over the probation
	// (Traffic), seen says whether any came.
	traffic Traffic
	seen    bool
	verdict string // the gates' last judgement, for ctl status
}

// NewNewSide returns the machine of a new master, in NewAwaitingConfig.
func NewNewSide(cfg NewConfig, log hclog.Logger) *NewSide {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &NewSide{cfg: cfg, log: log, started: cfg.Now()}
}

// Phases returns the milestones this side reached, from the signal the
// old master reported in its configuration (from this master's start
// until then).
func (n *NewSide) Phases() Phases { return n.tl.phases(n.started) }

// Last returns how this master's own upgrade ended (its commit), or nil.
func (n *NewSide) Last() *Result { return n.last }

// Held reports whether the commit waits for the old master's pre-flight.
func (n *NewSide) Held() bool { return n.hold }

// Start returns the first actions: the hello and the configuration's
// deadline.
func (n *NewSide) Start() []Action {
	n.tl.mark(PhaseHello, n.cfg.Now())
	n.log.Info("new master: waiting for the old master's configuration", "event", "upgrade.awaiting_config")
	return []Action{Tell{Msg: Msg{Kind: KindHello, Version: n.cfg.Version}}, Arm{Timer: TimerConfig, D: ConfigTimeout}}
}

// SetLogger replaces the logger (the master's gains fields).
func (n *NewSide) SetLogger(log hclog.Logger) { n.log = log }

// State is the machine's state.
func (n *NewSide) State() NewState { return n.state }

// Uncommitted reports whether this master has not committed: the old
// master still decides.
func (n *NewSide) Uncommitted() bool { return n.state < NewCommitted }

// Configured reports whether the old master's configuration has come.
func (n *NewSide) Configured() bool { return n.configured }

// ParentGone reports whether the old master has exited.
func (n *NewSide) ParentGone() bool { return n.parentGone }

// Exit is how this master must exit, if it gave up or was stopped with
// the old one before its commit; nil otherwise.
func (n *NewSide) Exit() *ExitError { return n.exit }

func (n *NewSide) to(s NewState, why string) {
	if s == n.state {
		return
	}
	logTransition(n.log, "new", n.state.String(), s.String(), why)
	n.state = s
}

func (n *NewSide) do(a ...Action) { n.acts = append(n.acts, a...) }

func (n *NewSide) tell(m Msg) {
	if n.parentGone {
		return
	}
	n.do(Tell{Msg: m})
}

// Handle applies ev and returns what the master must do, in order.
func (n *NewSide) Handle(env Env, ev Event) []Action {
	n.acts = nil
	switch ev := ev.(type) {
	case FromParent:
		n.onParentMsg(env, ev)
	case ParentExited:
		n.onParentExited(env)
	case Serving:
		n.onServing(env, ev.PIDFileErr)
	case WorkerFailed:
		n.fail(env, ev.Code, ev.Reason)
	case WorkerReady:
		if n.Uncommitted() {
			n.tell(Msg{Kind: KindProgress, Ready: env.ReadyWorkers, Workers: env.Workers})
		}
		if n.state == NewCompleting && env.AllReady && env.Workers >= n.want {
			n.complete(env)
		}
	case Traffic:
		n.onTraffic(env, ev)
	case WorkersChanged:
		if n.Uncommitted() {
			n.tell(Msg{Kind: KindWorkers, PGIDs: ev.PGIDs})
		}
	case SigQUIT:
		n.fail(env, ExitAborted, "QUIT to the new master before its commit")
	case SigTERM:
		if n.Uncommitted() {
			n.do(Tell{Msg: Msg{Kind: KindStop}})
			n.to(NewStopping, "TERM")
		}
	case StopAll:
		if n.Uncommitted() && !n.parentGone {
			// The old master drains; this one gives up, and the old one
			// releases it at once.
			n.tell(Msg{Kind: KindStopAll})
			n.fail(env, ExitAborted, "every generation stops (stop --all)")
			if n.state != NewFailing {
				n.do(Shutdown{}) // failing already, or stopping: end anyway
			}
		} else {
			n.do(Shutdown{}) // the only generation left, or committed
		}
	case SigUSR2:
		n.onUSR2()
	case TimerFired:
		n.onTimer(env, ev)
	}
	return n.acts
}

func (n *NewSide) onUSR2() {
	if n.Uncommitted() {
		why := "this master's own upgrade is not committed yet; send USR2 once it is primary"
		n.log.Warn("USR2 refused: "+why, "event", "upgrade.usr2_refused", "signal", "SIGUSR2", "cause", "uncommitted", "reason", why)
		n.do(Refused{Why: why})
		return
	}
	// Committed: tableflip refuses while the parent lives; its drain is
	// bounded by the drain timeout, so wait for it rather than refuse an
	// operator whose script sends USR2 right after a takeover.
	n.deferredUSR2 = true
	n.log.Info("USR2 deferred: the old generation is still draining; the upgrade starts once it has exited", "event", "upgrade.usr2_deferred")
	n.do(Progress{Line: "deferred: the upgrade starts once the old generation has exited"})
}

func (n *NewSide) onParentMsg(env Env, ev FromParent) {
	msg := ev.Msg
	if msg.To != n.cfg.Pid && !(msg.Kind == KindStop && msg.To == 0) {
		return // meant for an earlier attempt that died before reading it
	}
	switch msg.Kind {
	case KindConfig:
		n.onConfig(env, msg, ev.ConfigErr)
	case KindCommit:
		if n.state == NewProbation || n.state == NewGateWait {
			n.log.Info("the old master asks for the commit", "event", "upgrade.commit_asked")
			n.commit(env, "the old master asks for it")
		}
	case KindRelease:
		if n.state == NewFailing {
			n.log.Info("the old generation serves again; stopping this one", "event", "upgrade.released")
			n.do(Shutdown{})
		}
	case KindAbort:
		why := "the old master stops every generation"
		if msg.Reason != "" {
			why = msg.Reason // the pre-flight failed
		}
		n.fail(env, ExitAborted, why)
	case KindPreflightOK:
		if !n.hold {
			return
		}
		n.hold = false
		if why := n.heldWhy; why != "" && n.probation() {
			n.heldWhy = ""
			n.log.Info("the old master's pre-flight passed; committing", "event", "upgrade.commit_released")
			n.commit(env, why)
		}
	case KindStop:
		n.log.Info("the old master stops both generations", "event", "upgrade.stop_both")
		if n.Uncommitted() {
			n.exit = &ExitError{Code: ExitStoppedByOld, Reason: "stopped with the old master"}
			n.to(NewStopping, "stopped with the old master")
		}
		n.do(Shutdown{Fast: true})
	default:
		n.log.Debug("unknown message from the old master; ignored", "kind", msg.Kind)
	}
}

// onConfig takes the old master's worker count (at the start, and after a
// TTIN/TTOU sent to the old master during the upgrade).
func (n *NewSide) onConfig(env Env, msg Msg, err error) {
	want := max(msg.Workers, 1)
	n.want = want
	if !n.configured {
		n.configured, n.parentPid, n.hold = true, msg.Pid, msg.Hold
		n.canary = n.cfg.Canary > 0 && n.cfg.Canary < want
		if msg.Since > 0 {
			n.tl.since = time.Unix(0, msg.Since)
		}
		n.tl.mark(PhaseConfig, n.cfg.Now())
		n.log.Info("configuration from the old master", "event", "upgrade.configured", "workers", want, "ready_timeout", n.cfg.ReadyTimeout.String())
		if n.state == NewAwaitingConfig {
			n.to(NewStarting, "configuration from the old master")
		}
		n.do(Arm{Timer: TimerReady, D: n.cfg.ReadyTimeout})
		if err != nil {
			n.fail(env, ExitUsage, err.Error())
			return
		}
	}
	if !env.Running {
		return
	}
	n.do(SetWorkers{N: n.slots()})
}

// slots is how many workers this generation runs now: the canary's
// count until it passed, then the old master's.
func (n *NewSide) slots() int {
	if n.canaryStage() {
		return min(n.cfg.Canary, n.want)
	}
	return n.want
}

// canaryStage reports whether only the canary serves.
func (n *NewSide) canaryStage() bool { return n.canary && n.state < NewCompleting }

// CanaryStage reports whether only the canary serves (--canary, before
// its gates passed).
func (n *NewSide) CanaryStage() bool { return n.canaryStage() }

// probation reports whether the new generation serves, uncommitted and
// not giving up: its probation, its wait for the gates' minimum, or the
// start of the rest after the canary.
func (n *NewSide) probation() bool {
	return n.state == NewProbation || n.state == NewGateWait || n.state == NewCompleting
}

func (n *NewSide) onServing(env Env, pidErr error) {
	if n.state != NewStarting {
		return
	}
	if pidErr != nil {
		// Committing would leave no pid file naming the master that
		// serves (the old one removes its .oldbin): roll back instead,
		// and the old master renames its pid file back.
		if !n.parentGone {
			n.fail(env, ExitPIDFile, "the new master could not write the pid file: "+pidErr.Error())
			return
		}
		n.log.Error("pid file not written; this master serves on, the only generation left", "event", "pidfile.write_failed", "error", pidErr)
	}
	n.tl.mark(PhaseServing, n.cfg.Now())
	n.tell(Msg{Kind: KindServing, Workers: env.Workers})
	n.to(NewProbation, "every worker is ready")
	switch {
	case n.parentGone:
		n.log.Info("serving; the old generation is gone, so committing at once", "event", "upgrade.serving", "workers", env.Workers)
		n.commit(env, "the old generation is gone")
	case n.cfg.ManualCommit:
		n.log.Info("serving alongside the old generation; QUIT to the old master commits", "event", "upgrade.serving", "workers", env.Workers, "manual", true)
		n.do(Arm{Timer: TimerProbation, D: n.cfg.Probation})
	default:
		n.log.Info("serving alongside the old generation; probation", "event", "upgrade.serving", "workers", env.Workers, "probation", n.cfg.Probation.String(),
			"canary", n.canaryStage(), "gates", n.cfg.Gates.On())
		n.do(Arm{Timer: TimerProbation, D: n.cfg.Probation})
	}
}

func (n *NewSide) onTimer(env Env, ev TimerFired) {
	switch ev.Timer {
	case TimerConfig:
		if !n.configured {
			n.fail(env, ExitNoParent, fmt.Sprintf("no configuration from the old master within %v", ConfigTimeout))
		}
	case TimerReady:
		if n.Uncommitted() && env.Running && (!env.Serving || n.state == NewCompleting && ev.Seq == readyRest && !env.AllReady) {
			n.fail(env, ExitNotReady, fmt.Sprintf("%d of %d workers ready within the ready timeout (%v)", env.ReadyWorkers, env.Workers, n.cfg.ReadyTimeout))
		}
	case TimerProbation:
		if n.state != NewProbation || !env.Running {
			return
		}
		if n.cfg.ManualCommit {
			n.log.Info("probation over; waiting for QUIT to the old master to commit", "event", "upgrade.probation_over", "manual", true)
			return
		}
		n.log.Info("probation over", "event", "upgrade.probation_over")
		n.probationOver(env)
	case TimerGateWait:
		if n.state == NewGateWait && env.Running {
			n.judge(env, true)
		}
	case TimerRelease:
		if n.state == NewFailing && env.Running {
			n.log.Warn("no word from the old master; stopping anyway", "event", "upgrade.release_deadline")
			n.do(Shutdown{})
		}
	}
}

// commit calls Ready: the old master's Upgrade returns nil and it retires.
func (n *NewSide) commit(env Env, why string) {
	if !n.Uncommitted() {
		return
	}
	if n.canaryStage() {
		if !n.parentGone {
			n.startRest(why)
			return
		}
		// The only generation left: it commits with every worker.
		n.canary = false
		n.do(SetWorkers{N: n.want})
	}
	if n.hold && !n.parentGone {
		// The old master's pre-flight of this binary has not passed yet;
		// with the old master gone, nobody can tell, and this generation
		// is the only one left.
		if n.heldWhy == "" {
			n.log.Info("the commit waits for the old master's pre-flight", "event", "upgrade.commit_held", "why", why)
		}
		n.heldWhy = why
		return
	}
	n.hold, n.heldWhy = false, ""
	// The supervisor learns the new main pid before the old master can
	// learn of the commit (and exit).
	n.do(SupervisorReady{Status: fmt.Sprintf("serving, %d workers; upgraded", env.Workers)}, Commit{})
	n.to(NewCommitted, why)
	n.tell(Msg{Kind: KindCommitted})
	now := n.cfg.Now()
	n.tl.mark(PhaseCommitted, now)
	ph := n.Phases()
	n.last = &Result{Outcome: "committed", Cause: CauseOK, NewPID: n.cfg.Pid, At: now, Phases: ph}
	n.log.Info("upgrade committed", append([]any{"event", "upgrade.committed", "side", "new"}, ph.Fields()...)...)
	if n.parentGone {
		n.becomePrimary()
	}
}

func (n *NewSide) onParentExited(env Env) {
	n.parentGone = true
	switch {
	case n.state == NewCommitted:
		n.becomePrimary()
	case n.state == NewFailing && env.Running:
		n.log.Warn("the old generation is gone while this one was giving up: this one stays up", "event", "upgrade.parent_gone", "then", "stay up", "reason", n.exit.Reason)
		n.exit = nil
		if env.Serving {
			n.to(NewProbation, "the old generation is gone")
			n.commit(env, "the old generation is gone")
		} else {
			n.to(NewStarting, "the old generation is gone")
		}
	case n.probation():
		n.log.Warn("the old generation exited before the commit; committing now", "event", "upgrade.parent_gone", "then", "commit")
		n.commit(env, "the old generation exited")
	case n.state == NewAwaitingConfig || n.state == NewStarting:
		n.log.Warn("the old generation exited before this one serves; it commits once it serves", "event", "upgrade.parent_gone", "then", "commit once serving")
	}
}

func (n *NewSide) becomePrimary() {
	n.to(NewPrimary, "the old generation has exited")
	n.tl.mark(PhaseGone, n.cfg.Now())
	ph := n.Phases()
	if n.last != nil {
		r := *n.last // a copy: ctl status may hold the one before
		r.Phases = ph
		n.last = &r
	}
	n.log.Info("the old generation has exited; this master is primary", append([]any{"event", "upgrade.primary"}, ph.Fields()...)...)
	n.do(BecomePrimary{ParentPid: n.parentPid})
	if n.deferredUSR2 {
		n.deferredUSR2 = false
		n.do(Deferred{})
	}
}

// fail gives up on the upgrade: the old master is told why, serves again,
// and releases this master, which keeps its workers serving until then
// (bounded by the ready timeout). A new master whose parent is gone does
// not give up: it is the only generation left.
func (n *NewSide) fail(env Env, code int, reason string) {
	if !n.Uncommitted() || n.state == NewFailing || n.state == NewStopping || !env.Running {
		return
	}
	if n.parentGone {
		n.log.Error("new generation failing with no old generation left; staying up", "event", "upgrade.no_rollback", "reason", reason)
		return
	}
	n.exit = &ExitError{Code: code, Reason: reason}
	n.to(NewFailing, reason)
	n.log.Error("new generation gives up; handing back to the old one", "event", "upgrade.giving_up", "code", code, "reason", reason)
	n.tell(Msg{Kind: KindFailed, Code: code, Reason: reason})
	if code == ExitNoParent {
		n.do(Shutdown{})
		return
	}
	n.do(Arm{Timer: TimerRelease, D: n.cfg.ReadyTimeout + Slack})
}

// readyRest is the Seq of the TimerReady armed for the rest of the
// workers after the canary.
const readyRest = 1

// onTraffic takes both generations' figures over the probation: a gate
// that fails rolls back at once, without waiting for the probation's end
// (once the minimum of requests is met); a wait for that minimum ends as
// soon as the gates pass.
func (n *NewSide) onTraffic(env Env, t Traffic) {
	n.traffic, n.seen = t, true
	if !n.probation() || !n.cfg.Gates.On() || !env.Running {
		return
	}
	v, why := n.cfg.Gates.Judge(t.New, t.baseline(), n.state == NewCompleting)
	n.verdict = v.String() + ": " + why
	switch {
	case v == GateFail:
		n.gateFailed(env, why)
	case v == GatePass && n.state == NewGateWait:
		n.gatesPassed(env, why)
	}
}

// probationOver: the probation's time is served; the gates decide.
func (n *NewSide) probationOver(env Env) {
	if !n.cfg.Gates.On() {
		n.commit(env, "probation over")
		return
	}
	v, why := n.cfg.Gates.Judge(n.traffic.New, n.traffic.baseline(), false)
	switch v {
	case GateFail:
		n.gateFailed(env, why)
	case GateNoTraffic:
		n.judge(env, true)
	case GateWait:
		n.to(NewGateWait, why)
		n.log.Info("probation extended: the gates wait for more requests", "event", "upgrade.gates_waiting",
			"requests", n.traffic.New.Requests, "min_requests", n.cfg.Gates.MinRequests, "max_wait", MaxGateWait.String())
		n.tell(Msg{Kind: KindExtend, Millis: MaxGateWait.Milliseconds(), Reason: why})
		n.do(Arm{Timer: TimerGateWait, D: MaxGateWait})
	default:
		n.gatesPassed(env, why)
	}
}

// judge is the end of the wait for the minimum of requests: the gates
// judge what there is.
func (n *NewSide) judge(env Env, waive bool) {
	v, why := n.cfg.Gates.Judge(n.traffic.New, n.traffic.baseline(), waive)
	switch v {
	case GateFail:
		n.gateFailed(env, why)
	case GateWait:
	case GateNoTraffic:
		// old_requests tells an idle service from a release that accepts
		// nothing while the old generation serves on.
		n.log.Warn("the gates had no request to judge; going ahead", "event", "upgrade.gates_inconclusive", "reason", why, "waited", MaxGateWait.String(),
			"old_requests", n.traffic.Old.Requests)
		n.commit(env, "no traffic to judge within the gates' wait")
	default:
		n.gatesPassed(env, why)
	}
}

// gatesPassed: the canary's rest starts, or the commit.
func (n *NewSide) gatesPassed(env Env, why string) {
	stage := "commit"
	if n.canaryStage() {
		stage = "canary"
	}
	n.log.Info("the gates passed", "event", "upgrade.gates_passed", "stage", stage, "reason", why,
		"requests", n.traffic.New.Requests, "old_requests", n.traffic.Old.Requests, "old_workers", n.traffic.baseline().Workers)
	n.commit(env, "the gates passed")
}

// gateFailed rolls back: the old generation never stopped serving.
func (n *NewSide) gateFailed(env Env, why string) {
	old := n.traffic.baseline()
	n.log.Error("a gate failed: rolling back", "event", "upgrade.gate_failed", "reason", why,
		"requests", n.traffic.New.Requests, "errors", n.traffic.New.Errors, "p99", n.traffic.New.P99.String(),
		"old_requests", n.traffic.Old.Requests, "old_errors", n.traffic.Old.Errors, "old_p99", n.traffic.Old.P99.String(),
		"old_share", pct(old.Share), "old_baseline_p99", old.P99.String(), "old_workers", old.Workers)
	n.fail(env, ExitGateFailed, why)
}

// startRest ends the canary stage: the rest of the workers start; the
// commit follows once all are ready (complete), and the old master's
// deadline moves by the ready timeout.
func (n *NewSide) startRest(why string) {
	n.to(NewCompleting, why)
	n.log.Info("the canary passed; starting the rest of the workers", "event", "upgrade.canary_passed", "workers", n.want, "canary", n.cfg.Canary)
	n.do(SetWorkers{N: n.want}, Arm{Timer: TimerReady, D: n.cfg.ReadyTimeout, Seq: readyRest})
	n.tell(Msg{Kind: KindExtend, Millis: n.cfg.ReadyTimeout.Milliseconds(), Reason: fmt.Sprintf("the canary passed; starting the other %d workers", n.want-min(n.cfg.Canary, n.want))})
}

// complete: after the canary, every worker is ready; the gates judge
// once more (no minimum: the canary met it), and the commit follows.
func (n *NewSide) complete(env Env) {
	if !n.cfg.Gates.On() {
		n.commit(env, "every worker ready after the canary")
		return
	}
	v, why := n.cfg.Gates.Judge(n.traffic.New, n.traffic.baseline(), true)
	if v == GateFail {
		n.gateFailed(env, why)
		return
	}
	n.gatesPassed(env, why)
}

// ServingSince is when every worker of the probation (the canary's, with
// --canary) was first ready: the start of the gates' window; zero before.
func (n *NewSide) ServingSince() time.Time { return n.tl.at[PhaseServing] }

// Verdict is the gates' last judgement of the probation so far ("wait:
// new generation: 40 of the 100 requests the gates need"); "" before
// any.
func (n *NewSide) Verdict() string { return n.verdict }

// Judging reports whether the gates want Traffic events now.
func (n *NewSide) Judging() bool { return n.cfg.Gates.On() && n.probation() }
