package master

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/procfs"
	"github.com/molt-server/molt/upgrade"
	"golang.org/x/sys/unix"
)

// The generation dance (DESIGN §3, §4) is upgrade.OldSide and
// upgrade.NewSide: this file routes the master's events to them and
// carries out the actions they return. Every master has an old side (it
// may start an upgrade); a master an upgrade started also has a new side
// until it is primary.

// newUncommitted reports whether this master was started by an upgrade
// that it has not committed: the old master still decides.
func (m *Master) newUncommitted() bool { return m.new != nil && m.new.Uncommitted() }

// role is this master's place among the generations, from its sides.
func (m *Master) role() role {
	switch {
	case m.new == nil || m.new.State() == upgrade.NewPrimary:
		return rolePrimary
	case m.new.State() == upgrade.NewCommitted:
		return roleCommitted
	}
	return roleNew
}

// env is what the sides need to know of this master now.
func (m *Master) env() upgrade.Env {
	return upgrade.Env{
		Running:      m.phase.running(),
		Serving:      m.phase == phaseServing,
		AllReady:     m.allReady(),
		Reloading:    m.rl != nil,
		Workers:      len(m.slots),
		ReadyWorkers: m.readyCount(),
	}
}

// toOld feeds ev to the old side and carries out its actions; it returns
// a refusal as an error.
func (m *Master) toOld(ev upgrade.Event) error {
	err := m.act(m.old.Handle(m.env(), ev), false)
	m.noteOldResult()
	m.finishIfIdle()
	return err
}

// toNew feeds ev to the new side, if this master has one.
func (m *Master) toNew(ev upgrade.Event) error {
	if m.new == nil {
		return nil
	}
	return m.act(m.new.Handle(m.env(), ev), true)
}

// act carries out a side's actions in order; toParent says which side
// they come from (where Tell sends).
func (m *Master) act(acts []upgrade.Action, toParent bool) error {
	var refused error
	for _, a := range acts {
		switch a := a.(type) {
		case upgrade.Arm:
			m.after(a.D, timerFired{kind: upgradeTimer, ut: a.Timer, seq: a.Seq})
		case upgrade.Tell:
			if toParent {
				m.tellParent(a.Msg)
			} else {
				m.tellChild(a.Msg)
			}
		case upgrade.Shutdown:
			m.shutdown(a.Fast)
		case upgrade.SetWorkers:
			if !m.phase.running() {
				continue
			}
			for len(m.slots) < a.N {
				m.addSlot()
			}
			for len(m.slots) > a.N {
				m.removeSlot()
			}
		case upgrade.SupervisorReady:
			m.supervisorReady("%s", a.Status)
		case upgrade.Refused:
			refused = errors.New(a.Why)
		case upgrade.RunPreflight:
			m.runPreflight(a.Attempt)
		case upgrade.CancelPreflight:
			m.cancelPreflight()
		case upgrade.Begin:
			if what, err := m.beginUpgrade(a.QuitPending); err != nil {
				return m.toOld(upgrade.BeginFailed{What: what, Err: err})
			}
		case upgrade.SendConfig:
			msg := m.configMsg(a.To)
			msg.Hold = a.Hold
			if !a.Since.IsZero() {
				msg.Since = a.Since.UnixNano()
			}
			m.tellChild(msg)
			m.countersSent = nil
			m.sendCounters(a.To) // then whenever they change (publishMetrics)
		case upgrade.StopWorkers:
			for _, p := range m.procs {
				m.stopWorker(p)
			}
		case upgrade.Respawn:
			m.respawnAll()
		case upgrade.RestoreFiles:
			m.restoreFiles()
		case upgrade.Retire:
			if m.phase.running() {
				m.shutdown(false)
				m.watchSuccessor(a.Pid)
			}
		case upgrade.KillTree:
			m.killNewMaster(a.Pid, a.PGIDs)
		case upgrade.Progress:
			m.tellWatchers(CtlReply{OK: true, Message: a.Line}, false)
		case upgrade.Finish:
			m.tellWatchers(CtlReply{OK: a.OK, Done: true, Message: a.Message, Error: a.Error}, true)
		case upgrade.Commit:
			m.shutDownDropped()
			m.noteCommit() // serves the endpoint before the old master stops: no gap
			if err := m.hand.Ready(); err != nil && !m.new.ParentGone() {
				m.log.Warn("commit: the old master did not take the news; it may be gone", "error", err)
			}
		case upgrade.BecomePrimary:
			m.noteParentGone()
			// An old master that retired removed its .oldbin itself; one
			// that died (SIGKILL) could not.
			if a.ParentPid > 0 {
				if err := removePIDFile(m.pidFile.path+oldSuffix, a.ParentPid); err != nil {
					m.log.Warn("stale pid file not removed", "path", m.pidFile.path+oldSuffix, "error", err)
				}
			}
		case upgrade.Deferred:
			_ = m.onUSR2() // a refusal is logged
		}
	}
	return refused
}

