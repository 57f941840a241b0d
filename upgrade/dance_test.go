package upgrade

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The dance's unit tests: both sides' machines, wired to each other
// through a scripted handover (as tableflip's own tests fake the child
// process): a Tell of one side is the other's next message, Begin starts
// a new side, Commit makes the old side's Upgrade return nil, and a new
// master that shuts down exits with its code, which Upgrade reports in
// tableflip's words. Nothing sleeps: deadlines fire when a test says so.

const (
	oldPid = 100
	newPid = 200
)

type armed struct {
	side  string
	timer Timer
	d     time.Duration
	seq   int
}

type world struct {
	t          *testing.T
	old        *OldSide
	oenv       Env
	new        *NewSide
	nenv       Env
	queue      []func()
	timers     []armed
	acts       []string // every action carried out, "old:Shutdown{Fast:true}"
	committed  bool
	newExited  bool
	upgradeRun bool
	finals     []Finish
	cfg        OldConfig
	ncfg       NewConfig
	logger     hclog.Logger // nil: none
	clock      time.Time    // both sides' fake clock; tick advances it
}

// tick advances the fake clock.
func (w *world) tick(d time.Duration) { w.clock = w.clock.Add(d) }

func newWorld(t *testing.T, tweak func(*OldConfig, *NewConfig)) *world {
	w := &world{t: t,
		cfg:   OldConfig{Pid: oldPid, ReadyTimeout: 10 * time.Second, Probation: 5 * time.Second},
		ncfg:  NewConfig{Pid: newPid, Version: "v2", ReadyTimeout: 10 * time.Second, Probation: 5 * time.Second},
		oenv:  Env{Running: true, Serving: true, AllReady: true, Workers: 2, ReadyWorkers: 2},
		clock: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	now := func() time.Time { return w.clock }
	w.cfg.Now, w.ncfg.Now = now, now
	if tweak != nil {
		tweak(&w.cfg, &w.ncfg)
	}
	w.old = NewOldSide(w.cfg, w.logger)
	return w
}

// toOld and toNew feed an event now and run the queue to the end.
func (w *world) toOld(ev Event) { w.enqueueOld(ev); w.run() }
func (w *world) toNew(ev Event) { w.enqueueNew(ev); w.run() }

func (w *world) enqueueOld(ev Event) {
	w.queue = append(w.queue, func() { w.doOld(w.old.Handle(w.oenv, ev)) })
}

func (w *world) enqueueNew(ev Event) {
	w.queue = append(w.queue, func() {
		if w.new != nil && !w.newExited {
			w.doNew(w.new.Handle(w.nenv, ev))
		}
	})
}

func (w *world) run() {
	for i := 0; len(w.queue) > 0; i++ {
		if i > 1000 {
			w.t.Fatal("the two sides talk forever")
		}
		f := w.queue[0]
		w.queue = w.queue[1:]
		f()
	}
}

func (w *world) record(side string, a Action) {
	w.acts = append(w.acts, fmt.Sprintf("%s:%T%+v", side, a, a))
}

func (w *world) doOld(acts []Action) {
	for _, a := range acts {
		w.record("old", a)
		switch a := a.(type) {
		case Arm:
			w.timers = append(w.timers, armed{"old", a.Timer, a.D, a.Seq})
		case Begin:
			w.upgradeRun = true
			w.new = NewNewSide(w.ncfg, w.logger)
			w.nenv = Env{Running: true}
			w.doNew(w.new.Start())
		case Tell:
			w.enqueueNew(FromParent{Msg: a.Msg})
		case SendConfig:
			w.enqueueNew(FromParent{Msg: Msg{Kind: KindConfig, To: a.To, Workers: w.oenv.Workers, Pid: oldPid, Gen: 2,
				Hold: a.Hold, Since: a.Since.UnixNano()}})
		case StopWorkers:
			w.oenv.AllReady, w.oenv.ReadyWorkers = false, 0
		case Respawn:
			w.oenv.Running, w.oenv.Serving, w.oenv.AllReady, w.oenv.ReadyWorkers = true, false, false, 0
		case Shutdown:
			w.oenv.Running, w.oenv.Serving = false, false
		case Retire:
			w.oenv.Running, w.oenv.Serving = false, false
		case KillTree:
			w.newExit(errors.New("child pid=200 exited: signal: killed"))
		case Finish:
			w.finals = append(w.finals, a)
		}
	}
}

func (w *world) doNew(acts []Action) {
	for _, a := range acts {
		w.record("new", a)
		switch a := a.(type) {
		case Arm:
			w.timers = append(w.timers, armed{"new", a.Timer, a.D, a.Seq})
		case Tell:
			m := a.Msg
			m.Pid = newPid
			if !w.new.ParentGone() {
				w.enqueueOld(FromChild{Msg: m, IsChild: true})
			}
		case SetWorkers:
			w.nenv.Workers = a.N
		case Shutdown:
			w.nenv.Running, w.nenv.Serving = false, false
			code := 0
			if e := w.new.Exit(); e != nil {
				code = e.Code
			}
			if w.committed {
				w.newExited = true
				w.enqueueOld(SuccessorExited{Pid: newPid})
			} else if code == 0 {
				w.newExit(errors.New("child pid=200 exited"))
			} else {
				w.newExit(fmt.Errorf("child pid=200 exited: exit status %d", code))
			}
		case Commit:
			w.committed = true
			w.upgradeRun = false
			w.enqueueOld(UpgradeDone{})
		}
	}
}

// newExit is the new master's exit before its commit, as Upgrade reports
// it.
func (w *world) newExit(err error) {
	if w.newExited {
		return
	}
	w.newExited, w.upgradeRun = true, false
	w.enqueueOld(UpgradeDone{Err: classify(err)})
}

// newReady: every worker of the new generation is ready.
func (w *world) newReady() {
	w.nenv.Serving, w.nenv.AllReady, w.nenv.ReadyWorkers = true, true, w.nenv.Workers
	w.toNew(Serving{})
}

// oldReady: every worker of the old generation is ready again.
func (w *world) oldReady() {
	w.oenv.Serving, w.oenv.AllReady, w.oenv.ReadyWorkers = true, true, w.oenv.Workers
	w.toOld(WorkersServing{})
}

// fire fires the last timer side armed for t.
func (w *world) fire(side string, t Timer) {
	w.t.Helper()
	for i := len(w.timers) - 1; i >= 0; i-- {
		if a := w.timers[i]; a.side == side && a.timer == t {
			ev := TimerFired{Timer: t, Seq: a.seq}
			if side == "old" {
				w.toOld(ev)
			} else {
				w.toNew(ev)
			}
			return
		}
	}
	w.t.Fatalf("no %s timer %v armed; actions: %v", side, t, w.acts)
}

func (w *world) armed(side string, t Timer) bool {
	for _, a := range w.timers {
		if a.side == side && a.timer == t {
			return true
		}
	}
	return false
}

// did reports whether an action whose record contains s was carried out.
func (w *world) did(s string) bool {
	for _, a := range w.acts {
		if strings.Contains(a, s) {
			return true
		}
	}
	return false
}

func (w *world) wantOld(s OldState) {
	w.t.Helper()
	if w.old.State() != s {
		w.t.Fatalf("old side in %v, want %v; actions: %v", w.old.State(), s, w.acts)
	}
}

func (w *world) wantNew(s NewState) {
	w.t.Helper()
	if w.new == nil || w.new.State() != s {
		got := "none"
		if w.new != nil {
			got = w.new.State().String()
		}
		w.t.Fatalf("new side in %v, want %v; actions: %v", got, s, w.acts)
	}
}

// start runs an upgrade to the new generation's probation.
func (w *world) start() {
	w.t.Helper()
	w.toOld(SigUSR2{})
	w.wantOld(OldStarting)
	w.wantNew(NewStarting)
	if w.nenv.Workers != w.oenv.Workers {
		w.t.Fatalf("new generation runs %d workers, want the old one's %d", w.nenv.Workers, w.oenv.Workers)
	}
	w.newReady()
	w.wantOld(OldServingBoth)
	w.wantNew(NewProbation)
}

// wantCommitted: the commit went through on both sides.
func (w *world) wantCommitted() {
	w.t.Helper()
	w.wantOld(OldRetiring)
	w.wantNew(NewCommitted)
	if !w.did("old:upgrade.Retire") || w.did("RestoreFiles") {
		w.t.Fatalf("commit: actions %v", w.acts)
	}
	if r := w.old.Last(); r == nil || r.Outcome != "committed" {
		w.t.Fatalf("last result %+v", r)
	}
}

// wantRolledBack: the old side rolled back for a reason containing why.
func (w *world) wantRolledBack(why string) {
	w.t.Helper()
	w.wantOld(OldIdle)
	r := w.old.Last()
	if r == nil || r.Outcome != "rolled back" || !strings.Contains(r.Reason, why) {
		w.t.Fatalf("last result %+v, want rolled back for %q; actions %v", r, why, w.acts)
	}
	if !w.did("old:upgrade.RestoreFiles") || !w.did("old:upgrade.SupervisorReady") || w.did("old:upgrade.Shutdown") || w.did("old:upgrade.Retire") {
		w.t.Fatalf("rollback actions: %v", w.acts)
	}
	if w.committed || !w.newExited {
		w.t.Fatalf("rollback: committed=%v new exited=%v", w.committed, w.newExited)
	}
}

func TestDance_AutomaticCommitAndPrimary(t *testing.T) {
	w := newWorld(t, nil)
	w.start()
	w.fire("new", TimerProbation)
	w.wantCommitted()
	if w.armed("old", TimerSettle) {
		t.Fatal("a settle window without QUIT")
	}
	// The old generation drains and exits: the new master is primary.
	w.toNew(ParentExited{})
	w.wantNew(NewPrimary)
	if !w.did("new:upgrade.BecomePrimary{ParentPid:100}") {
		t.Fatalf("actions %v", w.acts)
	}
}

// TestDance_QuitOrderings: the four orderings of USR2 and QUIT.
func TestDance_QuitOrderings(t *testing.T) {
	t.Run("USR2 then QUIT", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.toOld(SigQUIT{})
		w.wantCommitted() // no probation wait
		if w.armed("old", TimerSettle) {
			t.Fatal("QUIT during an upgrade armed a settle window")
		}
	})
	t.Run("QUIT then USR2 within the settle window", func(t *testing.T) {
		w := newWorld(t, nil)
		w.toOld(SigQUIT{})
		w.wantOld(OldSettling)
		w.toOld(SigUSR2{})
		w.wantOld(OldStarting)
		// The settle window ends while the upgrade is under way: no outage.
		w.fire("old", TimerSettle)
		if w.did("old:upgrade.Shutdown") {
			t.Fatalf("the settle window stopped this generation: %v", w.acts)
		}
		w.newReady()
		w.wantCommitted() // the QUIT was pending: commit at once
	})
	t.Run("QUIT alone drains after the settle window", func(t *testing.T) {
		w := newWorld(t, nil)
		w.toOld(SigQUIT{})
		w.fire("old", TimerSettle)
		w.wantOld(OldStopping)
		if !w.did("old:upgrade.Shutdown{Fast:false}") {
			t.Fatalf("actions %v", w.acts)
		}
	})
	t.Run("QUIT before the new generation serves", func(t *testing.T) {
		w := newWorld(t, nil)
		w.toOld(SigUSR2{})
		w.toOld(SigQUIT{})
		w.wantOld(OldStarting)
		if w.did("old:upgrade.Shutdown") || w.committed {
			t.Fatalf("QUIT before serving: %v", w.acts)
		}
		w.newReady()
		w.wantCommitted()
	})
	t.Run("QUIT during a manual probation", func(t *testing.T) {
		w := newWorld(t, func(o *OldConfig, n *NewConfig) { o.ManualCommit, n.ManualCommit = true, true })
		w.start()
		if len(w.finals) != 1 || !w.finals[0].OK || !strings.Contains(w.finals[0].Message, "manual commit") {
			t.Fatalf("--wait replies %+v", w.finals)
		}
		w.fire("new", TimerProbation) // over, but the commit is the operator's
		w.wantNew(NewProbation)
		w.fire("old", TimerDeadline) // voided when it served
		if w.did("KillTree") {
			t.Fatal("a manual probation was killed by the ready deadline")
		}
		w.toOld(SigQUIT{})
		w.wantCommitted()
	})
}

