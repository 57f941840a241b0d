package upgrade

import (
	"fmt"
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
		v, why := c.g.Judge(c.nw, OldBaseline(c.old, nil, false), c.waive)
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

// The old generation's workers in the baseline tests: honest ones with
// a 0.1% or 1% share of errors and a p99 of 10 ms; a liar that reports
// huge counts of 5xx in the last bucket (to pass a bad release), or of
// fast 2xx (to fail a good one).
var (
	honest    = Figures{Requests: 1000, Errors: 1, P99: 10 * time.Millisecond}
	honest1pc = Figures{Requests: 1000, Errors: 10, P99: 10 * time.Millisecond}
	liarBad   = Figures{Requests: 1e14, Errors: 1e14, P99: 10 * time.Second}
	liarFast  = Figures{Requests: 1e14, P99: 40 * time.Microsecond}
)

// sum is the old generation's figures summed, as the gates took them
// before the per-worker baseline (and still do from an older old
// master): the p99 is the slowest worker's, as the sum's histogram
// would have it under a liar's weight.
func sum(ws ...Figures) Figures {
	var s Figures
	for _, w := range ws {
		s.Requests += w.Requests
		s.Errors += w.Errors
		s.P99 = max(s.P99, w.P99)
	}
	return s
}

// TestGates_OneLyingOldWorker: among 3 or 4 old workers, one that lies
// can neither pass a release of 500s (nor a slow one) by inflating its
// 5xx and latency, nor fail a good release by inflating its fast 2xx:
// the baseline is the median of the workers' own figures, and the reason
// says so. With the sum (an older old master), both attacks work.
func TestGates_OneLyingOldWorker(t *testing.T) {
	g := Gates{ErrorGate: true, MaxErrorRate: 1, MaxLatencyFactor: 2, MinRequests: 100}
	slowBad := Figures{Requests: 1204, Errors: 282, P99: 50 * time.Millisecond}
	good := Figures{Requests: 1000, Errors: 15, P99: 12 * time.Millisecond} // 1.5%: within 1 point of 1%
	for _, n := range []int{3, 4} {
		var bad, fast []Figures
		for range n - 1 {
			bad = append(bad, honest)
			fast = append(fast, honest1pc)
		}
		bad = append([]Figures{liarBad}, bad...)
		fast = append(fast, liarFast)
		of := fmt.Sprintf("median of %d workers", n)

		b := OldBaseline(sum(bad...), bad, true)
		if b.Share != 0.1 || b.P99 != 10*time.Millisecond || b.Workers != n {
			t.Errorf("%d workers, one inflating its 5xx: baseline %+v, want an honest worker's 0.1%% and 10ms", n, b)
		}
		v, why := g.Judge(newBad, b, false)
		if v != GateFail || !strings.Contains(why, "(old: 0.1%, "+of+")") {
			t.Errorf("%d workers, one inflating its 5xx: %v: %s; want the bad release failed on the median", n, v, why)
		}
		v, why = g.Judge(Figures{Requests: 1000, P99: 50 * time.Millisecond}, b, false)
		if v != GateFail || !strings.Contains(why, "the old's 10ms ("+of+")") {
			t.Errorf("%d workers, one inflating its latency: %v: %s; want the slow release failed on the median", n, v, why)
		}
		if v, why := g.Judge(slowBad, OldBaseline(sum(bad...), nil, false), false); v != GatePass {
			t.Errorf("%d workers summed, one inflating its 5xx: %v: %s; the sum was expected to let the bad release pass", n, v, why)
		}

		b = OldBaseline(sum(fast...), fast, true)
		v, why = g.Judge(good, b, false)
		if v != GatePass || !strings.Contains(why, "(old: 1.0%, "+of+")") || !strings.Contains(why, "(old: 10ms, "+of+")") {
			t.Errorf("%d workers, one inflating its fast 2xx: %v: %s; want the good release passed on the median", n, v, why)
		}
		if v, why := g.Judge(good, OldBaseline(sum(fast...), nil, false), false); v != GateFail {
			t.Errorf("%d workers summed, one inflating its fast 2xx: %v: %s; the sum was expected to fail the good release", n, v, why)
		}
	}
}

// TestGates_OneOrTwoOldWorkers: the documented cases (docs/security.md,
// "Limits"). Of two workers the baseline is the lower: a liar cannot pass
// a bad release, but can fail a good one. One worker is the baseline
// alone, a liar included. A p99 of 0 (no histogram) does not turn the
// latency gate off.
func TestGates_OneOrTwoOldWorkers(t *testing.T) {
	g := Gates{ErrorGate: true, MaxErrorRate: 1, MaxLatencyFactor: 2, MinRequests: 100}
	good := Figures{Requests: 1000, Errors: 15, P99: 12 * time.Millisecond}
	for _, c := range []struct {
		name    string
		workers []Figures
		nw      Figures
		want    Verdict
		words   string
	}{
		{"two, one inflating its 5xx", []Figures{liarBad, honest}, newBad, GateFail, "(old: 0.1%, lower of 2 workers)"},
		{"two, one inflating its latency", []Figures{honest, liarBad}, Figures{Requests: 1000, P99: 50 * time.Millisecond}, GateFail, "the old's 10ms (lower of 2 workers)"},
		{"two, one with no histogram", []Figures{{Requests: 1e14, Errors: 1e14}, honest}, Figures{Requests: 1000, P99: 50 * time.Millisecond}, GateFail, "the old's 10ms (from 1 of 2 workers)"},
		{"two, one inflating its fast 2xx: a good release fails", []Figures{honest1pc, liarFast}, good, GateFail, "(old: 0.0%, lower of 2 workers)"},
		{"two honest", []Figures{honest1pc, honest1pc}, good, GatePass, "(old: 1.0%, lower of 2 workers)"},
		{"one, a liar: a bad release passes", []Figures{liarBad}, newBad, GatePass, "(old: 100.0%, from 1 worker)"},
		{"one honest", []Figures{honest}, newBad, GateFail, "(old: 0.1%, from 1 worker)"},
		{"too few requests to count", []Figures{liarBad, honest, honest, {Requests: 19, Errors: 19, P99: time.Second}}, newBad, GateFail, "(old: 0.1%, median of 3 of 4 workers)"},
		{"none with enough", []Figures{{Requests: 5, Errors: 5}}, newBad, GateFail, "(old: 0.0%, no old worker served 20 requests)"},
		{"one of two with enough: no baseline, the strictest", []Figures{honest1pc, {Requests: 5}}, good, GateFail, "(old: 0.0%, only 1 of 2 old workers served 20 requests)"},
		{"only a liar with enough, of four", []Figures{liarBad, {Requests: 19, Errors: 19}, {Requests: 10}, {Requests: 3}}, newBad, GateFail, "(old: 0.0%, only 1 of 4 old workers served 20 requests)"},
		{"only a liar with enough, latency", []Figures{liarBad, {Requests: 19, P99: time.Millisecond}, {Requests: 10}}, Figures{Requests: 1000, P99: time.Second}, GatePass, "(old: only 1 of 3 old workers served 20 requests, not compared)"},
		{"two of three with enough", []Figures{honest, honest1pc, {Requests: 2}}, newBad, GateFail, "(old: 0.1%, lower of 2 of 3 workers)"},
		{"none with enough, latency", []Figures{{Requests: 5, P99: time.Millisecond}}, Figures{Requests: 1000, P99: time.Second}, GatePass, "no worker with 20 requests to compare"},
	} {
		b := OldBaseline(sum(c.workers...), c.workers, true)
		v, why := g.Judge(c.nw, b, false)
		if v != c.want || !strings.Contains(why, c.words) {
			t.Errorf("%s: %v: %s; want %v saying %q", c.name, v, why, c.want, c.words)
		}
	}
}

// TestGates_SumFromAnOlderOldMaster: an old master that sends no
// per-worker figures: the baseline is its generation's sum, and the
// reason reads as before.
func TestGates_SumFromAnOlderOldMaster(t *testing.T) {
	g := Gates{ErrorGate: true, MaxErrorRate: 1, MaxLatencyFactor: 2, MinRequests: 100}
	b := OldBaseline(Figures{Requests: 2000, Errors: 2, P99: 10 * time.Millisecond}, nil, false)
	if b.ByWorker || b.Share != 0.1 || b.P99 != 10*time.Millisecond {
		t.Fatalf("baseline %+v", b)
	}
	if v, why := g.Judge(newBad, b, false); v != GateFail || !strings.HasPrefix(why, "new generation: 5xx 23.4% over 1,204 requests (old: 0.1%), more than") {
		t.Errorf("%v: %s", v, why)
	}
	// A dance fed the sum only judges on it.
	w := gated(t, 0)
	w.start()
	w.toNew(Traffic{New: newBad, Old: sum(liarBad, honest, honest, honest)})
	w.wantNew(NewProbation) // the hole the per-worker baseline closes
	w.toNew(Traffic{New: newBad, Old: sum(liarBad, honest, honest, honest), OldWorkers: []Figures{liarBad, honest, honest, honest}, OldByWorker: true})
	w.wantRolledBack("(old: 0.1%, median of 4 workers)")
}
