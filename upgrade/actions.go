package upgrade

import "time"

// The actions the two sides return, which the master carries out in
// order.

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

// Actions of an old master's machine, besides the common ones.
type (
	// Refused: a USR2 (or upgrade request) was refused, for Why.
	Refused struct{ Why string }
	// RunPreflight: run the new binary's pre-flight check, then feed
	// PreflightDone{Attempt}. It runs alongside the new master's start
	// (Begin follows at once); the commit waits for it.
	RunPreflight struct{ Attempt int }
	// CancelPreflight: the attempt ended while its pre-flight ran: kill
	// the run (its result no longer matters).
	CancelPreflight struct{}
	// Begin: move the pid file and control socket aside, tell the
	// supervisor, and run Handover.Upgrade (its result is UpgradeDone);
	// feed BeginFailed if any of it fails.
	Begin struct{ QuitPending bool }
	// SendConfig: send the configuration (worker count, listeners) to
	// the new master To, with Hold and Since (Msg).
	SendConfig struct {
		To    int
		Hold  bool
		Since time.Time
	}
	// StopWorkers: stop this generation's workers (standby); their exits
	// are not failures.
	StopWorkers struct{}
	// Respawn: start a fresh worker in every slot whose worker is gone or
	// stopping (the end of a standby, a rollback, a take-back).
	Respawn struct{}
	// RestoreFiles: move the pid file and control socket back.
	RestoreFiles struct{}
	// Retire: drain this generation (the new one committed) and watch
	// the successor Pid.
	Retire struct{ Pid int }
	// KillTree: kill the new master Pid (0: find it) and the worker
	// process groups it reported, never this master's own.
	KillTree struct {
		Pid   int
		PGIDs []int
	}
	// Progress is a line for "molt ctl upgrade --wait" clients.
	Progress struct{ Line string }
	// Finish is their final reply.
	Finish struct {
		OK      bool
		Message string
		Error   string
	}
)

func (Refused) action()         {}
func (RunPreflight) action()    {}
func (CancelPreflight) action() {}
func (Begin) action()           {}
func (SendConfig) action()      {}
func (StopWorkers) action()     {}
func (Respawn) action()         {}
func (RestoreFiles) action()    {}
func (Retire) action()          {}
func (KillTree) action()        {}
func (Progress) action()        {}
func (Finish) action()          {}

// Actions of a new master's machine, besides the common ones.
type (
	// Commit: close the listeners this configuration dropped and call
	// Handover.Ready: the old master's Upgrade returns nil.
	Commit struct{}
	// BecomePrimary: remove the .oldbin pid file a dead old master
	// (ParentPid) left.
	BecomePrimary struct{ ParentPid int }
	// Deferred: a USR2 deferred while the old master drained is due.
	Deferred struct{}
)

func (Commit) action()        {}
func (BecomePrimary) action() {}
func (Deferred) action()      {}
