package upgrade

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Exit codes of a molt process: the one home of every code (docs/operating.md
// "Exit codes"). The CLI exits with them, a new master that gives up before
// its commit exits with the upper ones, and an old master reads them from
// its new master's exit status (ExitReason) when no reason came over the
// channel first.
const (
	ExitOK      = 0   // stopped cleanly (QUIT, TERM, INT)
	ExitFailure = 1   // failed while running
	ExitUsage   = 2   // bad flags or values, a configuration refused, or a hidden role run by hand
	ExitBind    = 3   // a listener could not be bound
	ExitLocked  = 4   // another master holds the pid file's lock
	ExitExec    = 127 // a worker's exec trampoline could not run COMMAND

	ExitNotReady     = 10 // its workers were not all ready within the ready timeout
	ExitWorkerDied   = 11 // one of its workers exited before the commit
	ExitAborted      = 12 // told to give up: QUIT to the new master (or a stop of every generation)
	ExitNoParent     = 13 // no configuration from the old master over the channel
	ExitStoppedByOld = 14 // TERM/INT to the old master stopped both generations
	ExitPIDFile      = 15 // it could not write the pid file (a full disk, a read-only directory)
	ExitGateFailed   = 16 // its traffic failed a gate of the probation (--max-error-rate, --max-latency-factor)
	ExitHealthFailed = 17 // one of its workers failed its health check (--health-check, --health-check-cmd)
)

// exitReasons explains every exit status an old master may see from a new
// one: molt's own, and those of the CLI before the master starts.
var exitReasons = map[int]string{
	ExitFailure:      "the new master failed while starting",
	ExitUsage:        "the new binary refused its flags or configuration",
	ExitBind:         "the new master could not bind a listener",
	ExitLocked:       "the new master found the pid-file lock held",
	ExitNotReady:     "the new generation's workers were not ready in time",
	ExitWorkerDied:   "a worker of the new generation exited before the commit",
	ExitAborted:      "the new master was told to abort (QUIT)",
	ExitNoParent:     "the new master got no configuration from the old one",
	ExitStoppedByOld: "the new master was stopped with the old one",
	ExitPIDFile:      "the new master could not write the pid file",
	ExitGateFailed:   "the new generation's traffic failed a gate of its probation",
	ExitHealthFailed: "a worker of the new generation failed its health check",
}

// ExitError is what a new master that gave up before its commit ends
// with: the process exits with Code, which the old master interprets.
type ExitError struct {
	Code   int
	Reason string
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("new generation gave up (exit %d): %s", e.Code, e.Reason)
}

// FailureKind classifies how an upgrade attempt ended without a commit,
// as Handover.Upgrade reports it.
type FailureKind int

const (
	// FailedOther: an error molt does not classify (its text is the reason).
	FailedOther FailureKind = iota
	// FailedStart: the new binary could not be started at all.
	FailedStart
	// FailedExit: the new master exited with a status (Code).
	FailedExit
	// FailedSignal: the new master was killed by a signal (Signal).
	FailedSignal
)

// UpgradeError is every error Handover.Upgrade returns: tableflip's,
// classified. tableflip v1.2.3 gives no error types, only words ("can't
// start child: ...", "child pid=N exited", "child pid=N exited: exit
// status 3", "... exited: signal: killed"); classify reads them, here
// and nowhere else.
type UpgradeError struct {
	Kind   FailureKind
	Code   int    // FailedExit: the exit status
	Signal string // FailedSignal: "signal: killed"
	Err    error  // tableflip's own error
}

func (e *UpgradeError) Error() string { return "upgrade: " + e.Err.Error() }
func (e *UpgradeError) Unwrap() error { return e.Err }

// classify turns tableflip's error into an *UpgradeError.
func classify(err error) *UpgradeError {
	var ue *UpgradeError
	if errors.As(err, &ue) {
		return ue
	}
	e := &UpgradeError{Kind: FailedOther, Err: err}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "can't start child"):
		e.Kind = FailedStart
	case strings.HasSuffix(msg, "exited"):
		e.Kind, e.Code = FailedExit, 0
	case strings.Contains(msg, "exit status "):
		i := strings.LastIndex(msg, "exit status ")
		if code, cerr := strconv.Atoi(msg[i+len("exit status "):]); cerr == nil {
			e.Kind, e.Code = FailedExit, code
		}
	case strings.Contains(msg, "signal: "):
		e.Kind, e.Signal = FailedSignal, msg[strings.LastIndex(msg, "signal: "):]
	}
	return e
}

