package master

import (
	"context"
	"os"
	"sort"

	"github.com/molt-server/molt/upgrade"
)

// What a new master does towards its predecessor in an upgrade
// (upgrade.NewSide decides): the channel to the old master, the watch on
// its exit, the listeners the old configuration had, and the reports of
// its workers.

// attachToParent says hello to the old master and waits (in the loop) for
// its configuration; the workers start when it arrives.
func (m *Master) attachToParent() error {
	ch, err := m.hand.Parent()
	if err != nil {
		return err
	}
	m.parent = ch
	m.readChannel(ch, func(msg upgrade.Msg, err error) event { return fromParent{msg: msg, err: err} })
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
	return m.act(m.new.Start(), true)
}

// tellParent sends a message to the old master; a failure is logged (the
// old master may be gone, which WaitForParent reports).
func (m *Master) tellParent(msg upgrade.Msg) {
	if m.parent == nil || m.new.ParentGone() {
		return
	}
	msg.Pid = os.Getpid()
	if err := m.parent.Send(msg); err != nil {
		m.log.Debug("message to the old master not sent", "kind", msg.Kind, "error", err)
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
	old := m.moved
	m.moved = nil
	for _, name := range m.parentNames {
		if mine[name] {
			continue
		}
		if f, err := m.hand.InheritedListener(name); err == nil && f != nil {
			old = append(old, inheritedListener(name, f))
		}
	}
	names := make([]string, 0, len(old))
	for _, l := range old {
		m.closeListener(l)
		names = append(names, l.spec.Name)
	}
	m.unstoreListeners(names...)
}

// reportWorkers tells the new side this generation's worker process
// groups, which it reports to the old master before the commit.
func (m *Master) reportWorkers() {
	if !m.newUncommitted() {
		return
	}
	pgids := make([]int, 0, len(m.procs))
	for pid := range m.procs {
		pgids = append(pgids, pid)
	}
	sort.Ints(pgids)
	_ = m.toNew(upgrade.WorkersChanged{PGIDs: pgids})
}
