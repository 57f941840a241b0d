package master

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"

	"github.com/molt-server/molt/upgrade"
)

// fakeSys scripts the master's process operations: no processes, no
// sleeps; timers are recorded and fired by the test.
type fakeSys struct {
	nextPID int
	started []int
	signals []sentSignal
	timers  []armedTimer
}

type sentSignal struct {
	pid int
	sig syscall.Signal
}

type armedTimer struct {
	d  time.Duration
	ev timerFired
}

func newTestMaster(t *testing.T, workers int, tweak func(*Config)) (*Master, *fakeSys) {
	t.Helper()
	f := &fakeSys{nextPID: 100}
	cfg := Config{Workers: workers, Logger: hclog.NewNullLogger()}
	if tweak != nil {
		tweak(&cfg)
	}
	m := &Master{
		cfg:    cfg.withDefaults(),
		log:    hclog.NewNullLogger(),
		events: make(chan event, 16),
		done:   make(chan struct{}),
		procs:  map[int]*proc{},
	}
	m.sys = sysOps{
		start: func(s *slot) (*proc, error) {
			f.nextPID++
			f.started = append(f.started, f.nextPID)
			return &proc{pid: f.nextPID, s: s, slot: s.n, spec: s.spec, started: time.Now()}, nil
		},
		watch: func(*proc) {},
		signal: func(pid int, sig syscall.Signal) error {
			f.signals = append(f.signals, sentSignal{pid, sig})
			return nil
		},
		after: func(d time.Duration, ev event) { f.timers = append(f.timers, armedTimer{d, ev.(timerFired)}) },
	}
	m.old = upgrade.NewOldSide(upgrade.OldConfig{ReadyTimeout: m.cfg.ReadyTimeout, Probation: m.cfg.Probation}, nil)
	m.phase = phaseStarting
	m.spec = newSpec(m.cfg, nil)
	for i := 0; i < workers; i++ {
		m.addSlot()
	}
	return m, f
}

func ready(pid int) notified {
	n, _ := worker.ParseNotify([]byte(worker.NotifyReady))
	return notified{Msg: notify.Msg{Pid: pid, Fields: n}, worker: pid}
}

func exited(pid int) childExited {
	return childExited{pid: pid, err: errors.New("exit status 1")}
}

// lastTimer returns the most recent timer of kind, failing if none.
func (f *fakeSys) lastTimer(t *testing.T, kind timerKind) armedTimer {
	t.Helper()
	for i := len(f.timers) - 1; i >= 0; i-- {
		if f.timers[i].ev.kind == kind {
			return f.timers[i]
		}
	}
	t.Fatalf("no %s timer armed", timerNames[kind])
	return armedTimer{}
}

func TestLoop_ServingOnlyWhenEveryWorkerIsReady(t *testing.T) {
	m, f := newTestMaster(t, 2, nil)
	m.onNotify(ready(f.started[0]))
	if m.phase != phaseStarting {
		t.Fatalf("phase %v after 1 of 2 ready, want starting", m.phase)
	}
	m.onNotify(ready(f.started[1]))
	if m.phase != phaseServing {
		t.Fatalf("phase %v after 2 of 2 ready, want serving", m.phase)
	}
}

// TestLoop_NotifyForAWorkerGoneChangesNothing: the readers check the
// sender (notify.SpeaksFor has the table); the loop applies a message to
// the worker it was checked for, if that worker is still there.
func TestLoop_NotifyForAWorkerGoneChangesNothing(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	m.onNotify(ready(99999))
	if p := m.procs[f.started[0]]; p.state != workerStarting {
		t.Fatalf("READY=1 for another pid made worker %d %v", p.pid, p.state)
	}
	// A child of the worker (in its session) speaks for it.
	child := ready(f.started[0] + 500)
	child.worker = f.started[0]
	ack := make(chan struct{}, 1)
	child.ack = ack
	m.onNotify(child)
	if p := m.procs[f.started[0]]; p.state != workerReady {
		t.Fatalf("READY=1 from the worker's session ignored: %v", p.state)
	}
	select {
	case <-ack:
	default:
		t.Error("the reader was not told the message was applied")
	}
}

