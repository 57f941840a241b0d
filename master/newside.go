package master

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"github.com/molt-server/molt/upgrade"
)

// The new master's side of an upgrade (DESIGN §4): it reports to the old
// master over the channel, runs as many workers as the old one runs,
// serves alongside it for the probation, and commits by calling Ready.
// Any failure before the commit ends with this master exiting without
// Ready (and without Stop): the old one rolls back, having served
// throughout.

// configTimeout bounds the wait for the old master's configuration.
const configTimeout = 10 * time.Second

// newSide is the new master's state before (and around) its commit.
type newSide struct {
	parent     *upgrade.Channel
	parentPid  int // the old master, from its configuration
	configured bool
	parentGone bool
	failing    *ExitError // gave up; waits for the old master's release
	// deferredUSR2: a USR2 arrived after the commit while the old master
	// still drained; the upgrade starts once it has exited.
	deferredUSR2 bool
	// parentNames: the old master's listener names (its configuration).
	parentNames []string
	// moved: inherited listeners whose name this configuration moved to
	// another address; closed at the commit.
	moved []*listener
}

// attachToParent says hello to the old master and waits (in the loop) for
// its configuration; the workers start when it arrives.
func (m *Master) attachToParent() error {
	ch, err := m.hand.Parent()
	if err != nil {
		return err
	}
	m.new.parent = ch
	go func() {
		for {
			msg, err := ch.Recv()
			if errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) {
				return // the old master's exit is reported by WaitForParent
			}
			if !m.send(fromParent{msg: msg, err: err}) {
				return
			}
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-m.done
		cancel()
	}()
	log := m.log // not m.log in the goroutine: onConfig replaces it
	go func() {
		if err := m.hand.WaitForParent(ctx); ctx.Err() == nil {
			if err != nil {
				log.Warn("the old master exited uncleanly", "error", err)
			}
			m.send(parentExited{})
		}
	}()
	m.tellParent(upgrade.Msg{Kind: upgrade.KindHello, Version: m.cfg.Version})
	m.after(configTimeout, timerFired{kind: configDeadline})
	m.log.Info("new master: waiting for the old master's configuration")
	return nil
}

// tellParent sends a message to the old master; a failure is logged (the
// old master may be gone, which WaitForParent reports).
func (m *Master) tellParent(msg upgrade.Msg) {
	if m.new.parent == nil || m.new.parentGone {
		return
	}
	msg.Pid = os.Getpid()
	if err := m.new.parent.Send(msg); err != nil {
		m.log.Debug("message to the old master not sent", "kind", msg.Kind, "error", err)
	}
}

// onParentMsg applies the old master's instructions.
func (m *Master) onParentMsg(ev fromParent) {
	if ev.err != nil {
		m.log.Warn("bad message from the old master; ignored", "error", ev.err)
		return
	}
	msg := ev.msg
	if msg.To != os.Getpid() && !(msg.Kind == upgrade.KindStop && msg.To == 0) {
		return // meant for an earlier attempt that died before reading it
	}
	switch msg.Kind {
	case upgrade.KindConfig:
		m.onConfig(msg)
	case upgrade.KindCommit:
		if m.role == roleNew && m.phase == phaseServing && m.new.failing == nil {
			m.log.Info("the old master asks for the commit")
			m.commit()
		}
	case upgrade.KindRelease:
		if m.new.failing != nil {
			m.log.Info("the old generation serves again; stopping this one")
			m.shutdown(false)
		}
	case upgrade.KindStop:
		m.log.Info("the old master stops both generations")
		if m.role == roleNew {
			m.exitErr = &ExitError{Code: ExitStoppedByOld, Reason: "stopped with the old master"}
		}
		m.shutdown(true)
	default:
		m.log.Debug("unknown message from the old master; ignored", "kind", msg.Kind)
	}
}