// TestDance_RollbackReasons: every way an upgrade rolls back, and what
// the old master says.
func TestDance_RollbackReasons(t *testing.T) {
	tests := []struct {
		name string
		run  func(w *world)
		why  string
	}{
		{"tableflip cannot start the new binary", func(w *world) {
			w.cfg.Preflight = false
			w.toOld(SigUSR2{})
			w.new, w.newExited = nil, true
			w.toOld(UpgradeDone{Err: classify(errors.New("can't start child: can't start process ./molt: fork/exec: exec format error"))})
		}, "the new binary could not be started"},
		{"the new master exits", func(w *world) {
			w.toOld(SigUSR2{})
			w.newExit(errors.New("child pid=200 exited: exit status 2"))
			w.run()
		}, "refused its flags or configuration (exit status 2)"},
		{"the new master crashes", func(w *world) {
			w.start()
			w.newExit(errors.New("child pid=200 exited: signal: segmentation fault"))
			w.run()
		}, "killed by signal: segmentation fault"},
		{"the new master hangs past the ready deadline", func(w *world) {
			w.toOld(SigUSR2{})
			w.fire("old", TimerDeadline)
			if !w.did("old:upgrade.KillTree{Pid:200") {
				w.t.Fatalf("actions %v", w.acts)
			}
		}, "did not serve in time and was killed"},
		{"workers not ready", func(w *world) {
			w.toOld(SigUSR2{})
			w.nenv.ReadyWorkers = 1
			w.fire("new", TimerReady)
			w.wantNew(NewFailing)
			// The old generation serves throughout: the release is at once.
		}, "1 of 2 workers ready within the ready timeout"},
		{"a worker dies in probation", func(w *world) {
			w.start()
			w.toNew(WorkerFailed{Code: ExitWorkerDied, Reason: "worker 1 (pid 203) exited before the commit: exit status 1"})
		}, "worker 1 (pid 203) exited before the commit"},
		{"QUIT to the new master", func(w *world) {
			w.start()
			w.toNew(SigQUIT{})
		}, "QUIT to the new master before its commit"},
		{"no configuration from the old master", func(w *world) {
			w.toOld(SigUSR2{})
			// The config was lost: the new side's deadline fires first.
			w.new = NewNewSide(w.ncfg, nil)
			w.nenv = Env{Running: true}
			w.fire("new", TimerConfig)
		}, "no configuration from the old master"},
		{"the pid file cannot be written", func(w *world) {
			w.toOld(SigUSR2{})
			w.nenv.Serving, w.nenv.AllReady = true, true
			w.toNew(Serving{PIDFileErr: errors.New("read-only file system")})
		}, "could not write the pid file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, nil)
			tt.run(w)
			w.run()
			w.wantRolledBack(tt.why)
		})
	}
}

