package master

import (
	"fmt"
	"syscall"
	"time"
)

// maxWorkers bounds TTIN: a runaway script cannot fork-bomb the host.
const maxWorkers = 1024

// selfExe is the master's own executable as the kernel holds it: it names
// the binary this generation started with even after a deploy replaced
// the file at its path (DESIGN §4, "A generation pins its executable").
const selfExe = "/proc/self/exe"

// addSlot adds one place to the pool, with the current worker spec, and
// fills it.
func (m *Master) addSlot() {
	s := &slot{n: len(m.slots), spec: m.spec}
	m.slots = append(m.slots, s)
	m.spawn(s)
}

// removeSlot drops the last slot; its worker drains and is not replaced.
func (m *Master) removeSlot() {
	s := m.slots[len(m.slots)-1]
	m.slots = m.slots[:len(m.slots)-1]
	m.retireSlot(s)
}

// retireSlot takes s out of service: no respawn, and its worker drains.
func (m *Master) retireSlot(s *slot) {
	s.removed = true
	s.seq = m.nextSeq() // voids a pending respawn
	if p := m.procs[s.pid]; p != nil {
		m.stopWorker(p) // it no longer owns a slot: its exit is not replaced
	}
	if q := m.procs[s.successor]; q != nil {
		m.stopWorker(q) // a recycling in progress ends with the slot
	}
	s.successor = 0
}

// spawn starts the worker of slot s. A failure to start counts as a crash
// of the slot: it is retried with backoff.
func (m *Master) spawn(s *slot) {
	p, err := m.launch(s)
	if err != nil {
		m.log.Error("worker start failed", "event", "worker.start_failed", "worker", s.n, "error", err)
		s.lastExit = err.Error()
		m.respawnLater(s, s.backoff.fail())
		return
	}
	s.pid = p.pid
	m.log.Info("worker started", "event", "worker.started", "worker", s.n, "pid", p.pid)
}

// launch starts a worker for slot s and watches it; the caller makes it
// the slot's worker (spawn) or its successor (recycle).
func (m *Master) launch(s *slot) (*proc, error) {
	p, err := m.sys.start(s)
	if err != nil {
		return nil, err
	}
	p.epoch = m.listenerEpoch
	m.procs[p.pid] = p
	m.sys.watch(p)
	m.reportWorkers()
	m.after(s.spec.readyTimeout, timerFired{kind: readyDeadline, pid: p.pid})
	if s.spec.readyDelay > 0 {
		m.after(s.spec.readyDelay, timerFired{kind: readyDelayOver, pid: p.pid})
	}
	return p, nil
}

// watch reaps p in a goroutine of its own and reports its exit.
func (m *Master) watch(p *proc) {
	log := m.log // the loop may replace m.log meanwhile (setLogger)
	go func() {
		state, err := p.p.Wait()
		if p.notify != nil {
			dropNotifySocket(log, p.notify)
		}
		m.send(childExited{pid: p.pid, state: state, err: err})
	}()
}

// onChildExited forgets a reaped worker and refills its slot if the
// master is running. Any exit of a worker that still holds a slot is a
// failure: the slot's backoff grows unless the worker had been healthy.
func (m *Master) onChildExited(ev childExited) {
	p := m.procs[ev.pid]
	if p == nil {
		return
	}
	delete(m.procs, ev.pid)
	if p.health != nil {
		_ = p.health.Close()
	}
	m.trafficSeries().WorkerGone(ev.pid, time.Now()) // its figures stay in the total
	m.noteWorkerDrained(p)
	if p.entry > 0 && m.accept != nil {
		m.accept.release(p.entry - 1) // siblings see it absent
	}
	m.reportWorkers()
	how := "unknown"
	if ev.state != nil {
		how = ev.state.String()
	} else if ev.err != nil {
		how = ev.err.Error()
	}
	if p.watchdogKilled {
		how = "killed by the watchdog (" + how + ")"
	}
	log := m.log.With("worker", p.slot, "pid", p.pid, "status", how, "uptime", time.Since(p.started).Round(time.Millisecond).String())
	if m.recycleExited(p, ev.state == nil || !ev.state.Success(), how, log) {
		return
	}
	s := m.slotOf(p)
	if s != nil {
		s.pid, s.lastExit = 0, how
	}
	if s == nil || !m.phase.running() || m.old.Standby() {
		log.Info("worker exited", "event", "worker.exited")
		if s == nil && m.phase.running() && (ev.state == nil || !ev.state.Success()) {
			// Even announced (STOPPING=1), a failing exit is no way to pass
			// probation.
			m.workerFailed(ExitWorkerDied, fmt.Sprintf("worker %d (pid %d) exited before the commit: %s", p.slot, p.pid, how))
		}
		m.finishIfIdle()
		return
	}
	if s.pending {
		s.pid = 0
		m.failReload(fmt.Sprintf("new worker %d (pid %d) exited: %s", p.slot, p.pid, how))
		return
	}
	if p.state == workerReady && time.Since(p.readyAt) >= healthyAfter {
		s.backoff.reset()
	}
	delay := s.backoff.fail()
	s.restarts++
	m.counters.Restarts++
	log.Error("worker exited unexpectedly; replacing it", "event", "worker.exited_unexpectedly", "restart_in", delay.String(), "restarts", s.restarts)
	m.respawnLater(s, delay)
	// A new generation has no business committing with a worker that dies.
	m.workerFailed(ExitWorkerDied, fmt.Sprintf("worker %d (pid %d) exited before the commit: %s", p.slot, p.pid, how))
}

