package upgrade

// The events the two sides take (OldSide.Handle, NewSide.Handle).

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

// Events an old master's machine takes, besides the signals.
type (
	// PreflightDone is the end of the pre-flight run (RunPreflight) of
	// the attempt Attempt.
	PreflightDone struct {
		Attempt int
		Out     string
		Err     error
	}
	// BeginFailed: Begin could not start the upgrade (What failed).
	BeginFailed struct {
		What string
		Err  error
	}
	// FromChild is a message from a new master. IsChild says whether the
	// sender of a hello is a child of this master (the master asks the
	// kernel).
	FromChild struct {
		Msg     Msg
		IsChild bool
	}
	// UpgradeDone is Handover.Upgrade's result: nil is the commit.
	UpgradeDone struct{ Err error }
	// SuccessorExited: the committed new master has exited.
	SuccessorExited struct{ Pid int }
	// WorkersServing: every slot of this master has a ready worker again.
	WorkersServing struct{}
	// Scaled: this master's worker count changed (TTIN, TTOU, scale).
	Scaled struct{}
	// CtlStop is a graceful stop by control request (in order: no settle
	// window).
	CtlStop struct{}
)

func (PreflightDone) event()   {}
func (BeginFailed) event()     {}
func (FromChild) event()       {}
func (UpgradeDone) event()     {}
func (SuccessorExited) event() {}
func (WorkersServing) event()  {}
func (Scaled) event()          {}
func (CtlStop) event()         {}

// Events a new master's machine takes, besides the signals.
type (
	// FromParent is a message from the old master. ConfigErr is, for
	// the first configuration, why the master cannot take it (a socket
	// activated listener dropped or moved).
	FromParent struct {
		Msg       Msg
		ConfigErr error
	}
	// ParentExited: the old master has exited.
	ParentExited struct{}
	// Serving: every worker of this generation is ready, the first time.
	// PIDFileErr is the failure to write the pid file, if it failed.
	Serving struct{ PIDFileErr error }
	// WorkerFailed: a worker died or was not ready in time (Code says
	// which).
	WorkerFailed struct {
		Code   int
		Reason string
	}
	// WorkerReady: one more worker is ready (Env counts them).
	WorkerReady struct{}
	// WorkersChanged: this generation's worker process groups are now
	// PGIDs (the old master kills them with this one at a deadline).
	WorkersChanged struct{ PGIDs []int }
	// Traffic is both generations' figures over the probation so far
	// (from ServingSince), once a second while Judging: New and Old
	// are each generation's sum; with OldByWorker, OldWorkers are the
	// old generation's figures worker by worker, of which the gates take
	// the median (OldBaseline); without (an old master that sends no
	// per-worker figures), they take its sum.
	Traffic struct {
		New, Old    Figures
		OldWorkers  []Figures
		OldByWorker bool
	}
)

func (FromParent) event()     {}
func (ParentExited) event()   {}
func (Serving) event()        {}
func (WorkerFailed) event()   {}
func (WorkerReady) event()    {}
func (WorkersChanged) event() {}
func (Traffic) event()        {}