func TestDance_StandbyAndHUP(t *testing.T) {
	w := newWorld(t, nil)
	w.toOld(SigWINCH{})
	if w.did("StopWorkers") {
		t.Fatal("WINCH on a lone master stopped its workers")
	}
	w.start()
	w.toOld(SigWINCH{})
	w.wantOld(OldStandby)
	if !w.did("old:upgrade.StopWorkers") {
		t.Fatalf("actions %v", w.acts)
	}
	w.toOld(SigHUP{})
	w.wantOld(OldServingBoth)
	if !w.did("old:upgrade.Respawn") {
		t.Fatalf("actions %v", w.acts)
	}
	w.oldReady()
	w.toOld(SigQUIT{})
	w.wantCommitted()
}

// TestDance_RollbackFromStandbyOpensNoGap: the failed new master is
// released only once the old generation serves again.
func TestDance_RollbackFromStandbyOpensNoGap(t *testing.T) {
	w := newWorld(t, nil)
	w.start()
	w.toOld(SigWINCH{})
	w.toNew(SigQUIT{})
	w.wantOld(OldRollingBack)
	if !w.did("old:upgrade.Respawn") || w.did("kind:release") || w.newExited {
		t.Fatalf("released before the old generation serves: %v", w.acts)
	}
	w.oldReady()
	w.wantRolledBack("QUIT to the new master")
}