// onUSR2 starts an upgrade if this master may; it returns why not.
func (m *Master) onUSR2() error {
	if m.new != nil && m.new.State() != upgrade.NewPrimary {
		return m.toNew(upgrade.SigUSR2{})
	}
	return m.toOld(upgrade.SigUSR2{})
}

// onWINCH stops this master's workers while another generation serves.
func (m *Master) onWINCH() { _ = m.toOld(upgrade.SigWINCH{}) }

// onHUP reloads; to a standby old master it respawns the workers (the
// manual rollback step).
func (m *Master) onHUP() {
	_ = m.onReload(nil) // a refusal is logged
}

// onQUIT: to an uncommitted new master it is the rollback; to any other,
// a graceful stop (DESIGN §3).
func (m *Master) onQUIT() {
	if m.newUncommitted() {
		_ = m.toNew(upgrade.SigQUIT{})
		return
	}
	_ = m.toOld(upgrade.SigQUIT{})
}

// onFastStop is TERM/INT: stop both generations fast.
func (m *Master) onFastStop() {
	if m.newUncommitted() {
		_ = m.toNew(upgrade.SigTERM{})
	}
	_ = m.toOld(upgrade.SigTERM{})
}

// onStopAll is {"cmd":"stop","all":true}: every live generation ends
// gracefully.
func (m *Master) onStopAll() {
	if m.new != nil && m.new.State() != upgrade.NewPrimary {
		_ = m.toNew(upgrade.StopAll{})
		return
	}
	_ = m.toOld(upgrade.StopAll{})
}

// onChildMsg hands a new master's report to the old side.
func (m *Master) onChildMsg(ev fromChild) {
	if ev.err != nil {
		m.log.Warn("bad message from a new master; ignored", "error", ev.err)
		return
	}
	isChild := false
	if ev.msg.Kind == upgrade.KindHello {
		ppid, _, _ := procfs.Parent(ev.msg.Pid)
		isChild = ppid == os.Getpid()
	}
	_ = m.toOld(upgrade.FromChild{Msg: ev.msg, IsChild: isChild})
}

// onParentMsg hands the old master's instruction to the new side; the
// first configuration names this generation.
func (m *Master) onParentMsg(ev fromParent) {
	if ev.err != nil {
		m.log.Warn("bad message from the old master; ignored", "error", ev.err)
		return
	}
	if ev.msg.Kind == upgrade.KindFigures || ev.msg.Kind == upgrade.KindWorkerFigures {
		switch {
		case ev.msg.To != os.Getpid():
		case ev.msg.Kind == upgrade.KindFigures:
			m.onParentFigures(ev.msg)
		default:
			m.onParentWorkerFigures(ev.msg)
		}
		return
	}
	if ev.msg.Kind == upgrade.KindMetrics {
		m.onParentCounters(ev.msg)
		return
	}
	var cfgErr error
	if msg := ev.msg; msg.Kind == upgrade.KindConfig && msg.To == os.Getpid() && !m.new.Configured() {
		m.gen, m.parentNames, m.oldWorkers = msg.Gen, msg.Names, msg.Workers
		m.setLogger(m.log.With("gen", m.gen))
		cfgErr = m.keepActivated(msg.Activated)
	}
	_ = m.toNew(upgrade.FromParent{Msg: ev.msg, ConfigErr: cfgErr})
}

