package upgrade

import (
	"strings"
	"testing"
	"time"
)

func TestGates_Judge(t *testing.T) {
	errGate := Gates{ErrorGate: true, MaxErrorRate: 1, MinRequests: 100}
	latGate := Gates{MaxLatencyFactor: 2, MinRequests: 100}
	old := Figures{Requests: 2000, Errors: 2, P99: 10 * time.Millisecond}
	for _, c := range []struct {
		name      string
		g         Gates
		nw, old   Figures
		waive     bool
		want      Verdict
		wantWords []string
	}{
		{"off", Gates{}, Figures{Requests: 5, Errors: 5}, old, false, GatePass, []string{"no gates"}},
		{"errors over", errGate, Figures{Requests: 1204, Errors: 282}, old, false, GateFail,
			[]string{"new generation: 5xx 23.4% over 1,204 requests (old: 0.1%)", "rolled back"}},
		{"errors within", errGate, Figures{Requests: 1000, Errors: 10}, old, false, GatePass, []string{"5xx 1.0% over 1,000 requests (old: 0.1%)"}},
		{"errors both high", errGate, Figures{Requests: 1000, Errors: 500}, Figures{Requests: 1000, Errors: 495}, false, GatePass, nil},
		{"zero points allowed, equal share", Gates{ErrorGate: true, MinRequests: 10}, Figures{Requests: 100, Errors: 1}, Figures{Requests: 100, Errors: 1}, false, GatePass, nil},
		{"too few", errGate, Figures{Requests: 99, Errors: 99}, old, false, GateWait, []string{"99 of the 100 requests"}},
		{"too few, waived", errGate, Figures{Requests: 20, Errors: 20}, old, true, GateFail, []string{"5xx 100.0% over 20 requests"}},
		{"none, waived", errGate, Figures{}, old, true, GateNoTraffic, []string{"no request"}},
		{"none, no minimum", Gates{ErrorGate: true}, Figures{}, old, false, GateNoTraffic, nil},
		{"slow", latGate, Figures{Requests: 500, P99: 50 * time.Millisecond}, old, false, GateFail,
			[]string{"p99 50ms over 500 requests, 5.0× the old's 10ms (at most 2×)"}},
		{"fast enough", latGate, Figures{Requests: 500, P99: 20 * time.Millisecond}, old, false, GatePass, []string{"p99 20ms (old: 10ms)"}},
		{"old idle", latGate, Figures{Requests: 500, P99: time.Second}, Figures{}, false, GatePass, []string{"no request to compare"}},
		{"both, latency fails", Gates{ErrorGate: true, MaxErrorRate: 1, MaxLatencyFactor: 2, MinRequests: 1}, Figures{Requests: 500, P99: 30 * time.Millisecond}, old, false, GateFail, []string{"p99 30ms"}},
	} {
		v, why := c.g.Judge(c.nw, c.old, c.waive)
		if v != c.want {
			t.Errorf("%s: verdict %v (%s), want %v", c.name, v, why, c.want)
		}
		for _, w := range c.wantWords {
			if !strings.Contains(why, w) {
				t.Errorf("%s: reason %q, want it to say %q", c.name, why, w)
			}
		}
	}
}

func TestGates_Count(t *testing.T) {
	for n, want := range map[uint64]string{0: "0", 999: "999", 1000: "1,000", 1204: "1,204", 1234567: "1,234,567"} {
		if got := count(n); got != want {
			t.Errorf("count(%d) = %q, want %q", n, got, want)
		}
	}
}

// gated is a world whose new side judges with both gates, and a canary
// of canary workers of 4 (0: none).
func gated(t *testing.T, canary int) *world {
	w := newWorld(t, func(o *OldConfig, n *NewConfig) {
		n.Gates = Gates{ErrorGate: true, MaxErrorRate: 1, MaxLatencyFactor: 3, MinRequests: 100}
		n.Canary = canary
	})
	w.oenv.Workers, w.oenv.ReadyWorkers = 4, 4
	return w
}

var (
	oldFine = Figures{Requests: 3000, Errors: 3, P99: 2 * time.Millisecond}
	newFine = Figures{Requests: 1000, Errors: 1, P99: 3 * time.Millisecond}
	newBad  = Figures{Requests: 1204, Errors: 282, P99: 2 * time.Millisecond}
)

func TestDance_GatesPassThenCommit(t *testing.T) {
	w := gated(t, 0)
	w.start()
	w.toNew(Traffic{New: newFine, Old: oldFine})
	w.wantNew(NewProbation) // a pass commits only at the probation's end
	w.fire("new", TimerProbation)
	w.wantCommitted()
}