func TestDance_TERMDuringProbation(t *testing.T) {
	t.Run("to the old master", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.toOld(SigTERM{})
		w.wantOld(OldStopping)
		w.wantNew(NewStopping)
		if !w.did("old:upgrade.Shutdown{Fast:true}") || !w.did("new:upgrade.Shutdown{Fast:true}") || w.did("RestoreFiles{}") && w.did("SupervisorReady{Status:serving, 2 workers; upgrade rolled back") {
			t.Fatalf("actions %v", w.acts)
		}
		if e := w.new.Exit(); e == nil || e.Code != ExitStoppedByOld {
			t.Fatalf("new master's exit %v", e)
		}
	})
	t.Run("to the new master", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.toNew(SigTERM{})
		w.wantOld(OldStopping)
		if !w.did("old:upgrade.Shutdown{Fast:true}") {
			t.Fatalf("actions %v", w.acts)
		}
	})
}

func TestDance_TakeBack(t *testing.T) {
	w := newWorld(t, nil)
	w.start()
	w.toOld(SigQUIT{})
	w.wantCommitted()
	w.toOld(SuccessorExited{Pid: newPid})
	w.wantOld(OldTookBack)
	if !w.did("old:upgrade.RestoreFiles") || !w.did("old:upgrade.Respawn") {
		t.Fatalf("actions %v", w.acts)
	}
	if r := w.old.Last(); r.Outcome != "taken back" {
		t.Fatalf("last result %+v", r)
	}
	// Upgrades never run out: the master that took the service back
	// upgrades again (the Handover starts the new master by molt's own
	// means), and takes it back again, every time.
	w.oenv.Running = true
	for i := 0; i < 2; i++ {
		w.acts = nil
		w.start()
		w.toOld(SigQUIT{})
		w.wantCommitted()
		w.toOld(SuccessorExited{Pid: newPid})
		w.wantOld(OldTookBack)
		w.oenv.Running = true
	}
	w.acts = nil
	w.start()
	w.toOld(SigQUIT{})
	w.wantCommitted()
}

