package master

import (
	"os"
	"runtime"
	"sort"
	"time"

	"github.com/molt-server/molt/upgrade"
)

// Status is what "molt ctl status" shows: one master, as it sees itself.
// Its JSON form is the schema of "molt ctl status --json" (README).
type Status struct {
	PID        int              `json:"pid"`
	Version    string           `json:"version"`
	Gen        int              `json:"gen"`
	Role       string           `json:"role"`  // primary, new, committed
	State      string           `json:"state"` // starting, serving, reloading, upgrading, standby, probation, retiring, draining, stopping
	Started    time.Time        `json:"started"`
	Uptime     string           `json:"uptime"`
	Workers    int              `json:"workers"` // the target count
	Procs      []WorkerStatus   `json:"procs"`
	Listeners  []ListenerStatus `json:"listeners"`
	Upgrade    *UpgradeStatus   `json:"upgrade,omitempty"`      // in flight (old master, or an uncommitted new one)
	LastResult *UpgradeResult   `json:"last_upgrade,omitempty"` // the last one that ended (a new master: its own commit)
	// Keeper is the pid of the keeper the master runs under (0: none).
	Keeper int `json:"keeper_pid,omitempty"`
	// Resurrections counts the fresh masters the keeper started after a
	// master's death, up to this master's line (its own start, or that of
	// a master before it, which it inherits through upgrades);
	// ResurrectedBecause is the reason of the last.
	Resurrections      int    `json:"resurrections,omitempty"`
	ResurrectedBecause string `json:"resurrected_because,omitempty"`
	// Traffic: this generation's request figures and, on a new master
	// during its upgrade, the old generation's (traffic.go).
	Traffic []TrafficStatus `json:"traffic,omitempty"`
	// Metrics is the address of the metrics endpoint ("" if off).
	Metrics    string `json:"metrics,omitempty"`
	FDs        int    `json:"fds"`
	Goroutines int    `json:"goroutines"`
}

// WorkerStatus is one worker process.
type WorkerStatus struct {
	Slot         int        `json:"slot"` // -1: retired, draining
	PID          int        `json:"pid"`
	State        string     `json:"state"` // starting, ready, stopping
	Ready        bool       `json:"ready"`
	Uptime       string     `json:"uptime"`
	Restarts     int        `json:"restarts"`
	LastExit     string     `json:"last_exit,omitempty"`
	LastWatchdog *time.Time `json:"last_watchdog,omitempty"`
	StatusText   string     `json:"status,omitempty"` // its last STATUS=
	// Replacing is the pid of the worker a recycling's successor replaces
	// once it is ready.
	Replacing int `json:"replacing,omitempty"`
	// Failures counts the slot's consecutive failures (the crash-loop
	// backoff); RestartIn is set for a slot with no process (pid 0, state
	// "restarting") whose respawn waits for its backoff.
	Failures  int    `json:"failures,omitempty"`
	RestartIn string `json:"restart_in,omitempty"`
}

// ListenerStatus is one listening socket.
type ListenerStatus struct {
	Name      string `json:"name"`
	Network   string `json:"network"`
	Addr      string `json:"addr"`
	Inherited bool   `json:"inherited"`
	// Activated: the socket was passed by socket activation (systemd).
	Activated bool `json:"activated"`
	// Blocking: the listener has the option ",blocking" (its socket is
	// in blocking mode).
	Blocking bool `json:"blocking,omitempty"`
}

// UpgradeStatus is an upgrade in flight, as the old master follows it
// (Side "old") or as the new master, before its commit, sees it (Side
// "new").
type UpgradeStatus struct {
	Side    string `json:"side"`
	NewPID  int    `json:"new_pid"`
	Serving bool   `json:"serving"`
	Ready   int    `json:"ready"`
	Want    int    `json:"want"`
	Elapsed string `json:"elapsed"`
	// Preflight: running, passed or failed (old side; empty: none).
	Preflight string `json:"preflight,omitempty"`
	// Phases: the milestones reached so far (docs/upgrades.md).
	Phases upgrade.Phases `json:"phases,omitempty"`
	// Stage (new side): its state, e.g. probation, gates-waiting,
	// completing; Gates: the gates' last judgement, if they are on.
	Stage string `json:"stage,omitempty"`
	Gates string `json:"gates,omitempty"`
}