// onConfig takes the old master's worker count (at the start, and after a
// TTIN/TTOU sent to the old master during the upgrade).
func (m *Master) onConfig(msg upgrade.Msg) {
	want := max(msg.Workers, 1)
	if !m.new.configured {
		m.new.configured = true
		m.gen, m.new.parentPid, m.new.parentNames = msg.Gen, msg.Pid, msg.Names
		m.log = m.log.With("gen", m.gen)
		m.log.Info("configuration from the old master", "workers", want, "ready_timeout", m.cfg.ReadyTimeout.String())
		m.after(m.cfg.ReadyTimeout, timerFired{kind: newReadyDeadline})
		if err := m.keepActivated(msg.Activated); err != nil {
			m.fail(exitConfig, err.Error())
			return
		}
	}
	if !m.phase.running() {
		return
	}
	for len(m.slots) < want {
		m.addSlot()
	}
	for len(m.slots) > want {
		m.removeSlot()
	}
}

// keepActivated marks the inherited listeners that came from socket
// activation, and refuses a configuration that dropped or moved one.
func (m *Master) keepActivated(names []string) error {
	for _, name := range names {
		var kept *listener
		for _, l := range m.listeners {
			if l.spec.Name == name {
				kept = l
			}
		}
		if kept == nil || !kept.inherited {
			l := &listener{spec: ListenSpec{Name: name}, addr: "its old address"}
			if f, err := m.hand.InheritedListener(name); err == nil && f != nil {
				l = inheritedListener(name, f)
				_ = f.Close()
			}
			return activatedDropped(l)
		}
		kept.activated = true
	}
	return nil
}

// onNewServing: every worker of the new generation is ready.
func (m *Master) onNewServing() {
	if err := m.pidFile.write(os.Getpid()); err != nil {
		// Committing would leave no pid file naming the master that
		// serves (the old one removes its .oldbin): roll back instead,
		// and the old master renames its pid file back.
		if !m.new.parentGone {
			m.fail(ExitPIDFile, "the new master could not write the pid file: "+err.Error())
			return
		}
		m.log.Error("pid file not written; this master serves on, the only generation left", "error", err)
	}
	m.tellParent(upgrade.Msg{Kind: upgrade.KindServing, Workers: len(m.slots)})
	switch {
	case m.new.parentGone:
		m.log.Info("serving; the old generation is gone, so committing at once", "workers", len(m.slots))
		m.commit()
	case m.cfg.ManualCommit:
		m.log.Info("serving alongside the old generation; QUIT to the old master commits", "workers", len(m.slots))
		m.after(m.cfg.Probation, timerFired{kind: probationOver})
	default:
		m.log.Info("serving alongside the old generation; probation", "workers", len(m.slots), "probation", m.cfg.Probation.String())
		m.after(m.cfg.Probation, timerFired{kind: probationOver})
	}
}

// onProbationOver commits in automatic mode.
func (m *Master) onProbationOver() {
	if m.role != roleNew || m.new.failing != nil || !m.phase.running() {
		return
	}
	if m.cfg.ManualCommit {
		m.log.Info("probation over; waiting for QUIT to the old master to commit")
		return
	}
	m.commit()
}

// commit calls Ready: the old master's Upgrade returns nil and it retires.
func (m *Master) commit() {
	if m.role != roleNew {
		return
	}
	// The supervisor learns the new main pid before the old master can
	// learn of the commit (and exit).
	m.supervisorReady("serving, %d workers; upgraded", len(m.slots))
	m.shutDownDropped()
	if err := m.hand.Ready(); err != nil && !m.new.parentGone {
		m.log.Warn("commit: the old master did not take the news; it may be gone", "error", err)
	}
	m.role = roleCommitted
	m.tellParent(upgrade.Msg{Kind: upgrade.KindCommitted})
	m.log.Info("upgrade committed")
	if m.new.parentGone {
		m.becomePrimary()
	}
}

