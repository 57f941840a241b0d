package master

import (
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Recycling (Apache's MaxRequestsPerChild, gunicorn's max_requests): a
// ready worker that reached --max-worker-lifetime, or asked with
// MOLT_RECYCLE=1, is replaced without a moment of lower capacity. A
// successor starts in its slot; the old worker keeps the slot and serves
// until the successor is ready, and only then drains.

// recycleRetry is how long a recycling waits when the master is busy (a
// reload or an upgrade in flight, standby) or the successor failed.
const recycleRetry = 5 * time.Second

// jitterDown returns d less up to a tenth of it, at random, so that
// workers started together do not recycle together.
func jitterDown(d time.Duration) time.Duration {
	return d - time.Duration(rand.Int64N(int64(d/10)+1))
}

// recycle starts the successor of p, the ready worker of its slot.
func (m *Master) recycle(p *proc, why string) {
	if why == "" {
		why = "lifetime"
	}
	s := m.slotOf(p)
	if s == nil || p.state != workerReady || p.killed || s.successor != 0 || s.pending || !m.phase.running() {
		return // retired, stopping, or already being recycled
	}
	if m.rl != nil || m.old.InFlight() || m.old.Standby() {
		// A reload or an upgrade replaces the worker anyway, or the
		// generation stands by; ask again later.
		p.recycleWhy = why
		m.after(recycleRetry, timerFired{kind: recycleDue, pid: p.pid})
		return
	}
	q, err := m.launch(s)
	if err != nil {
		m.log.Error("recycling: the replacement could not be started; the worker serves on", "event", "recycle.start_failed", "worker", s.n, "pid", p.pid, "error", err)
		p.recycleWhy = why
		m.after(recycleRetry, timerFired{kind: recycleDue, pid: p.pid})
		return
	}
	s.successor = q.pid
	p.recycleWhy = why
	m.log.Info("recycling worker: its replacement starts", "event", "recycle.started", "worker", s.n, "pid", p.pid, "replacement", q.pid,
		"reason", why, "uptime", time.Since(p.started).Round(time.Millisecond).String())
}

// takeOver makes a ready successor its slot's worker and stops the one it
// replaces, which then drains.
func (m *Master) takeOver(q *proc) {
	s := q.s
	if s == nil || s.removed || s.successor != q.pid {
		return
	}
	old := m.procs[s.pid]
	s.pid, s.successor = q.pid, 0
	if old == nil {
		return
	}
	m.log.Info("worker recycled: its replacement is ready; it drains", "event", "recycle.done", "worker", s.n, "pid", old.pid, "replacement", q.pid, "reason", old.recycleWhy)
	m.stopWorker(old)
}

// recycleExited handles the exit of a worker involved in a recycling and
// reports whether it did: a successor that died before it was ready (the
// old worker serves on and the recycling is tried again later), or the
// old worker dying while its successor starts (the successor takes the
// slot at once).
func (m *Master) recycleExited(p *proc, failed bool, how string, log hclog.Logger) bool {
	s := p.s
	if s == nil || s.removed || s.successor == 0 {
		return false
	}
	if s.successor == p.pid {
		s.successor = 0
		if !m.phase.running() {
			return false // stopped with everything else
		}
		log.Error("recycling: the replacement exited before it was ready; the worker serves on", "event", "recycle.replacement_exited")
		if old := m.procs[s.pid]; old != nil {
			m.after(recycleRetry, timerFired{kind: recycleDue, pid: old.pid})
		}
		if failed {
			m.workerFailed(ExitWorkerDied, fmt.Sprintf("worker %d (pid %d) exited before the commit: %s", p.slot, p.pid, how))
		}
		return true
	}
	if s.pid != p.pid || !m.phase.running() {
		return false
	}
	s.pid, s.successor, s.lastExit = s.successor, 0, how
	s.restarts++
	m.counters.Restarts++
	log.Error("worker exited unexpectedly; its replacement, already starting, takes the slot", "event", "worker.exited_unexpectedly", "restart_in", "0s", "restarts", s.restarts)
	m.workerFailed(ExitWorkerDied, fmt.Sprintf("worker %d (pid %d) exited before the commit: %s", p.slot, p.pid, how))
	return true
}