func TestLoop_CrashLoopBacksOffAndStaleTimersAreIgnored(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	first := f.started[0]
	m.onNotify(ready(first))
	m.onChildExited(exited(first))
	if len(f.started) != 2 {
		t.Fatalf("first crash: %d starts, want an immediate replacement", len(f.started))
	}
	m.onChildExited(exited(f.started[1]))
	if len(f.started) != 2 {
		t.Fatal("second consecutive crash replaced at once, want a backoff")
	}
	tm := f.lastTimer(t, respawnDue)
	if tm.d < 80*time.Millisecond || tm.d > 120*time.Millisecond {
		t.Errorf("second failure backoff %v, want ~100ms", tm.d)
	}
	stale := tm.ev
	stale.seq--
	m.onTimer(stale)
	if len(f.started) != 2 {
		t.Fatal("a stale respawn timer started a worker")
	}
	m.onTimer(tm.ev)
	if len(f.started) != 3 || m.slots[0].pid != f.started[2] || m.slots[0].restarts != 2 {
		t.Fatalf("respawn after backoff: starts=%d slot=%+v", len(f.started), m.slots[0])
	}
}

func TestLoop_ReadyTimeoutStopsAndReplacesTheWorker(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	pid := f.started[0]
	tm := f.lastTimer(t, readyDeadline)
	if tm.d != DefaultReadyTimeout || tm.ev.pid != pid {
		t.Fatalf("ready deadline %v for pid %d", tm.d, tm.ev.pid)
	}
	m.onTimer(tm.ev)
	if len(f.signals) != 1 || f.signals[0] != (sentSignal{-pid, syscall.SIGTERM}) {
		t.Fatalf("signals %v, want SIGTERM to process group %d", f.signals, pid)
	}
	m.onChildExited(exited(pid))
	if len(f.started) != 2 {
		t.Fatal("a worker stopped for not being ready was not replaced")
	}
	// A ready deadline of a worker that did become ready does nothing.
	m.onNotify(ready(f.started[1]))
	m.onTimer(f.lastTimer(t, readyDeadline).ev)
	if len(f.signals) != 1 {
		t.Fatalf("a ready worker was stopped by its old deadline: %v", f.signals)
	}
}

func TestLoop_ReadyDelayCountsAsReady(t *testing.T) {
	m, f := newTestMaster(t, 1, func(c *Config) { c.ReadyDelay = 2 * time.Second })
	tm := f.lastTimer(t, readyDelayOver)
	if tm.d != 2*time.Second {
		t.Fatalf("ready delay timer %v", tm.d)
	}
	m.onTimer(tm.ev)
	if m.phase != phaseServing {
		t.Fatalf("phase %v after the ready delay, want serving", m.phase)
	}
}

func TestLoop_TTOUKeepsOneWorkerAndRetiresTheLastSlot(t *testing.T) {
	m, f := newTestMaster(t, 2, nil)
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGTTOU}})
	if len(m.slots) != 1 || len(f.signals) != 1 || f.signals[0].pid != -f.started[1] {
		t.Fatalf("TTOU: slots=%d signals=%v, want slot 1's worker %d stopped", len(m.slots), f.signals, f.started[1])
	}
	m.onChildExited(exited(f.started[1]))
	if len(f.started) != 2 {
		t.Fatal("a worker removed by TTOU was replaced")
	}
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGTTOU}})
	if len(m.slots) != 1 {
		t.Fatal("TTOU removed the last worker")
	}
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGTTIN}})
	if len(m.slots) != 2 || len(f.started) != 3 {
		t.Fatalf("TTIN: slots=%d starts=%d", len(m.slots), len(f.started))
	}
}