func TestDance_NoTakeBackWhenTheSuccessorStopsOnPurpose(t *testing.T) {
	w := newWorld(t, nil)
	w.start()
	w.fire("new", TimerProbation)
	w.toOld(FromChild{Msg: Msg{Kind: KindStopping, Pid: newPid}})
	w.toOld(SuccessorExited{Pid: newPid})
	w.wantOld(OldRetiring)
	if w.did("RestoreFiles") {
		t.Fatalf("took back: %v", w.acts)
	}
}

func TestDance_USR2RefusedOrDeferred(t *testing.T) {
	w := newWorld(t, nil)
	w.toOld(SigUSR2{})
	w.toOld(SigUSR2{})
	if !w.did("an upgrade is already in flight (new master pid 200)") {
		t.Fatalf("second USR2: %v", w.acts)
	}
	w.toNew(SigUSR2{})
	if !w.did("own upgrade is not committed") {
		t.Fatalf("USR2 to the uncommitted new master: %v", w.acts)
	}
	w.newReady()
	w.fire("new", TimerProbation)
	w.wantCommitted()
	w.toNew(SigUSR2{})
	if !w.did("new:upgrade.Progress{Line:deferred") || w.did("new:upgrade.Deferred") {
		t.Fatalf("USR2 after the commit: %v", w.acts)
	}
	w.toNew(ParentExited{})
	w.wantNew(NewPrimary)
	if !w.did("new:upgrade.Deferred") {
		t.Fatalf("the deferred USR2 did not come due: %v", w.acts)
	}
	w2 := newWorld(t, nil)
	w2.oenv.Reloading = true
	w2.toOld(SigUSR2{})
	if !w2.did("a reload is in flight") || w2.old.InFlight() {
		t.Fatalf("USR2 during a reload: %v", w2.acts)
	}
}

