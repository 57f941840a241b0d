package master

import (
	"fmt"
	"syscall"
	"time"

	"github.com/molt-server/molt/upgrade"
)

// onSignals applies a batch in the table's order (signals.go), each by
// this master's role (DESIGN §3).
func (m *Master) onSignals(ev signalBatch) {
	for _, sig := range ev.sigs {
		a, ok := lookupSignal(sig)
		if !ok {
			continue
		}
		log := m.log.With("signal", unixName(a.sig), "action", a.action)
		if !m.phase.running() && a.sig != syscall.SIGTERM && a.sig != syscall.SIGINT && a.sig != syscall.SIGUSR1 {
			log.Info("signal ignored: the master is shutting down", "event", "signal.ignored", "state", m.phase.String())
			continue
		}
		log.Info("signal received", "event", "signal.received", "role", m.role().String())
		switch a.sig {
		case syscall.SIGTERM, syscall.SIGINT:
			m.onFastStop()
		case syscall.SIGUSR2:
			_ = m.onUSR2() // a refusal is logged
		case syscall.SIGHUP:
			m.onHUP()
		case syscall.SIGWINCH:
			m.onWINCH()
		case syscall.SIGQUIT:
			m.onQUIT()
		case syscall.SIGUSR1:
			m.reopenLogs()
		case syscall.SIGTTIN:
			m.scale(+1)
		case syscall.SIGTTOU:
			m.scale(-1)
		}
	}
}

// scale adds or removes one worker. During an upgrade the old master's
// count is the one that counts: the new master follows it.
func (m *Master) scale(delta int) {
	name := map[int]string{1: "TTIN", -1: "TTOU"}[delta]
	switch {
	case m.role() == roleNew:
		m.log.Warn(name+" refused: during an upgrade send it to the old master; the new one follows its count", "event", "pool.scale_refused", "delta", delta, "reason", "upgrade")
		return
	case m.rl != nil:
		m.log.Warn(name+" refused: a reload is in flight; retry once it has ended", "event", "pool.scale_refused", "delta", delta, "reason", "reload")
		return
	case delta > 0 && len(m.slots) >= maxWorkers:
		m.log.Warn(name+" refused: at the maximum", "event", "pool.scale_refused", "delta", delta, "reason", "maximum", "workers", len(m.slots), "max", maxWorkers)
		return
	case delta < 0 && len(m.slots) <= 1:
		m.log.Warn(name+" refused: one worker is the minimum; send QUIT to stop the master", "event", "pool.scale_refused", "delta", delta, "reason", "minimum", "workers", len(m.slots))
		return
	}
	if delta > 0 {
		if m.old.Standby() {
			m.slots = append(m.slots, &slot{n: len(m.slots), spec: m.spec}) // filled when the standby ends
		} else {
			m.addSlot()
		}
	} else {
		m.removeSlot()
	}
	m.log.Info("worker count changed", "event", "pool.scaled", "workers", len(m.slots))
	_ = m.toOld(upgrade.Scaled{})
}

func (m *Master) reopenLogs() {
	if m.cfg.Output == nil {
		m.log.Info("no log file to reopen: molt logs to stderr (give --log-file)", "event", "log.reopen_skipped")
		return
	}
	if err := m.cfg.Output.Reopen(); err != nil {
		m.log.Error("log file not reopened; logging continues to the old file", "event", "log.reopen_failed", "error", err)
		return
	}
	m.log.Info("log file reopened; running workers keep the file they started with", "event", "log.reopened")
}

// onNotify applies one notify message for worker ev.worker, from a
// sender in its session (readNotify checked it). The reader reads the
// worker's next datagram only once this one is applied, so a BARRIER=1
// (whose descriptor the kernel closed when the reader took it) still
// follows every message sent before it.
func (m *Master) onNotify(ev notified) {
	if ev.ack != nil {
		defer func() { ev.ack <- struct{}{} }()
	}
	p := m.procs[ev.worker]
	if p == nil && ev.stats != nil && m.trafficSeries().Knows(ev.worker) {
		// Its final report, read before its exit was.
		m.applyStats(ev.worker, -1, *ev.stats)
	}
	if p == nil {
		m.log.Debug("notify message for a worker already gone; ignored", "event", "notify.worker_gone", "pid", ev.Pid, "worker_pid", ev.worker)
		return
	}
	if ev.stats != nil {
		m.applyStats(p.pid, p.slot, *ev.stats)
	}
	msg := ev.Fields
	if msg.Is("READY", "1") {
		m.markReady(p, "notify")
	}
	if v, ok := msg.Get("STATUS"); ok {
		p.status = v
		m.log.Debug("worker status", "event", "worker.status", "worker", p.slot, "pid", p.pid, "status", v)
	}
	if msg.Is("WATCHDOG", "1") {
		p.lastPing = time.Now()
	}
	if msg.Is("STOPPING", "1") {
		m.onWorkerStopping(p)
	}
	if msg.Is("MOLT_RECYCLE", "1") {
		m.recycle(p, "requested by the worker")
	}
	if ev.FDsDiscarded && !msg.Is("BARRIER", "1") {
		m.log.Debug("fds passed with a notify message discarded: molt keeps no fd store", "event", "notify.fds_discarded", "pid", ev.Pid)
	}
}