func TestLoop_QuitDrainsKillsLateWorkersAndStops(t *testing.T) {
	m, f := newTestMaster(t, 2, nil)
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGQUIT}})
	// A lone master's QUIT first waits out the settle window for a USR2.
	if m.phase != phaseStarting || len(f.signals) != 0 {
		t.Fatalf("QUIT drained before the settle window: phase %v, signals %v", m.phase, f.signals)
	}
	settle := f.lastTimer(t, upgradeTimer)
	if settle.ev.ut != upgrade.TimerSettle || settle.d != upgrade.QuitSettle {
		t.Fatalf("settle window %v %v, want %v", settle.ev.ut, settle.d, upgrade.QuitSettle)
	}
	m.onTimer(settle.ev)
	if m.phase != phaseDraining || len(f.signals) != 2 {
		t.Fatalf("QUIT: phase %v, signals %v", m.phase, f.signals)
	}
	m.onChildExited(exited(f.started[0]))
	if len(f.started) != 2 {
		t.Fatal("a worker was respawned during the drain")
	}
	// The second worker overstays the drain timeout.
	var dl armedTimer
	for _, tm := range f.timers {
		if tm.ev.kind == drainDeadline && tm.ev.pid == f.started[1] {
			dl = tm
		}
	}
	if dl.d != DefaultDrainTimeout {
		t.Fatalf("drain deadline %v", dl.d)
	}
	m.onTimer(dl.ev)
	if last := f.signals[len(f.signals)-1]; last != (sentSignal{-f.started[1], syscall.SIGKILL}) {
		t.Fatalf("after the drain timeout: %v, want SIGKILL to the group", last)
	}
	m.onChildExited(exited(f.started[1]))
	if m.phase != phaseStopped {
		t.Fatalf("phase %v once every worker is gone, want stopped", m.phase)
	}
}

func TestLoop_TermKillsEveryWorkerAtOnce(t *testing.T) {
	m, f := newTestMaster(t, 2, nil)
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGQUIT}})
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGTERM}}) // a fast stop overrides a drain
	kills := 0
	for _, s := range f.signals {
		if s.sig == syscall.SIGKILL {
			kills++
		}
	}
	if m.phase != phaseStopping || kills != 2 {
		t.Fatalf("TERM: phase %v, %d SIGKILLs (signals %v)", m.phase, kills, f.signals)
	}
	m.onChildExited(exited(f.started[0]))
	m.onChildExited(exited(f.started[1]))
	if m.phase != phaseStopped {
		t.Fatalf("phase %v", m.phase)
	}
}

func TestLoop_WorkerStoppingOnItsOwnIsReplacedAtOnce(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	pid := f.started[0]
	m.onNotify(ready(pid))
	n, _ := worker.ParseNotify([]byte(worker.NotifyStopping))
	m.onNotify(notified{Msg: notify.Msg{Pid: pid, Fields: n}, worker: pid})
	if len(f.started) != 2 || m.slots[0].pid != f.started[1] {
		t.Fatalf("STOPPING=1: starts=%d, slot=%+v: want a replacement at once", len(f.started), m.slots[0])
	}
	m.onChildExited(exited(pid))
	if len(f.started) != 2 || m.slots[0].restarts != 0 {
		t.Fatalf("the announced exit counted as a crash: starts=%d slot=%+v", len(f.started), m.slots[0])
	}
}

// newReloadMaster is a test master with one (fake) listener whose
// configuration can be reloaded.
func newReloadMaster(t *testing.T, workers int) (*Master, *fakeSys) {
	spec := ListenSpec{Name: "l0", Network: "tcp", Address: "127.0.0.1:0"}
	m, f := newTestMaster(t, workers, func(c *Config) { c.Listeners = []ListenSpec{spec} })
	m.listeners = []*listener{{spec: spec}}
	for _, pid := range f.started {
		m.onNotify(ready(pid))
	}
	return m, f
}

func TestLoop_ReloadSwapsWorkersOnlyWhenTheNewOnesAreReady(t *testing.T) {
	m, f := newReloadMaster(t, 2)
	old := append([]int(nil), f.started...)
	if err := m.onReload(nil); err != nil {
		t.Fatal(err)
	}
	if len(f.started) != 4 || len(f.signals) != 0 {
		t.Fatalf("reload: %d starts, signals %v: want 2 new workers and the old ones untouched", len(f.started), f.signals)
	}
	if err := m.onReload(nil); err == nil {
		t.Error("a second reload in flight was accepted")
	}
	m.onNotify(ready(f.started[2]))
	if len(f.signals) != 0 {
		t.Fatal("old workers stopped before every new one was ready")
	}
	m.onNotify(ready(f.started[3]))
	if len(f.signals) != 2 || f.signals[0].pid != -old[0] && f.signals[0].pid != -old[1] {
		t.Fatalf("after the new workers were ready: signals %v, want the 2 old workers stopped", f.signals)
	}
	if m.rl != nil || m.slots[0].pid != f.started[2] || m.slots[1].pid != f.started[3] {
		t.Fatalf("slots %+v %+v after the reload", m.slots[0], m.slots[1])
	}
	m.onChildExited(exited(old[0]))
	m.onChildExited(exited(old[1]))
	if len(f.started) != 4 {
		t.Fatal("a drained old worker was replaced")
	}
}