func TestDance_GateFailsDuringProbation(t *testing.T) {
	w := gated(t, 0)
	w.start()
	w.toNew(Traffic{New: newBad, Old: oldFine})
	w.wantRolledBack("new generation: 5xx 23.4% over 1,204 requests (old: 0.1%)")
	if e := w.new.Exit(); e == nil || e.Code != ExitGateFailed {
		t.Fatalf("exit %+v", e)
	}
	if c := FailureCause(&Msg{Code: ExitGateFailed}, false, nil); c != CauseGate {
		t.Errorf("cause %q, want %q", c, CauseGate)
	}
}

func TestDance_GatesWaitForRequests(t *testing.T) {
	w := gated(t, 0)
	w.start()
	w.toNew(Traffic{New: Figures{Requests: 10}, Old: oldFine})
	w.fire("new", TimerProbation)
	w.wantNew(NewGateWait)
	if !w.did("old:upgrade.Arm{Timer:upgrade deadline D:1m5s") {
		t.Fatalf("the old master's deadline did not move by the wait: %v", w.acts)
	}
	w.toNew(Traffic{New: newFine, Old: oldFine})
	w.wantCommitted()

	// The bound passes with a few requests: judged on them.
	w = gated(t, 0)
	w.start()
	w.toNew(Traffic{New: Figures{Requests: 10, Errors: 10}, Old: oldFine})
	w.fire("new", TimerProbation)
	w.fire("new", TimerGateWait)
	w.wantRolledBack("5xx 100.0% over 10 requests")

	// ... and with none at all: committed (docs/upgrades.md).
	w = gated(t, 0)
	w.start()
	w.fire("new", TimerProbation)
	w.wantNew(NewGateWait)
	w.fire("new", TimerGateWait)
	w.wantCommitted()
}

func TestDance_Canary(t *testing.T) {
	w := gated(t, 1)
	w.toOld(SigUSR2{})
	if w.nenv.Workers != 1 {
		t.Fatalf("the canary runs %d workers, want 1", w.nenv.Workers)
	}
	w.newReady()
	w.wantNew(NewProbation)
	w.toNew(Traffic{New: newFine, Old: oldFine})
	w.fire("new", TimerProbation)
	w.wantNew(NewCompleting)
	if w.nenv.Workers != 4 || w.committed {
		t.Fatalf("after the canary: %d workers, committed %v", w.nenv.Workers, w.committed)
	}
	for i := 2; i <= 4; i++ {
		w.nenv.ReadyWorkers, w.nenv.AllReady = i, i == 4
		w.toNew(WorkerReady{})
		if i < 4 && w.committed {
			t.Fatalf("committed with %d of 4 workers ready", i)
		}
	}
	w.wantCommitted()

	// The gates fail once all serve: rolled back, before the commit.
	w = gated(t, 1)
	w.toOld(SigUSR2{})
	w.newReady()
	w.toNew(Traffic{New: newFine, Old: oldFine})
	w.fire("new", TimerProbation)
	w.toNew(Traffic{New: Figures{Requests: 1500, Errors: 400}, Old: oldFine})
	w.wantRolledBack("5xx 26.7% over 1,500 requests")

	// The rest is not ready in time.
	w = gated(t, 1)
	w.toOld(SigUSR2{})
	w.newReady()
	w.toNew(Traffic{New: newFine, Old: oldFine})
	w.fire("new", TimerProbation)
	w.nenv.ReadyWorkers, w.nenv.AllReady = 2, false
	w.fire("new", TimerReady)
	w.wantRolledBack("2 of 4 workers ready")

	// A canary no smaller than the worker count is no canary.
	w = gated(t, 4)
	w.start()
}

// TestDance_CanaryManualCommit: QUIT to the old master during the canary
// starts the rest; the commit follows once all are ready.
func TestDance_CanaryManualCommit(t *testing.T) {
	w := gated(t, 1)
	w.cfg.ManualCommit, w.ncfg.ManualCommit = true, true
	w.old = NewOldSide(w.cfg, nil)
	w.toOld(SigUSR2{})
	w.newReady()
	w.toOld(SigQUIT{})
	w.wantNew(NewCompleting)
	w.nenv.ReadyWorkers, w.nenv.AllReady = 4, true
	w.toNew(WorkerReady{})
	w.wantCommitted()
}

// TestDance_ExtendIsBounded: a new master cannot hold the old one's
// deadline off for more than MaxExtend, nor with a negative one.
func TestDance_ExtendIsBounded(t *testing.T) {
	w := gated(t, 0)
	w.start()
	w.toOld(FromChild{Msg: Msg{Kind: KindExtend, Pid: newPid, Millis: (24 * time.Hour).Milliseconds()}})
	if !w.did("old:upgrade.Arm{Timer:upgrade deadline D:5m5s") {
		t.Fatalf("the deadline was not capped at MaxExtend + Slack: %v", w.acts)
	}
	if _, err := DecodeMsg([]byte(`{"kind":"extend","ms":-1}`)); err == nil {
		t.Error("a negative extension decoded")
	}
}
