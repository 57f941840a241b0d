package master

import (
	"os"

	"github.com/molt-server/molt/upgrade"
)

// The generation dance (DESIGN §3): what WINCH, HUP, QUIT and TERM mean to
// a master by its role. USR2 is onUSR2 (oldside.go).

// onWINCH stops this master's workers while another generation serves.
func (m *Master) onWINCH() {
	up := m.old.up
	if m.role == roleNew || up == nil || !up.serving || up.failed != nil {
		m.log.Warn("WINCH refused: no other generation is serving, so stopping these workers would stop the service",
			"signal", "SIGWINCH", "role", m.role.String())
		return
	}
	if m.old.standby {
		return
	}
	m.old.standby = true
	m.log.Info("standby: stopping this generation's workers; the new generation serves", "workers", len(m.procs))
	for _, p := range m.procs {
		m.stopWorker(p)
	}
}

// onHUP reloads; to a standby old master it respawns the workers (the
// manual rollback step).
func (m *Master) onHUP() {
	_ = m.onReload(nil) // a refusal is logged
}

// onQUIT applies QUIT by role (DESIGN §3).
func (m *Master) onQUIT() {
	switch {
	case m.role == roleNew:
		m.fail(ExitAborted, "QUIT to the new master before its commit")
	case m.old.retiring:
		// Already draining; and the operator wants it gone, so it will not
		// take the service back should the new master die.
		m.old.noTakeBack = true
	case m.old.up != nil && m.old.up.serving && m.old.up.failed == nil:
		m.log.Info("QUIT: asking the new generation to commit; this generation retires then")
		m.tellChild(upgrade.Msg{Kind: upgrade.KindCommit})
		m.old.up.quitPending = true
	case m.old.up != nil:
		m.old.up.quitPending = true
		m.log.Info("QUIT waits for the new generation to serve; this generation retires once it commits")
	case m.old.settling:
	default:
		m.old.settling = true
		m.log.Info("QUIT: graceful shutdown unless a USR2 arrives within the settle window", "settle", quitSettle.String())
		m.after(quitSettle, timerFired{kind: quitSettled})
	}
}

// onQuitSettled drains a master whose QUIT was not followed by a USR2.
func (m *Master) onQuitSettled() {
	if !m.old.settling || m.old.up != nil {
		return
	}
	m.old.settling = false
	m.shutdown(false)
}

// onFastStop is TERM/INT: stop both generations fast.
func (m *Master) onFastStop() {
	if m.role == roleNew && m.new.parent != nil {
		_ = m.new.parent.Send(upgrade.Msg{Kind: upgrade.KindStop, Pid: os.Getpid()})
	}
	if up := m.old.up; up != nil {
		m.tellChild(upgrade.Msg{Kind: upgrade.KindStop})
		// If it does not go by itself, kill it and its workers.
		m.armUpgradeDeadline(killReapTimeout)
	}
	m.shutdown(true)
}