func TestLoop_ReloadKeepsTheOldWorkersWhenANewOneFails(t *testing.T) {
	m, f := newReloadMaster(t, 2)
	if err := m.onReload(nil); err != nil {
		t.Fatal(err)
	}
	m.onNotify(ready(f.started[2]))
	m.onChildExited(exited(f.started[3])) // the other new worker crashes
	if m.rl != nil || m.slots[0].pid != f.started[0] || m.slots[1].pid != f.started[1] {
		t.Fatalf("after a failed reload: slots %+v %+v, want the old workers", m.slots[0], m.slots[1])
	}
	if len(f.signals) != 1 || f.signals[0].pid != -f.started[2] {
		t.Fatalf("signals %v: want only the surviving new worker stopped", f.signals)
	}
	if len(f.started) != 4 {
		t.Fatal("a failed reload respawned something")
	}
}

func TestLoop_ReloadDeadline(t *testing.T) {
	m, f := newReloadMaster(t, 1)
	if err := m.onReload(nil); err != nil {
		t.Fatal(err)
	}
	dl := f.lastTimer(t, reloadDeadline)
	m.onTimer(dl.ev)
	if m.rl != nil || m.slots[0].pid != f.started[0] {
		t.Fatal("the reload deadline did not restore the old worker")
	}
}

func TestLoop_InvalidReloadChangesNothing(t *testing.T) {
	m, f := newReloadMaster(t, 1)
	m.cfg.Reload = func() (Config, error) { return Config{}, errors.New("bad config, line 3") }
	if err := m.onReload(nil); err == nil || m.rl != nil || len(f.started) != 1 {
		t.Fatalf("an invalid configuration: err %v, reload %v, starts %d", err, m.rl, len(f.started))
	}
}

func TestLoop_WatchdogKillsAWorkerThatStopsPinging(t *testing.T) {
	m, f := newTestMaster(t, 1, func(c *Config) { c.Watchdog = time.Second })
	pid := f.started[0]
	m.onNotify(ready(pid))
	tm := f.lastTimer(t, watchdogCheck)
	if tm.d != time.Second || tm.ev.pid != pid {
		t.Fatalf("watchdog check armed for %v, pid %d", tm.d, tm.ev.pid)
	}
	// A ping in time: the check re-arms for the rest of the interval
	// after that ping instead of killing.
	p := m.procs[pid]
	p.lastPing = time.Now()
	m.onTimer(tm.ev)
	if len(f.signals) != 0 {
		t.Fatalf("a worker that pinged was signalled: %v", f.signals)
	}
	again := f.lastTimer(t, watchdogCheck)
	if again.d <= 0 || again.d > time.Second {
		t.Fatalf("re-armed for %v, want within the interval", again.d)
	}
	// No ping for a whole interval: SIGKILL to the group, then a replacement.
	p.lastPing = time.Now().Add(-2 * time.Second)
	p.readyAt = p.lastPing
	m.onTimer(again.ev)
	if len(f.signals) != 1 || f.signals[0] != (sentSignal{-pid, syscall.SIGKILL}) {
		t.Fatalf("signals %v, want SIGKILL to group %d", f.signals, pid)
	}
	m.onChildExited(exited(pid))
	if len(f.started) != 2 {
		t.Fatal("the killed worker was not replaced")
	}
	if got := m.slots[0].lastExit; got != "killed by the watchdog (exit status 1)" {
		t.Errorf("last exit %q", got)
	}
}