// setLogger replaces the master's logger, and its sides'.
func (m *Master) setLogger(l hclog.Logger) {
	m.log = l
	m.old.SetLogger(l)
	if m.new != nil {
		m.new.SetLogger(l)
	}
}

// onDanceTimer applies a deadline of either side.
func (m *Master) onDanceTimer(ev timerFired) {
	t := upgrade.TimerFired{Timer: ev.ut, Seq: ev.seq}
	switch ev.ut {
	case upgrade.TimerDeadline, upgrade.TimerSettle:
		_ = m.toOld(t)
	default:
		_ = m.toNew(t)
	}
}

// nowServing: every slot has a ready worker, the first time since the
// master started or respawned them. A new master writes its pid file
// and tells its new side (the probation begins); any other is the
// primary and serves, which its old side may wait for (a failed new
// master's release).
func (m *Master) nowServing() {
	if m.newUncommitted() {
		_ = m.toNew(upgrade.Serving{PIDFileErr: m.pidFile.write(os.Getpid())})
		return
	}
	m.supervisorReady("serving, %d workers", len(m.slots))
	_ = m.toOld(upgrade.WorkersServing{})
}

// reportReady tells an uncommitted new side that one more worker is
// ready (it reports k of N to the old master).
func (m *Master) reportReady() { _ = m.toNew(upgrade.WorkerReady{}) }

// workerFailed tells an uncommitted new side that a worker died or was
// not ready in time: it gives up (before its commit only).
func (m *Master) workerFailed(code int, reason string) {
	_ = m.toNew(upgrade.WorkerFailed{Code: code, Reason: reason})
}

// runPreflight runs the new binary once, bounded, alongside the new
// master's start (the old side holds the commit until it passed): it adds
// no cold start of its own to the upgrade.
func (m *Master) runPreflight(attempt int) {
	path, args, log := os.Args[0], m.cfg.Preflight, m.log
	m.cancelPreflight() // an earlier attempt's, should one still run
	ctx, cancel := context.WithCancel(context.Background())
	m.stopPreflight = cancel
	m.log.Info("upgrade: pre-flight check of the new binary", "event", "upgrade.preflight", "path", path, "args", strings.Join(args, " "))
	m.tellWatchers(CtlReply{OK: true, Message: "pre-flight: " + path + " " + strings.Join(args, " ")}, false)
	go func() {
		// The run must not slow the start it runs alongside, on a busy or
		// pinned CPU: it gets what the new master and its workers leave.
		// A child inherits the nice value of the thread that forks it
		// (Linux: per thread); this goroutine keeps its thread, lowered,
		// and the runtime ends that thread with the goroutine (no Unlock).
		runtime.LockOSThread()
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), preflightNice); err != nil {
			log.Debug("pre-flight runs at the master's priority", "error", err)
		}
		out, err := preflight(ctx, path, args)
		m.send(preflightDone{attempt: attempt, out: out, err: err})
	}()
}

// cancelPreflight kills the pre-flight run, if one runs.
func (m *Master) cancelPreflight() {
	if m.stopPreflight != nil {
		m.stopPreflight()
		m.stopPreflight = nil
	}
}