// TestDance_Preflight: the pre-flight runs alongside the new master's
// start; the commit waits for it, and its failure rolls back at any
// point of the attempt.
func TestDance_Preflight(t *testing.T) {
	withPreflight := func(o *OldConfig, _ *NewConfig) { o.Preflight = true }
	t.Run("passes while the new generation serves: the commit waits for it", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.toOld(SigUSR2{})
		if !w.did("old:upgrade.RunPreflight{Attempt:1}") || !w.did("old:upgrade.Begin") {
			t.Fatalf("pre-flight and start not together: %v", w.acts)
		}
		if !w.did("Hold:true") {
			t.Fatalf("config without Hold while the pre-flight runs: %v", w.acts)
		}
		w.wantNew(NewStarting)
		w.newReady()
		w.fire("new", TimerProbation)
		w.wantNew(NewProbation)
		if w.did("new:upgrade.Commit") || !w.new.Held() {
			t.Fatalf("committed before the pre-flight passed: %v", w.acts)
		}
		// The commit's deadline waits for the pre-flight too: the last
		// one armed (at the start) is void.
		w.fire("old", TimerDeadline)
		if w.did("KillTree") {
			t.Fatalf("killed while the commit waited for the pre-flight: %v", w.acts)
		}
		w.toOld(PreflightDone{Attempt: 1, Out: "molt v2"})
		w.wantCommitted()
		if w.did("CancelPreflight") {
			t.Fatalf("a finished pre-flight cancelled: %v", w.acts)
		}
	})
	t.Run("the attempt ends while it runs: cancelled", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.start()
		w.toNew(WorkerFailed{Code: ExitWorkerDied, Reason: "worker died"})
		w.oldReady()
		w.wantRolledBack("worker died")
		if !w.did("old:upgrade.CancelPreflight") {
			t.Fatalf("pre-flight not cancelled: %v", w.acts)
		}
		w.toOld(PreflightDone{Attempt: 1, Err: errors.New("cancelled")}) // too late: ignored
		w.wantOld(OldIdle)
	})
	t.Run("passes before the hello: no hold", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.old.Handle(w.oenv, SigUSR2{}) // Begin not carried out yet: no new master
		w.toOld(PreflightDone{Attempt: 1, Out: "ok"})
		w.toOld(FromChild{Msg: Msg{Kind: KindHello, Pid: newPid}, IsChild: true})
		if !w.did("old:upgrade.SendConfig{To:200 Hold:false") {
			t.Fatalf("actions %v", w.acts)
		}
	})
	t.Run("fails during the probation: rolled back", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.start()
		w.toOld(PreflightDone{Attempt: 1, Err: errors.New("exit status 1")})
		w.wantRolledBack("the new binary failed its pre-flight check: exit status 1")
		if w.committed || w.did("new:upgrade.Commit") {
			t.Fatalf("committed: %v", w.acts)
		}
		if f := w.finals[len(w.finals)-1]; !strings.Contains(f.Error, "rolled back: the new binary failed its pre-flight check") {
			t.Fatalf("final reply %+v", f)
		}
	})
	t.Run("fails before the hello: the new master is killed", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.old.Handle(w.oenv, SigUSR2{}) // the new master has not said hello
		w.upgradeRun = true
		w.toOld(PreflightDone{Attempt: 1, Err: errors.New("exit status 1")})
		if !w.did("old:upgrade.KillTree{Pid:0") || !w.newExited {
			t.Fatalf("actions %v", w.acts)
		}
		w.wantOld(OldIdle)
		if r := w.old.Last(); r == nil || r.Outcome != "rolled back" || !strings.Contains(r.Reason, "pre-flight") {
			t.Fatalf("last %+v", r)
		}
	})
	t.Run("a result of an earlier attempt is ignored", func(t *testing.T) {
		w := newWorld(t, withPreflight)
		w.start()
		w.toOld(PreflightDone{Attempt: 7, Err: errors.New("stale")})
		w.wantOld(OldServingBoth)
		w.wantNew(NewProbation)
	})
}