func TestLoop_WatchdogLeavesStoppingWorkersToTheDrainTimeout(t *testing.T) {
	m, f := newTestMaster(t, 1, func(c *Config) { c.Watchdog = time.Second })
	pid := f.started[0]
	m.onNotify(ready(pid))
	tm := f.lastTimer(t, watchdogCheck)
	m.procs[pid].readyAt = time.Now().Add(-time.Hour)
	m.stopWorker(m.procs[pid])
	m.onTimer(tm.ev)
	for _, s := range f.signals {
		if s.sig == syscall.SIGKILL {
			t.Fatalf("a draining worker was killed by the watchdog: %v", f.signals)
		}
	}
}

func notifyOf(pid int, text string) notified {
	n, err := worker.ParseNotify([]byte(text))
	if err != nil {
		panic(err)
	}
	return notified{Msg: notify.Msg{Pid: pid, Fields: n}, worker: pid}
}

// TestLoop_RecyclingKeepsCapacity: a worker due for recycling keeps its
// slot until its successor is ready; only then is it asked to stop, and
// its exit is not a failure.
func TestLoop_RecyclingKeepsCapacity(t *testing.T) {
	m, f := newTestMaster(t, 1, func(c *Config) { c.MaxWorkerLifetime = time.Minute })
	old := f.started[0]
	m.onNotify(ready(old))
	tm := f.lastTimer(t, recycleDue)
	if tm.d > time.Minute || tm.d < 54*time.Second || tm.ev.pid != old {
		t.Fatalf("recycle due in %v for pid %d, want 54s-60s for %d", tm.d, tm.ev.pid, old)
	}
	m.onTimer(tm.ev)
	if len(f.started) != 2 || len(f.signals) != 0 || m.slots[0].pid != old {
		t.Fatalf("after the lifetime: starts %v, signals %v, slot pid %d", f.started, f.signals, m.slots[0].pid)
	}
	succ := f.started[1]
	if st := m.status(); len(st.Procs) != 2 || st.Procs[1].Replacing != old || st.Procs[1].Slot != 0 {
		t.Errorf("status during the recycling: %+v", st.Procs)
	}
	m.onTimer(tm.ev) // a second request while one is in progress does nothing
	m.onNotify(notifyOf(old, worker.NotifyRecycle))
	if len(f.started) != 2 {
		t.Fatal("a second successor was started")
	}
	m.onNotify(ready(succ))
	if m.slots[0].pid != succ || len(f.signals) != 1 || f.signals[0] != (sentSignal{-old, syscall.SIGTERM}) {
		t.Fatalf("after the successor is ready: slot pid %d, signals %v", m.slots[0].pid, f.signals)
	}
	m.onChildExited(childExited{pid: old})
	if len(f.started) != 2 || m.slots[0].restarts != 0 {
		t.Fatalf("the recycled worker's exit: starts %v, restarts %d", f.started, m.slots[0].restarts)
	}
}

func TestLoop_RecyclingSurvivesEitherSideDying(t *testing.T) {
	// The successor dies before it is ready: the old worker serves on and
	// the recycling is tried again later.
	m, f := newTestMaster(t, 1, nil)
	old := f.started[0]
	m.onNotify(ready(old))
	m.onNotify(notifyOf(old, worker.NotifyRecycle))
	succ := f.started[1]
	m.onChildExited(exited(succ))
	if m.slots[0].pid != old || m.slots[0].successor != 0 || len(f.started) != 2 {
		t.Fatalf("successor died: slot %+v, starts %v", m.slots[0], f.started)
	}
	retry := f.lastTimer(t, recycleDue)
	if retry.d != recycleRetry || retry.ev.pid != old {
		t.Fatalf("retry %v for %d", retry.d, retry.ev.pid)
	}
	m.onTimer(retry.ev)
	if len(f.started) != 3 {
		t.Fatal("the recycling was not tried again")
	}
	// The old worker dies while the successor starts: the successor takes
	// the slot, and no third worker is started.
	m.onChildExited(exited(old))
	if m.slots[0].pid != f.started[2] || m.slots[0].successor != 0 || len(f.started) != 3 || m.slots[0].restarts != 1 {
		t.Fatalf("old worker died: slot %+v, starts %v", m.slots[0], f.started)
	}
}

func TestLoop_RecyclingWaitsForAReload(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	old := f.started[0]
	m.onNotify(ready(old))
	m.rl = &reload{}
	m.onNotify(notifyOf(old, worker.NotifyRecycle))
	if len(f.started) != 1 {
		t.Fatal("a recycling started during a reload")
	}
	if tm := f.lastTimer(t, recycleDue); tm.ev.pid != old || m.procs[old].recycleWhy != "requested by the worker" {
		t.Fatalf("no retry armed: %+v", tm)
	}
}