// onWorkerStopping handles a worker that announced STOPPING=1 without
// being asked: it leaves its slot, which is refilled at once, and it has
// the drain timeout to exit. Its exit is no crash; but a worker that
// stops itself before it was healthy counts towards the slot's backoff,
// or an app that quits right after starting would be restarted in a
// tight loop (the first such stop is still replaced at once).
func (m *Master) onWorkerStopping(p *proc) {
	if p.state == workerStopping {
		return
	}
	healthy := p.state == workerReady && time.Since(p.readyAt) >= healthyAfter
	p.state, p.stopAt = workerStopping, time.Now()
	m.after(p.spec.drainTimeout, timerFired{kind: drainDeadline, pid: p.pid})
	s := m.slotOf(p)
	if s == nil || !m.phase.running() {
		return
	}
	if s.successor != 0 { // being recycled: the replacement is already starting
		m.log.Info("worker is stopping on its own; its replacement is already starting", "event", "worker.stopping", "worker", p.slot, "pid", p.pid)
		s.pid, s.successor = s.successor, 0
		return
	}
	if healthy {
		s.backoff.reset()
	}
	delay := s.backoff.fail()
	m.log.Info("worker is stopping on its own; starting its replacement", "event", "worker.stopping", "worker", p.slot, "pid", p.pid, "restart_in", delay.String())
	s.pid = 0
	m.respawnLater(s, delay)
}

// onTimer applies a timer if what it was armed for still holds.
func (m *Master) onTimer(ev timerFired) {
	if m.onUpgradeTimer(ev) {
		return
	}
	if ev.kind == listenerCheck {
		m.checkListeners()
		return
	}
	if ev.kind == respawnDue {
		if s := ev.s; s != nil && s.seq == ev.seq && !s.removed && s.pid == 0 && m.phase.running() {
			s.restartAt = time.Time{}
			m.spawn(s)
		}
		return
	}
	p := m.procs[ev.pid]
	if p == nil {
		return
	}
	switch ev.kind {
	case readyDeadline:
		if s := m.slotOf(p); p.state == workerStarting && s != nil && s.pending {
			m.failReload(fmt.Sprintf("new worker %d (pid %d) not ready within %v", p.slot, p.pid, p.spec.readyTimeout))
			return
		}
		if p.state == workerStarting {
			m.log.Error("worker not ready in time; stopping it", "event", "worker.not_ready",
				"worker", p.slot, "pid", p.pid, "ready_timeout", p.spec.readyTimeout.String(),
				"hint", "an app that never sends READY=1 needs --ready=delay:DUR")
			m.stopWorker(p)
			m.workerFailed(ExitNotReady, fmt.Sprintf("worker %d (pid %d) not ready within the ready timeout (%v)", p.slot, p.pid, p.spec.readyTimeout))
		}
	case readyDelayOver:
		m.markReady(p, "delay")
	case drainDeadline:
		m.log.Warn("worker still running after the drain timeout; killing it", "event", "worker.drain_timeout", "worker", p.slot, "pid", p.pid, "drain_timeout", p.spec.drainTimeout.String())
		m.kill(p)
	case watchdogCheck:
		m.checkWatchdog(p)
	case recycleDue:
		m.recycle(p, p.recycleWhy)
	case killDeadline:
		m.log.Error("worker not reaped after SIGKILL; giving up on it", "event", "worker.not_reaped", "worker", p.slot, "pid", p.pid)
		delete(m.procs, p.pid)
		m.finishIfIdle()
	}
}

// checkWatchdog kills a ready worker that has not pinged within its
// watchdog interval (counted from its READY=1 until the first ping), as
// systemd's WatchdogSec does; else it checks again when the interval
// since the last ping ends. The kill is a failure of the slot: it is
// replaced, with the crash-loop backoff.
func (m *Master) checkWatchdog(p *proc) {
	if p.state != workerReady || p.killed {
		return // stopping: the drain timeout bounds it now
	}
	last := p.readyAt
	if p.lastPing.After(last) {
		last = p.lastPing
	}
	due := last.Add(p.spec.watchdog)
	if wait := time.Until(due); wait > 0 {
		m.after(wait, timerFired{kind: watchdogCheck, pid: p.pid})
		return
	}
	m.log.Error("worker watchdog expired: no WATCHDOG=1 in time; killing it (SIGKILL)", "event", "watchdog.expired",
		"worker", p.slot, "pid", p.pid, "watchdog", p.spec.watchdog.String(),
		"since_last_ping", time.Since(last).Round(time.Millisecond).String())
	p.watchdogKilled = true
	m.kill(p)
}

// onUpgradeTimer applies the upgrade's timers, and the reload's.
func (m *Master) onUpgradeTimer(ev timerFired) bool {
	switch ev.kind {
	case upgradeTimer:
		m.onDanceTimer(ev)
	case reloadDeadline:
		if r := m.rl; r != nil && r.seq == ev.seq {
			ready := 0
			for _, s := range r.slots {
				if p := m.procs[s.pid]; p != nil && p.state == workerReady {
					ready++
				}
			}
			m.failReload(fmt.Sprintf("%d of %d new workers ready within %v", ready, len(r.slots), r.spec.readyTimeout))
		}
	default:
		return false
	}
	return true
}

// unixName is "SIGTERM" for SIGTERM.
func unixName(s syscall.Signal) string { return "SIG" + signalName(s) }
