package master

import (
	"fmt"
	"os"

	"github.com/molt-server/molt/upgrade"
)

// onCtl answers a control request; replies never block the loop.
func (m *Master) onCtl(ev ctlEvent) {
	reply := func(r CtlReply) {
		select {
		case ev.replies <- r:
		default:
		}
	}
	ok := func(msg string) { reply(CtlReply{OK: true, Done: true, Message: msg}) }
	fail := func(err error) { reply(CtlReply{Done: true, Error: err.Error()}) }
	m.log.Info("control request", "event", "control.request", "cmd", ev.req.Cmd)
	switch ev.req.Cmd {
	case "status":
		reply(CtlReply{OK: true, Done: true, Status: m.status()})
	case "upgrade":
		if ev.req.Wait {
			m.watchers = append(m.watchers, ev.replies)
		}
		if err := m.onUSR2(); err != nil {
			m.dropWatcher(ev.replies)
			fail(err)
			return
		}
		if !ev.req.Wait {
			ok("upgrade started; follow it with molt ctl status, or use --wait")
		}
	case "reload":
		var w chan CtlReply
		if ev.req.Wait {
			w = ev.replies
		}
		if err := m.onReload(w); err != nil {
			fail(err)
			return
		}
		if !ev.req.Wait || m.rl == nil { // a standby's respawn has no wait
			ok("reload started")
		}
	case "scale":
		if err := m.setWorkers(ev.req.Workers); err != nil {
			fail(err)
			return
		}
		ok(fmt.Sprintf("workers: %d", len(m.slots)))
	case "stop":
		how := map[bool]string{true: "fast", false: "graceful"}[ev.req.Fast]
		if ev.req.All {
			how = "every generation, graceful"
		}
		ok(fmt.Sprintf("stopping master %d (%s)", os.Getpid(), how))
		switch {
		case ev.req.Fast:
			m.onFastStop()
		case ev.req.All:
			m.onStopAll()
		case m.newUncommitted():
			m.onQUIT()
		default:
			// Requests come in order: no settle window for a USR2 that
			// might have been reordered (that is only for signals).
			_ = m.toOld(upgrade.CtlStop{})
		}
	case "reopen-logs":
		m.reopenLogs()
		ok("log file reopened (if any)")
	}
}

// dropWatcher forgets a watcher whose upgrade did not start.
func (m *Master) dropWatcher(c chan CtlReply) {
	for i, w := range m.watchers {
		if w == c {
			m.watchers = append(m.watchers[:i], m.watchers[i+1:]...)
			return
		}
	}
}

// setWorkers sets the worker count exactly (molt ctl scale N).
func (m *Master) setWorkers(n int) error {
	if m.role() == roleNew {
		return fmt.Errorf("this master's upgrade is not committed: scale the old master (molt ctl --old scale)")
	}
	if !m.phase.running() {
		return fmt.Errorf("the master is shutting down")
	}
	for len(m.slots) < n {
		m.scale(+1)
	}
	for len(m.slots) > n {
		m.scale(-1)
	}
	return nil
}