// TestLoop_AHealthyRunResetsTheBackoff: after a run of crashes, a worker
// that was ready for healthyAfter and then dies is replaced at once.
func TestLoop_AHealthyRunResetsTheBackoff(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	for range 4 {
		m.onChildExited(exited(f.started[len(f.started)-1]))
		if m.slots[0].pid == 0 {
			m.onTimer(f.lastTimer(t, respawnDue).ev)
		}
	}
	if m.slots[0].backoff.failures != 4 {
		t.Fatalf("failures %d, want 4", m.slots[0].backoff.failures)
	}
	if st := m.status(); len(st.Procs) != 1 || st.Procs[0].Failures != 4 {
		t.Errorf("status: %+v", st.Procs)
	}
	pid := f.started[len(f.started)-1]
	m.onNotify(ready(pid))
	m.procs[pid].readyAt = time.Now().Add(-healthyAfter)
	n := len(f.started)
	m.onChildExited(exited(pid))
	if len(f.started) != n+1 || m.slots[0].backoff.failures != 1 {
		t.Fatalf("after a healthy run: starts %d (want %d), failures %d (want 1)", len(f.started), n+1, m.slots[0].backoff.failures)
	}
	// And a crash right after a short run backs off again, visibly.
	m.onChildExited(exited(f.started[len(f.started)-1]))
	st := m.status()
	if len(st.Procs) != 1 || st.Procs[0].State != "restarting" || st.Procs[0].RestartIn == "" || st.Procs[0].Failures != 2 {
		t.Errorf("status during the backoff: %+v", st.Procs)
	}
}

// TestLoop_ListenersAreHealed: a listener a worker shut down or switched
// to blocking mode listens again, at the same address and non-blocking,
// at the next check, and the workers (whose servers ended) are recycled.
// Both a port the kernel picked and a port given explicitly.
func TestLoop_ListenersAreHealed(t *testing.T) {
	picked := ListenSpec{Name: "web", Network: "tcp", Address: "127.0.0.1:0"}
	f, err := bind(picked, 0)
	if err != nil {
		t.Fatal(err)
	}
	free, _ := localAddr(f)
	f.Close()
	for _, spec := range []ListenSpec{picked, {Name: "web", Network: "tcp", Address: free}} {
		m, f := newTestMaster(t, 1, nil)
		file, err := bind(spec, 0)
		if err != nil {
			t.Fatalf("bind %s: %v", spec, err)
		}
		defer file.Close()
		addr, _ := localAddr(file)
		m.listeners = append(m.listeners, &listener{spec: spec, file: file, addr: addr})
		pid := f.started[0]
		m.onNotify(ready(pid))
		fd, err := rawFD(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
			t.Fatal(err)
		}
		if err := unix.SetNonblock(fd, false); err != nil {
			t.Fatal(err)
		}
		m.checkListeners()
		if acc, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); acc != 1 {
			t.Errorf("%s: the listener does not listen again", spec)
		}
		if now, _ := localAddr(file); now != addr {
			t.Errorf("%s: the listener listens again at %s, want %s", spec, now, addr)
		}
		if c, err := net.DialTimeout("tcp", addr, 5*time.Second); err != nil {
			t.Errorf("%s: dial after the repair: %v", spec, err)
		} else {
			c.Close()
		}
		if fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 {
			t.Errorf("%s: the listener is still in blocking mode", spec)
		}
		if len(f.started) != 2 || m.slots[0].successor != f.started[1] {
			t.Errorf("%s: the worker was not recycled: starts %v, slot %+v", spec, f.started, m.slots[0])
		}
		if tm := f.lastTimer(t, listenerCheck); tm.d != listenerCheckEvery {
			t.Errorf("next check in %v", tm.d)
		}
		// A check with nothing wrong changes nothing.
		m.checkListeners()
		if len(f.started) != 2 {
			t.Errorf("%s: a healthy check started workers", spec)
		}
	}
}