// FailureReason explains why an attempt failed: the new master's own
// report if it sent one (reported), else whether the old master killed it
// at a deadline, else its end as Upgrade returned it.
func FailureReason(reported string, killed bool, err error) string {
	if reported != "" {
		return reported
	}
	if killed {
		return fmt.Sprintf("the new master did not serve in time and was killed (%v)", err)
	}
	e := classify(err)
	switch e.Kind {
	case FailedStart:
		return "the new binary could not be started: " + e.Error()
	case FailedExit:
		if e.Code == 0 {
			return "the new master exited with status 0 before its commit"
		}
		if why, ok := exitReasons[e.Code]; ok {
			return fmt.Sprintf("%s (exit status %d)", why, e.Code)
		}
		return fmt.Sprintf("the new master exited with status %d before its commit", e.Code)
	case FailedSignal:
		return "the new master was killed by " + e.Signal + " before its commit"
	}
	return e.Error()
}

// Causes: the stable short forms of how an upgrade ended (Result.Cause),
// a small fixed set for alerts and metrics labels (docs/operating.md,
// "Metrics"). Reason is the sentence; Cause never has free text.
const (
	CauseOK            = "ok"             // committed
	CausePreflight     = "preflight"      // the new binary failed its pre-flight
	CauseDeadline      = "deadline"       // not serving in time: killed by the old master
	CauseStart         = "start"          // the new binary could not be started
	CauseSignal        = "signal"         // the new master was killed by a signal
	CauseNotReady      = "not_ready"      // ExitNotReady
	CauseWorkerDied    = "worker_died"    // ExitWorkerDied
	CauseAborted       = "aborted"        // ExitAborted: QUIT to the new master, or a stop
	CauseConfig        = "config"         // ExitUsage, ExitNoParent: flags, configuration, or none
	CauseBind          = "bind"           // ExitBind
	CauseLocked        = "locked"         // ExitLocked
	CauseStopped       = "stopped"        // ExitStoppedByOld
	CausePIDFile       = "pid_file"       // ExitPIDFile
	CauseGate          = "gate"           // ExitGateFailed: its traffic failed a gate of the probation
	CauseHealth        = "health"         // ExitHealthFailed: a new worker failed its health check
	CauseFailed        = "failed"         // any other exit
	CauseSuccessorDied = "successor_died" // taken back: the committed new master died
)

var exitCauses = map[int]string{
	ExitUsage: CauseConfig, ExitNoParent: CauseConfig, ExitBind: CauseBind, ExitLocked: CauseLocked,
	ExitNotReady: CauseNotReady, ExitWorkerDied: CauseWorkerDied, ExitAborted: CauseAborted,
	ExitStoppedByOld: CauseStopped, ExitPIDFile: CausePIDFile, ExitGateFailed: CauseGate,
	ExitHealthFailed: CauseHealth,
}

// FailureCause is the stable cause of a failed attempt, from the same
// facts as FailureReason: the new master's report (its code), whether the
// old master killed it, and Upgrade's error.
func FailureCause(reported *Msg, killed bool, err error) string {
	if reported != nil {
		if c, ok := exitCauses[reported.Code]; ok {
			return c
		}
		return CauseFailed
	}
	if killed {
		return CauseDeadline
	}
	e := classify(err)
	switch e.Kind {
	case FailedStart:
		return CauseStart
	case FailedSignal:
		return CauseSignal
	case FailedExit:
		if c, ok := exitCauses[e.Code]; ok {
			return c
		}
	}
	return CauseFailed
}