// shutDownDropped closes, at the commit, the old generation's listeners
// this configuration dropped or moved (closeListener: they stop listening
// in every process, unix paths are removed): from now on only this
// generation serves, and a client must be refused rather than queued
// where nobody accepts any more.
func (m *Master) shutDownDropped() {
	mine := map[string]bool{}
	for _, l := range m.listeners {
		mine[l.spec.Name] = true
	}
	old := m.new.moved
	m.new.moved = nil
	for _, name := range m.new.parentNames {
		if mine[name] {
			continue
		}
		if f, err := m.hand.InheritedListener(name); err == nil && f != nil {
			old = append(old, inheritedListener(name, f))
		}
	}
	for _, l := range old {
		m.closeListener(l)
	}
}

// onParentExited: the old master has exited.
func (m *Master) onParentExited() {
	m.new.parentGone = true
	switch {
	case m.role == roleCommitted:
		m.becomePrimary()
	case m.role == roleNew && m.new.failing != nil && m.phase.running():
		m.log.Warn("the old generation is gone while this one was giving up: this one stays up", "reason", m.new.failing.Reason)
		m.new.failing, m.exitErr = nil, nil
		if m.phase == phaseServing {
			m.commit()
		}
	case m.role == roleNew && m.phase == phaseServing:
		m.log.Warn("the old generation exited before the commit; committing now")
		m.commit()
	case m.role == roleNew:
		m.log.Warn("the old generation exited before this one serves; it commits once it serves")
	}
}

// becomePrimary: committed and the old master gone.
func (m *Master) becomePrimary() {
	m.role = rolePrimary
	m.log.Info("the old generation has exited; this master is primary")
	// An old master that retired removed its .oldbin itself; one that died
	// (SIGKILL) could not.
	if m.new.parentPid > 0 {
		if err := removePIDFile(m.pidFile.path+oldSuffix, m.new.parentPid); err != nil {
			m.log.Warn("stale pid file not removed", "path", m.pidFile.path+oldSuffix, "error", err)
		}
	}
	if m.new.deferredUSR2 {
		m.new.deferredUSR2 = false
		_ = m.onUSR2(false) // a refusal is logged
	}
}

// fail gives up on the upgrade: the old master is told why, serves again,
// and releases this master, which keeps its workers serving until then
// (bounded by the ready timeout). A new master whose parent is gone does
// not give up: it is the only generation left.
func (m *Master) fail(code int, reason string) {
	if m.role != roleNew || m.new.failing != nil || !m.phase.running() {
		return
	}
	if m.new.parentGone {
		m.log.Error("new generation failing with no old generation left; staying up", "reason", reason)
		return
	}
	m.new.failing = &ExitError{Code: code, Reason: reason}
	m.exitErr = m.new.failing
	m.log.Error("new generation gives up; handing back to the old one", "code", code, "reason", reason)
	m.tellParent(upgrade.Msg{Kind: upgrade.KindFailed, Code: code, Reason: reason})
	if code == ExitNoParent {
		m.shutdown(false)
		return
	}
	m.after(m.cfg.ReadyTimeout+upgradeSlack, timerFired{kind: releaseDeadline})
}

// onReleaseDeadline stops a failed new master the old one never released.
func (m *Master) onReleaseDeadline() {
	if m.new.failing != nil && m.phase.running() {
		m.log.Warn("no word from the old master; stopping anyway")
		m.shutdown(false)
	}
}

// reportWorkers tells the old master this generation's worker process
// groups, so that at a deadline it can kill them with this master.
func (m *Master) reportWorkers() {
	if m.role != roleNew {
		return
	}
	pgids := make([]int, 0, len(m.procs))
	for pid := range m.procs {
		pgids = append(pgids, pid)
	}
	sort.Ints(pgids)
	m.tellParent(upgrade.Msg{Kind: upgrade.KindWorkers, PGIDs: pgids})
}

// onNewReadyDeadline: the new generation must serve by now.
func (m *Master) onNewReadyDeadline() {
	if m.role == roleNew && m.phase == phaseStarting {
		ready := 0
		for _, p := range m.procs {
			if p.state == workerReady {
				ready++
			}
		}
		m.fail(ExitNotReady, fmt.Sprintf("%d of %d workers ready within the ready timeout (%v)", ready, len(m.slots), m.cfg.ReadyTimeout))
	}
}
