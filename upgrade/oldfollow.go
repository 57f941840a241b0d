package upgrade

import (
	"fmt"
	"time"
)

// The old side follows its new master: the reports that come over the
// channel, the end of the attempt (Upgrade's result: the commit or the
// rollback), and, after the commit, the successor's death (take-back).

// onChildMsg follows the new master's reports.
func (o *OldSide) onChildMsg(env Env, ev FromChild) {
	up, msg := o.up, ev.Msg
	if up == nil {
		if msg.Kind == KindStopping && msg.Pid != 0 && msg.Pid == o.successor && !o.noTakeBack {
			o.noTakeBack = true
			o.log.Info("the new master stops on purpose; this generation will not take the service back", "event", "upgrade.successor_stopping", "new_pid", msg.Pid)
		}
		return // from an attempt that has ended
	}
	if msg.Kind == KindHello && up.Pid == 0 {
		// A hello still queued from an attempt that died must not be
		// taken for this one's: the sender must be a child of ours.
		if !ev.IsChild {
			o.log.Debug("hello from a process that is no child of this master; ignored", "pid", msg.Pid)
			return
		}
		up.Pid = msg.Pid
		up.tl.mark(PhaseHello, o.cfg.Now())
		o.log.Info("new master started", "event", "upgrade.new_master", "new_pid", msg.Pid, "version", msg.Version, PhaseHello, up.Phases()[PhaseHello])
		o.do(Progress{Line: fmt.Sprintf("new master started: pid %d, version %s", msg.Pid, msg.Version)})
		switch {
		case o.stopAll:
			o.tell(Msg{Kind: KindAbort})
		case up.Preflight == PreflightFailed:
			o.tell(Msg{Kind: KindAbort, Reason: up.preflightErr})
		default:
			o.sendConfig()
		}
		return
	}
	if msg.Pid != up.Pid {
		return // from an earlier attempt
	}
	log := o.log.With("new_pid", up.Pid)
	switch msg.Kind {
	case KindWorkers:
		up.PGIDs = msg.PGIDs
	case KindProgress:
		up.Ready, up.Want = msg.Ready, msg.Workers
		log.Info("new generation: workers ready", "event", "upgrade.progress", "ready", msg.Ready, "want", msg.Workers)
		o.do(Progress{Line: fmt.Sprintf("new generation: %d of %d workers ready", msg.Ready, msg.Workers)})
	case KindServing:
		if up.Failed != nil || up.Serving {
			return
		}
		up.Serving = true
		up.tl.mark(PhaseServing, o.cfg.Now())
		o.to(OldServingBoth, "the new generation serves")
		if o.cfg.ManualCommit {
			o.arm(0)
			log.Info("new generation serving; both generations serve until QUIT to the old master (commit) or to the new one (rollback)",
				"event", "upgrade.serving", "workers", msg.Workers, "manual", true)
			// A deploy script waits no longer: the commit is the operator's.
			o.do(Finish{OK: true, Message: fmt.Sprintf(
				"new generation serving (pid %d); manual commit: QUIT to the old master (pid %d) commits, QUIT to the new one rolls back", up.Pid, o.cfg.Pid)})
		} else {
			if up.Preflight == PreflightRunning {
				// The commit waits for the pre-flight, which is bounded
				// and whose end arms the deadline of the commit.
				o.arm(0)
			} else {
				o.arm(o.cfg.Probation + Slack)
			}
			log.Info("new generation serving; probation", "event", "upgrade.serving", "workers", msg.Workers, "probation", o.cfg.Probation.String(),
				PhaseServing, up.Phases()[PhaseServing])
			o.do(Progress{Line: fmt.Sprintf("new generation serving; probation %v", o.cfg.Probation)})
		}
		if up.quitPending {
			log.Info("QUIT pending: asking the new generation to commit now", "event", "upgrade.commit_asked")
			o.tell(Msg{Kind: KindCommit})
			o.to(OldCommitting, "a QUIT was pending")
		}
	case KindExtend:
		if !up.Serving || up.Failed != nil || msg.Millis <= 0 {
			return
		}
		d := time.Duration(min(msg.Millis, MaxExtend.Milliseconds())) * time.Millisecond
		up.extendUntil = o.cfg.Now().Add(d)
		log.Info("new generation: probation extended", "event", "upgrade.extended", "by", d.String(), "reason", msg.Reason)
		o.do(Progress{Line: fmt.Sprintf("probation extended by %v: %s", d, msg.Reason)})
		if !o.cfg.ManualCommit && up.Preflight != PreflightRunning {
			o.arm(d + Slack)
		}
	case KindCommitted:
		up.tl.mark(PhaseCommitted, o.cfg.Now())
		log.Info("new generation committed", "event", "upgrade.new_committed")
	case KindFailed:
		if up.Failed != nil {
			return
		}
		f := msg
		up.Failed = &f
		log.Error("new generation gave up", "event", "upgrade.new_gave_up", "code", msg.Code, "reason", msg.Reason)
		if o.state != OldStopping {
			o.to(OldRollingBack, "the new generation gave up")
		}
		o.resume("the new generation gave up")
		o.releaseIfServing(env)
	case KindStop:
		log.Info("the new master was told to stop fast; stopping this generation too", "event", "upgrade.stop_both")
		o.noTakeBack = true
		o.to(OldStopping, "TERM to the new master")
		o.do(Shutdown{Fast: true})
	case KindStopAll:
		log.Info("the new master was asked to stop every generation; this one drains", "event", "upgrade.stop_all")
		o.stopAll, o.noTakeBack = true, true
		o.to(OldStopping, "every generation stops")
		o.do(Shutdown{})
		o.releaseIfServing(env)
	default:
		log.Debug("unknown message from the new master; ignored", "kind", msg.Kind)
	}
}