// TestDance_PhasesTimed: both sides time the milestones with their clock
// and report them at the commit, and a rollback reports those reached.
func TestDance_PhasesTimed(t *testing.T) {
	w := newWorld(t, func(o *OldConfig, _ *NewConfig) { o.Preflight = true })
	w.old.Handle(w.oenv, SigUSR2{}) // carried out below, step by step
	w.tick(2 * time.Millisecond)
	w.toOld(PreflightDone{Attempt: 1, Out: "ok"})
	w.tick(3 * time.Millisecond)
	w.new = NewNewSide(w.ncfg, nil) // the new master starts: its hello
	w.nenv = Env{Running: true}
	w.upgradeRun = true
	w.doNew(w.new.Start())
	w.run()
	w.wantNew(NewStarting)
	w.tick(20 * time.Millisecond)
	w.newReady()
	w.tick(100 * time.Millisecond)
	w.fire("new", TimerProbation)
	w.wantCommitted()
	want := Phases{PhaseStart: 0, PhasePreflight: 2, PhaseHello: 5, PhaseConfig: 5, PhaseServing: 25,
		PhaseCommitted: 125, PhaseProbation: 100, PhaseTotal: 125}
	if got := w.old.Last().Phases; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("old side's phases %v, want %v", got, want)
	}
	// The new side times from the signal the configuration carried.
	want = Phases{PhaseHello: 5, PhaseConfig: 5, PhaseServing: 25, PhaseCommitted: 125, PhaseProbation: 100, PhaseTotal: 125}
	if got := w.new.Last().Phases; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("new side's phases %v, want %v", got, want)
	}
	w.tick(50 * time.Millisecond)
	w.toNew(ParentExited{})
	if got := w.new.Last().Phases; got[PhaseGone] != 175 || got[PhaseTotal] != 175 {
		t.Errorf("new side's phases at primary %v", got)
	}
	if s := w.new.Phases().String(); !strings.HasPrefix(s, "hello 5ms, config 5ms, serving 25ms, committed 125ms, gone 175ms, probation 100ms") {
		t.Errorf("String: %q", s)
	}

	// A rollback: the phases reached, and the end.
	w = newWorld(t, nil)
	w.start()
	w.tick(7 * time.Millisecond)
	w.toNew(WorkerFailed{Code: ExitWorkerDied, Reason: "worker died"})
	w.oldReady()
	r := w.old.Last()
	if r == nil || r.Phases[PhaseRolledBack] != 7 || r.Phases[PhaseServing] != 0 || r.Phases[PhaseTotal] != 7 {
		t.Fatalf("rollback phases %+v", r)
	}
	if _, ok := r.Phases[PhaseCommitted]; ok {
		t.Fatalf("a rollback with a commit phase: %v", r.Phases)
	}
	if _, ok := r.Phases[PhasePreflight]; ok {
		t.Fatalf("a pre-flight phase without a pre-flight: %v", r.Phases)
	}
}

func TestDance_StopAll(t *testing.T) {
	t.Run("to the old master during probation", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.toOld(StopAll{})
		w.wantOld(OldStopping)
		if !w.did("old:upgrade.Shutdown{Fast:false}") || !w.newExited || w.committed {
			t.Fatalf("actions %v", w.acts)
		}
		if e := w.new.Exit(); e == nil || e.Code != ExitAborted {
			t.Fatalf("new master's exit %v", e)
		}
	})
	t.Run("to the new master before its commit", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.toNew(StopAll{})
		w.wantOld(OldStopping)
		if !w.did("old:upgrade.Shutdown{Fast:false}") || !w.newExited || w.committed {
			t.Fatalf("actions %v", w.acts)
		}
	})
	t.Run("before the new master said hello", func(t *testing.T) {
		w := newWorld(t, nil)
		w.toOld(SigUSR2{})
		w.toOld(StopAll{}) // the hello was already read: abort by pid
		if !w.newExited {
			t.Fatalf("actions %v", w.acts)
		}
	})
	t.Run("to a new master whose old one died", func(t *testing.T) {
		w := newWorld(t, nil)
		w.toOld(SigUSR2{})
		w.toNew(ParentExited{})
		w.toNew(StopAll{})
		if !w.did("new:upgrade.Shutdown{Fast:false}") {
			t.Fatalf("actions %v", w.acts)
		}
	})
	t.Run("to a committed master", func(t *testing.T) {
		w := newWorld(t, nil)
		w.start()
		w.fire("new", TimerProbation)
		w.toNew(StopAll{})
		if !w.did("new:upgrade.Shutdown{Fast:false}") {
			t.Fatalf("actions %v", w.acts)
		}
	})
}