// TestLoop_WorkersStoppingRightAfterStartBackOff: an app that says
// STOPPING=1 as soon as it starts is not restarted in a tight loop.
func TestLoop_WorkersStoppingRightAfterStartBackOff(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	stopping, _ := worker.ParseNotify([]byte(worker.NotifyStopping))
	for i := range 3 {
		pid := f.started[len(f.started)-1]
		m.onNotify(notified{Msg: notify.Msg{Pid: pid, Fields: stopping}, worker: pid})
		if i == 0 && len(f.started) != 2 {
			t.Fatal("the first self-stop was not replaced at once")
		}
		if i > 0 {
			tm := f.lastTimer(t, respawnDue)
			if tm.d <= 0 {
				t.Fatalf("self-stop %d: respawn in %v, want a backoff", i+1, tm.d)
			}
			m.onTimer(tm.ev)
		}
	}
}

// TestLoop_StateChangesCarryEventKeys: the loop's lines of a start, a
// crash and a refused scale carry their stable event keys and fields
// (docs/operating.md lists them; operators alert on them).
func TestLoop_StateChangesCarryEventKeys(t *testing.T) {
	m, f := newTestMaster(t, 2, nil)
	var buf bytes.Buffer
	m.log = hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true, Level: hclog.Debug})
	m.onNotify(ready(f.started[0]))
	m.onNotify(ready(f.started[1]))
	m.onChildExited(exited(f.started[0]))
	m.scale(-1)
	m.scale(-1)
	var got []map[string]any
	for _, line := range bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n")) {
		var l map[string]any
		if err := json.Unmarshal(line, &l); err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		got = append(got, l)
	}
	want := []struct {
		event  string
		fields map[string]any
	}{
		{"worker.ready", map[string]any{"worker": 0.0, "pid": float64(f.started[0]), "how": "notify"}},
		{"worker.ready", map[string]any{"worker": 1.0, "pid": float64(f.started[1])}},
		{"master.phase", map[string]any{"from": "starting", "to": "serving"}},
		{"master.serving", map[string]any{"workers": 2.0}},
		{"worker.exited_unexpectedly", map[string]any{"worker": 0.0, "pid": float64(f.started[0]), "status": "exit status 1", "restart_in": "0s", "restarts": 1.0}},
		{"worker.started", map[string]any{"worker": 0.0, "pid": float64(f.started[2])}},
		{"pool.scaled", map[string]any{"workers": 1.0}},
		{"pool.scale_refused", map[string]any{"reason": "minimum", "delta": -1.0, "workers": 1.0}},
	}
	if len(got) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(got), len(want), buf.String())
	}
	for i, w := range want {
		if got[i]["event"] != w.event {
			t.Errorf("line %d: event %v, want %s", i, got[i]["event"], w.event)
		}
		for k, v := range w.fields {
			if got[i][k] != v {
				t.Errorf("line %d (%s): %s = %v, want %v", i, w.event, k, got[i][k], v)
			}
		}
	}
}

// TestLoop_RespawnAllRefillsEverySlotOnce: the end of a standby, a
// rollback from it, and a take-back start one fresh worker in every slot
// whose worker is gone or stopping; a stopping one's later exit is no
// failure of its slot, and a ready one is kept.
func TestLoop_RespawnAllRefillsEverySlotOnce(t *testing.T) {
	m, f := newTestMaster(t, 3, nil)
	for _, pid := range f.started {
		m.markReady(m.procs[pid], "test")
	}
	stopping, gone, kept := f.started[0], f.started[1], f.started[2]
	m.stopWorker(m.procs[stopping])
	m.slots[1].pid = 0
	delete(m.procs, gone)
	m.respawnAll()
	if m.phase != phaseStarting || len(f.started) != 5 {
		t.Fatalf("phase %v, %d starts, want starting and 2 fresh workers", m.phase, len(f.started))
	}
	if m.slots[2].pid != kept {
		t.Fatalf("slot 2 holds %d, want its ready worker %d kept", m.slots[2].pid, kept)
	}
	m.onChildExited(exited(stopping))
	if len(f.started) != 5 || m.slots[0].restarts != 0 {
		t.Fatalf("the stopping worker's exit counted: %d starts, %d restarts", len(f.started), m.slots[0].restarts)
	}
}