func (o *OldSide) onUpgradeDone(env Env, err error) {
	up := o.up
	o.up = nil
	if up == nil {
		return
	}
	if up.Preflight == PreflightRunning {
		o.do(CancelPreflight{})
	}
	now := o.cfg.Now()
	elapsed := now.Sub(up.Started).Round(time.Millisecond).String()
	if err == nil {
		up.tl.mark(PhaseCommitted, now)
		ph := up.Phases()
		o.last = &Result{Outcome: "committed", Cause: CauseOK, NewPID: up.Pid, At: now, Phases: ph}
		o.to(OldRetiring, "the new generation committed")
		o.log.Info("upgrade committed; this generation retires", append([]any{"event", "upgrade.committed", "side", "old", "new_pid", up.Pid, "elapsed", elapsed}, ph.Fields()...)...)
		o.do(Finish{OK: true, Message: fmt.Sprintf("committed: the new master (pid %d) serves; this one retires", up.Pid)})
		if env.Running && up.Pid > 0 {
			o.successor = up.Pid
			o.do(Retire{Pid: up.Pid})
		} else if env.Running {
			o.do(Retire{})
		}
		return
	}
	reported := ""
	if up.Failed != nil {
		reported = up.Failed.Reason
	}
	reason := FailureReason(reported, up.killed, err)
	cause := FailureCause(up.Failed, up.killed, err)
	if up.preflightErr != "" {
		reason, cause = up.preflightErr, CausePreflight
	}
	up.tl.mark(PhaseRolledBack, now)
	ph := up.Phases()
	o.last = &Result{Outcome: "rolled back", Reason: reason, Cause: cause, NewPID: up.Pid, At: now, Phases: ph}
	o.do(RestoreFiles{}, Finish{Error: "rolled back: " + reason})
	if !env.Running {
		// Both generations are stopping (TERM/INT): the end is expected.
		o.log.Info("the new master has stopped too", append([]any{"event", "upgrade.new_stopped", "new_pid", up.Pid, "reason", reason}, ph.Fields()...)...)
		o.to(OldStopping, "the new master has stopped too")
		return
	}
	o.to(OldIdle, "rolled back")
	o.log.Error("upgrade failed; rolled back: this generation keeps serving",
		append([]any{"event", "upgrade.rolled_back", "new_pid", up.Pid, "reason", reason, "cause", cause, "elapsed", elapsed}, ph.Fields()...)...)
	o.do(SupervisorReady{Status: fmt.Sprintf("serving, %d workers; upgrade rolled back: %s", env.Workers, reason)})
	if up.quitPending {
		o.log.Error("QUIT cancelled: the upgrade it waited for failed; send QUIT again to stop this generation", "event", "upgrade.quit_cancelled")
	}
	o.resume("rolled back")
}

// onSuccessorExited takes the service back if the committed new master
// died while this generation still drains (DESIGN §4's residual hole).
func (o *OldSide) onSuccessorExited(pid int) {
	if pid == 0 || pid != o.successor {
		return
	}
	o.successor = 0
	switch {
	case o.state != OldRetiring:
		return
	case o.noTakeBack:
		o.log.Info("the new master has exited; this generation goes on draining", "event", "upgrade.successor_exited", "new_pid", pid)
		return
	}
	o.last = &Result{Outcome: "taken back", Reason: fmt.Sprintf("the new master (pid %d) died after its commit", pid), Cause: CauseSuccessorDied, NewPID: pid, At: o.cfg.Now()}
	o.to(OldTookBack, "the successor died after its commit")
	o.log.Error("the new master died after its commit while this generation drained; this master takes the service back with new workers",
		"event", "upgrade.took_back", "new_pid", pid)
	o.do(RestoreFiles{}, Respawn{})
}

// sendConfig sends the configuration to the new master; it holds the
// commit while the pre-flight runs.
func (o *OldSide) sendConfig() {
	up := o.up
	up.tl.mark(PhaseConfig, o.cfg.Now())
	o.do(SendConfig{To: up.Pid, Hold: up.Preflight == PreflightRunning, Since: up.Started})
}