func TestDance_QuitWaitingForAFailedUpgradeIsCancelled(t *testing.T) {
	w := newWorld(t, nil)
	w.toOld(SigUSR2{})
	w.toOld(SigQUIT{})
	w.newExit(errors.New("child pid=200 exited: exit status 3"))
	w.run()
	w.wantRolledBack("could not bind a listener")
	if w.did("old:upgrade.Shutdown") {
		t.Fatal("the QUIT outlived its failed upgrade")
	}
}

// TestDance_EveryTransitionIsLogged: each change of state is one line with
// event=upgrade.state, side, from, to and why; the stable keys operators
// alert on are there.
func TestDance_EveryTransitionIsLogged(t *testing.T) {
	var buf bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true, Level: hclog.Info})
	w := newWorld(t, nil)
	w.logger = log
	w.old.SetLogger(log)
	w.start()
	w.fire("new", TimerProbation)
	w.toNew(ParentExited{})
	var path = map[string][]string{}
	events := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var l map[string]any
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		ev, _ := l["event"].(string)
		if ev == "" {
			t.Errorf("a line without an event key: %s", line)
		}
		events[ev] = true
		if ev != "upgrade.state" {
			continue
		}
		side, from, to, why := l["side"].(string), l["from"].(string), l["to"].(string), l["why"].(string)
		if why == "" || from == to {
			t.Errorf("transition without a why, or to itself: %s", line)
		}
		if p := path[side]; len(p) > 0 && p[len(p)-1] != from {
			t.Errorf("%s side: from %s, but it was in %s", side, from, p[len(p)-1])
		}
		if len(path[side]) == 0 {
			path[side] = []string{from}
		}
		path[side] = append(path[side], to)
	}
	if got, want := strings.Join(path["old"], " "), "idle starting serving-both retiring"; got != want {
		t.Errorf("old side went %s, want %s", got, want)
	}
	if got, want := strings.Join(path["new"], " "), "awaiting-config starting probation committed primary"; got != want {
		t.Errorf("new side went %s, want %s", got, want)
	}
	for _, ev := range []string{"upgrade.new_master", "upgrade.serving", "upgrade.committed", "upgrade.primary", "upgrade.configured"} {
		if !events[ev] {
			t.Errorf("no %s line", ev)
		}
	}
}

// TestDance_NewSideReportsUntilItsCommit: k of N ready and the worker
// process groups reach the old master before the commit, and stop after.
func TestDance_NewSideReportsUntilItsCommit(t *testing.T) {
	w := newWorld(t, nil)
	w.toOld(SigUSR2{})
	w.nenv.ReadyWorkers = 1
	w.toNew(WorkerReady{})
	w.toNew(WorkersChanged{PGIDs: []int{201, 202}})
	if a := w.old.Attempt(); a.Ready != 1 || a.Want != 2 || len(a.PGIDs) != 2 {
		t.Fatalf("the old side follows %+v", a)
	}
	w.newReady()
	w.fire("new", TimerProbation)
	w.wantCommitted()
	n := len(w.acts)
	w.toNew(WorkerReady{})
	w.toNew(WorkersChanged{PGIDs: []int{203}})
	if len(w.acts) != n {
		t.Fatalf("reports after the commit: %v", w.acts[n:])
	}
}

// TestDance_ScaleDuringAnUpgrade: a TTIN to the old master before the
// new generation serves reaches it; once it serves, the count is its own.
func TestDance_ScaleDuringAnUpgrade(t *testing.T) {
	w := newWorld(t, nil)
	w.toOld(SigUSR2{})
	w.oenv.Workers = 3
	w.toOld(Scaled{})
	if w.nenv.Workers != 3 {
		t.Fatalf("the new generation runs %d workers, want 3", w.nenv.Workers)
	}
	w.newReady()
	w.oenv.Workers = 4
	w.toOld(Scaled{})
	if w.nenv.Workers != 3 {
		t.Fatalf("a TTIN after the new generation served changed its count to %d", w.nenv.Workers)
	}
}