// slotOf returns the slot p fills, or nil if p was retired (TTOU, a
// reload, or it announced STOPPING=1) and its slot removed or refilled.
func (m *Master) slotOf(p *proc) *slot {
	if s := p.s; s != nil && !s.removed && s.pid == p.pid {
		return s
	}
	return nil
}

// respawnLater refills s after delay (at once if zero).
func (m *Master) respawnLater(s *slot, delay time.Duration) {
	if delay <= 0 {
		s.restartAt = time.Time{}
		m.spawn(s)
		return
	}
	s.restartAt = time.Now().Add(delay)
	m.counters.Backoffs++
	s.seq = m.nextSeq()
	m.after(delay, timerFired{kind: respawnDue, s: s, slot: s.n, seq: s.seq})
}

// markReady records that p is ready and enters the serving phase once
// every slot has a ready worker.
func (m *Master) markReady(p *proc, how string) {
	if p.state != workerStarting {
		return
	}
	if p.spec.health.on() && !p.healthy {
		if !p.checking {
			m.startHealthCheck(p, how) // ready once it passes
		}
		return
	}
	p.state, p.readyAt = workerReady, time.Now()
	m.log.Info("worker ready", "event", "worker.ready", "worker", p.slot, "pid", p.pid, "how", how, "elapsed", p.readyAt.Sub(p.started).Round(time.Millisecond).String())
	if p.spec.watchdog > 0 {
		m.after(p.spec.watchdog, timerFired{kind: watchdogCheck, pid: p.pid})
	}
	if p.spec.lifetime > 0 {
		m.after(jitterDown(p.spec.lifetime), timerFired{kind: recycleDue, pid: p.pid})
	}
	m.takeOver(p)
	if s := m.slotOf(p); s != nil && s.pending {
		m.onReloadWorkerReady()
		return
	}
	if p.epoch < m.listenerEpoch {
		// Started before a listener was replaced (replaceUnix): it holds
		// the old socket, which nobody can connect to any more.
		m.recycle(p, "listener restored")
	}
	m.reportReady()
	if m.phase == phaseStarting && m.allReady() {
		m.setPhase(phaseServing, "every slot has a ready worker")
		m.log.Info("serving", "event", "master.serving", "workers", len(m.slots))
		m.nowServing()
	}
}

// readyCount counts ready workers in slots.
func (m *Master) readyCount() int {
	n := 0
	for _, s := range m.slots {
		if p := m.procs[s.pid]; p != nil && p.state == workerReady {
			n++
		}
	}
	return n
}

// allReady reports whether every slot (there is at least one) has a ready
// worker.
func (m *Master) allReady() bool {
	if len(m.slots) == 0 {
		return false
	}
	for _, s := range m.slots {
		if p := m.procs[s.pid]; p == nil || p.state != workerReady {
			return false
		}
	}
	return true
}

// stopWorker asks p's process group to drain and exit, and arms the drain
// deadline after which it is killed.
func (m *Master) stopWorker(p *proc) {
	if p.state == workerStopping {
		return
	}
	p.state, p.stopAt = workerStopping, time.Now()
	m.signalGroup(p, p.spec.stopSignal)
	m.after(p.spec.drainTimeout, timerFired{kind: drainDeadline, pid: p.pid})
}

// kill sends SIGKILL to p's process group and arms a deadline for the reap.
func (m *Master) kill(p *proc) {
	if p.killed {
		return
	}
	p.killed = true
	m.signalGroup(p, syscall.SIGKILL)
	m.after(killReapTimeout, timerFired{kind: killDeadline, pid: p.pid})
}

// killReapTimeout bounds the wait for a killed worker's exit; a process in
// uninterruptible sleep may take that long, and then the master gives up.
const killReapTimeout = 10 * time.Second

// signalGroup signals the worker's whole process group (its pgid is its
// pid: each worker leads its own group).
func (m *Master) signalGroup(p *proc, sig syscall.Signal) {
	if err := m.sys.signal(-p.pid, sig); err != nil && err != syscall.ESRCH {
		m.log.Warn("signal worker", "event", "worker.signal_failed", "worker", p.slot, "pid", p.pid, "signal", sig, "error", err)
	}
}