// UpgradeResult is how the last upgrade ended.
type UpgradeResult = upgrade.Result

// status builds the master's Status.
func (m *Master) status() *Status {
	st := &Status{
		PID: os.Getpid(), Version: m.cfg.Version, Gen: m.gen, Role: m.role().String(), State: m.stateName(),
		Started: m.started, Uptime: time.Since(m.started).Round(time.Second).String(),
		Workers: len(m.slots), Goroutines: runtime.NumGoroutine(), FDs: countFDs(),
		Keeper: keeperPID(), Resurrections: m.resurrected.count, ResurrectedBecause: m.resurrected.why,
	}
	for _, p := range m.procs {
		w := WorkerStatus{Slot: -1, PID: p.pid, State: p.state.String(), Ready: p.state == workerReady,
			Uptime: time.Since(p.started).Round(time.Second).String(), StatusText: p.status}
		if s := m.slotOf(p); s != nil {
			w.Slot, w.Restarts, w.LastExit, w.Failures = s.n, s.restarts, s.lastExit, s.backoff.failures
		} else if s := p.s; s != nil && !s.removed && s.successor == p.pid {
			w.Slot, w.Replacing = s.n, s.pid // a recycling's successor
		}
		if !p.lastPing.IsZero() {
			t := p.lastPing
			w.LastWatchdog = &t
		}
		st.Procs = append(st.Procs, w)
	}
	for _, s := range m.slots {
		if s.pid == 0 && !s.restartAt.IsZero() {
			st.Procs = append(st.Procs, WorkerStatus{Slot: s.n, State: "restarting", Restarts: s.restarts,
				LastExit: s.lastExit, Failures: s.backoff.failures,
				RestartIn: time.Until(s.restartAt).Round(time.Millisecond).String()})
		}
	}
	sort.Slice(st.Procs, func(i, j int) bool {
		a, b := st.Procs[i], st.Procs[j]
		if a.Slot != b.Slot {
			return a.Slot >= 0 && (b.Slot < 0 || a.Slot < b.Slot)
		}
		return a.PID < b.PID
	})
	st.Traffic = m.trafficStatuses()
	for _, l := range m.listeners {
		st.Listeners = append(st.Listeners, ListenerStatus{Name: l.spec.Name, Network: l.spec.Network, Addr: l.addr, Inherited: l.inherited, Activated: l.activated, Blocking: l.spec.Blocking})
	}
	if up := m.old.Attempt(); up != nil {
		st.Upgrade = &UpgradeStatus{Side: "old", NewPID: up.Pid, Serving: up.Serving, Ready: up.Ready, Want: up.Want,
			Elapsed: time.Since(up.Started).Round(time.Millisecond).String(), Preflight: up.Preflight, Phases: up.Phases()}
	} else if m.newUncommitted() {
		ph := m.new.Phases()
		st.Upgrade = &UpgradeStatus{Side: "new", NewPID: os.Getpid(), Serving: m.phase == phaseServing,
			Ready: m.readyCount(), Want: len(m.slots), Elapsed: time.Since(m.started).Round(time.Millisecond).String(), Phases: ph,
			Stage: m.new.State().String(), Gates: m.new.Verdict()}
	}
	if m.metrics != nil {
		st.Metrics = fileAddr(m.metrics.File())
	}
	st.LastResult = m.old.Last()
	if st.LastResult == nil && m.new != nil {
		st.LastResult = m.new.Last()
	}
	return st
}

// stateName is the one-word state of "molt ctl status".
func (m *Master) stateName() string {
	switch {
	case m.phase == phaseDraining && m.old.Retiring():
		return "retiring"
	case !m.phase.running():
		return m.phase.String()
	case m.old.Standby():
		return "standby"
	case m.old.InFlight():
		return "upgrading"
	case m.rl != nil:
		return "reloading"
	case m.role() == roleNew && m.phase == phaseServing:
		return "probation"
	}
	return m.phase.String()
}

// countFDs counts the master's open descriptors.
func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents) - 1 // the ReadDir's own
}