// beginUpgrade moves the pid file and control socket aside and starts
// the new master through tableflip; it returns what failed.
func (m *Master) beginUpgrade(quitPending bool) (string, error) {
	if _, err := m.childChannel(); err != nil {
		return "no channel to the new master", err
	}
	if missing, err := m.pidFile.toOld(os.Getpid()); err != nil {
		return "the pid file cannot be renamed", err
	} else if missing {
		m.log.Warn("pid file missing at upgrade (deleted?): wrote its .oldbin afresh; the upgrade goes on",
			"event", "pidfile.missing", "path", m.pidFile.path, "pid_file", m.pidFile.path+oldSuffix)
	}
	if m.control != nil {
		if err := m.control.toOld(); err != nil {
			m.log.Warn("control socket not renamed; the new master's will fail", "error", err)
		}
	}
	m.supervisorReloading("upgrading: starting " + os.Args[0])
	m.log.Info("upgrade started", "event", "upgrade.started", "path", os.Args[0], "quit_pending", quitPending,
		"pid_file", m.pidFile.path+oldSuffix)
	m.tellWatchers(CtlReply{OK: true, Message: "upgrade started: " + os.Args[0]}, false)
	go func() { m.send(upgradeDone{m.hand.Upgrade()}) }()
	return "", nil
}

// restoreFiles moves the pid file and control socket back, after a
// rollback or at a take-back.
func (m *Master) restoreFiles() {
	missing, err := m.pidFile.fromOld(os.Getpid())
	switch {
	case err != nil:
		m.log.Error("pid file not restored", "event", "pidfile.restore_failed", "path", m.pidFile.path, "error", err)
	case missing:
		m.log.Warn("pid file restored by writing it afresh: there was no .oldbin to rename back",
			"event", "pidfile.rewritten", "path", m.pidFile.path)
	}
	if m.control != nil {
		if err := m.control.fromOld(); err != nil {
			m.log.Error("control socket not restored", "event", "control.restore_failed", "error", err)
		}
	}
}

// respawnAll starts a fresh worker in every slot whose worker is gone or
// stopping (the end of a standby, a rollback, a take-back): the stopping
// ones no longer hold their slot, so their exit is not a failure.
func (m *Master) respawnAll() {
	m.setPhase(phaseStarting, "workers respawned")
	for _, s := range m.slots {
		if p := m.procs[s.pid]; p == nil || p.state == workerStopping {
			s.pid = 0
		}
		s.successor, s.restartAt = 0, time.Time{}
		s.seq = m.nextSeq() // voids a respawn timer armed before
		s.backoff = backoff{}
		if s.pid == 0 && !s.removed {
			m.spawn(s)
		}
	}
}

// killNewMaster kills a new master that did not serve (or commit) in
// time, and every worker it reported; never one of this master's own
// workers, whatever it reported (treekill.go). The walk polls /proc for
// up to a few seconds: off the loop, which goes on serving meanwhile.
func (m *Master) killNewMaster(pid int, pgids []int) {
	own := map[int]bool{}
	for p := range m.procs {
		own[p] = true
	}
	if pid == 0 {
		// The new master is in this master's process group; a worker
		// (its own session) and the pre-flight run (its own session, and it
		// may still run beside the new master) are not.
		pgrp := syscall.Getpgrp()
		pid = procfs.NewMaster(os.Getpid(), func(p int) bool {
			st, ok := procfs.ReadStat(p)
			return own[p] || !ok || st.PGRP != pgrp
		})
	}
	log := m.log
	go func() {
		killed := killTree(pid, pgids, func(p int) bool { return own[p] })
		log.Info("the failed new master's processes killed", "event", "upgrade.tree_killed",
			"new_pid", pid, "killed", len(killed), "pids", fmt.Sprint(killed))
	}()
}

// tellWatchers sends a reply to every "molt ctl upgrade --wait" client;
// a final one ends them.
func (m *Master) tellWatchers(r CtlReply, final bool) {
	broadcast(m.watchers, r)
	if final {
		m.watchers = nil
	}
}

// broadcast sends r to every waiting control client: one that does not
// read loses lines, never the loop.
func broadcast(ws []chan CtlReply, r CtlReply) {
	for _, w := range ws {
		select {
		case w <- r:
		default:
		}
	}
}
