package upgrade

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// The gates of a probation (docs/upgrades.md, "Gates"): the new
// generation's traffic over the probation, against the old generation's
// over the same window. The new master, which has both (the old master
// sends its figures over the channel), feeds them to its side as
// Traffic events; OldBaseline and Judge are the rule, over plain numbers.
//
// The new generation is the release under test: its figures are its
// workers' summed. The old generation's are the baseline, and one of its
// workers may lie (a worker can only report on itself, but upwards
// without bound): the baseline is the median over its workers of each
// one's own error share and p99 (OldBaseline), which a minority of liars
// cannot move beyond what an honest worker reports.

// Gates are the thresholds of a probation. The zero value judges nothing
// (every gate off).
type Gates struct {
	// ErrorGate turns the error gate on: MaxErrorRate bounds the new
	// generation's share of server errors (5xx and panicked handlers)
	// minus the old one's, in percentage points (0 allowed).
	ErrorGate    bool
	MaxErrorRate float64
	// MaxLatencyFactor, if not zero, bounds the new generation's p99
	// latency to this factor of the old one's.
	MaxLatencyFactor float64
	// MinRequests is how many requests the new generation must have
	// served in the window before the gates can pass: the probation
	// extends until then, by at most MaxGateWait.
	MinRequests uint64
}

// On reports whether any gate is set.
func (g Gates) On() bool { return g.ErrorGate || g.MaxLatencyFactor > 0 }

// DefaultMinRequests is --min-requests when a gate is on and it is not
// given.
const DefaultMinRequests = 100

// MaxGateWait bounds how long the probation extends past its end for the
// gates' minimum of requests; then the gates judge what there is (none:
// the commit goes ahead, GateNoTraffic).
const MaxGateWait = 60 * time.Second

// Figures are one generation's traffic over a window, as the gates see
// it.
type Figures struct {
	Requests uint64        // every request answered (or cut)
	Errors   uint64        // 5xx and panicked handlers
	P99      time.Duration // from the histogram; 0 with no request
}

// Share is Errors over Requests in percent; 0 with no request.
func (f Figures) Share() float64 {
	if f.Requests == 0 {
		return 0
	}
	return 100 * float64(f.Errors) / float64(f.Requests)
}

// MinWorkerRequests is how many requests an old worker must have served
// in the window to count in the baseline: fewer make no share worth the
// name.
const MinWorkerRequests = 20

// Baseline is the old generation's figures over the window, as the gates
// compare the new one's against.
type Baseline struct {
	Share float64       // server errors over requests, in percent
	P99   time.Duration // 0: nothing to compare
	// ByWorker: Share is the median over Workers of the old
	// generation's workers, P99 over P99Workers of them, of Reported
	// with figures in the window; false: the generation's sum (an old
	// master that sends no per-worker figures).
	ByWorker                      bool
	Workers, P99Workers, Reported int
	// Few: no more than half of Reported served MinWorkerRequests, so
	// Share is 0 and P99 is 0 (not judged) whatever they reported.
	Few bool
}

// OldBaseline is the baseline of the old generation's window: with
// byWorker, the median over its workers that served MinWorkerRequests in
// the window (workers, each one's own figures) of each one's error share
// and, separately, of each one's p99 (those with one); else sum, the
// generation's total.
//
// The median is the lower one: with an even number of workers, the lower
// of the two in the middle; of two workers, the lower one. A lower
// baseline is a stricter gate, so a worker that inflates its own errors
// or latency (to pass a bad release) never moves the baseline above an
// honest worker's while at least half the workers counted are honest,
// and one that inflates its fast answers (to fail a good release) never
// moves it below an honest worker's while more than half are. With one
// worker counted the baseline is that worker's; with two, a liar cannot
// pass a bad release but can fail a good one (docs/security.md,
// "Limits"). A p99 of 0 (no histogram) does not count: it would turn the
// latency gate off. If no more than half of the workers reported served
// MinWorkerRequests (a liar always does: it reports what it likes), the
// baseline is Few: an error share of 0 and no p99, the strictest.
func OldBaseline(sum Figures, workers []Figures, byWorker bool) Baseline {
	if !byWorker {
		b := Baseline{Share: sum.Share()}
		if sum.Requests > 0 {
			b.P99 = sum.P99
		}
		return b
	}
	b := Baseline{ByWorker: true, Reported: len(workers)}
	shares := make([]float64, 0, len(workers))
	p99s := make([]time.Duration, 0, len(workers))
	for _, w := range workers {
		if w.Requests < MinWorkerRequests {
			continue
		}
		shares = append(shares, w.Share())
		if w.P99 > 0 {
			p99s = append(p99s, w.P99)
		}
	}
	b.Workers, b.P99Workers = len(shares), len(p99s)
	if len(shares) > 0 && 2*len(shares) <= b.Reported {
		// Most old workers served too little to count: those that did
		// are no baseline (a liar's huge counts always count). The
		// strictest one instead: no error, no latency to compare.
		b.Few = true
		return b
	}
	if len(shares) > 0 {
		slices.Sort(shares)
		b.Share = shares[(len(shares)-1)/2]
	}
	if len(p99s) > 0 {
		slices.Sort(p99s)
		b.P99 = p99s[(len(p99s)-1)/2]
	}
	return b
}

// baseline is the old generation's baseline in t.
func (t Traffic) baseline() Baseline { return OldBaseline(t.Old, t.OldWorkers, t.OldByWorker) }

// of says what a figure of the baseline is made of, n the workers it
// counts: "" for the sum, "median of 4 workers", "lower of 2 workers",
// "from 1 of 3 workers".
func (b Baseline) of(n int) string {
	if !b.ByWorker {
		return ""
	}
	if n == 0 {
		return fmt.Sprintf("no old worker served %d requests", MinWorkerRequests)
	}
	if b.Few {
		return fmt.Sprintf("only %d of %d old workers served %d requests", b.Workers, b.Reported, MinWorkerRequests)
	}
	s := strconv.Itoa(n)
	if b.Reported > n {
		s += " of " + strconv.Itoa(b.Reported)
	}
	switch {
	case n == 1 && b.Reported <= 1:
		return "from 1 worker"
	case n == 1:
		return "from " + s + " workers"
	case n == 2:
		return "lower of " + s + " workers"
	default:
		return "median of " + s + " workers"
	}
}

// Verdict is what the gates make of a window.
type Verdict int

const (
	// GateWait: fewer requests than the minimum; nothing is decided.
	GateWait Verdict = iota
	// GatePass: every gate set is met.
	GatePass
	// GateFail: a gate is not met; the upgrade rolls back.
	GateFail
	// GateNoTraffic: (only when the minimum is waived, at MaxGateWait)
	// the new generation served no request at all: nothing to judge.
	GateNoTraffic
)

var verdictNames = [...]string{"wait", "pass", "fail", "no traffic"}

func (v Verdict) String() string { return verdictNames[v] }

// Judge applies the gates to the new generation's window against the old
// one's baseline over the same window (OldBaseline). waive drops the
// minimum of requests (the extension's bound is reached, or the canary
// met it already). The reason names the figures, e.g. "new generation:
// 5xx 23.4% over 1,204 requests (old: 0.1%, median of 4 workers)".
func (g Gates) Judge(nw Figures, old Baseline, waive bool) (Verdict, string) {
	if !g.On() {
		return GatePass, "no gates"
	}
	if nw.Requests == 0 && (waive || g.MinRequests == 0) {
		return GateNoTraffic, "new generation: no request served"
	}
	if !waive && nw.Requests < g.MinRequests {
		return GateWait, fmt.Sprintf("new generation: %s of the %s requests the gates need", count(nw.Requests), count(g.MinRequests))
	}
	var passed []string
	if g.ErrorGate {
		oldWhy := pct(old.Share) + "%"
		if of := old.of(old.Workers); of != "" {
			oldWhy += ", " + of
		}
		why := fmt.Sprintf("5xx %s%% over %s requests (old: %s)", pct(nw.Share()), count(nw.Requests), oldWhy)
		if nw.Share()-old.Share > g.MaxErrorRate {
			return GateFail, fmt.Sprintf("new generation: %s, more than %s points above; rolled back", why, pct(g.MaxErrorRate))
		}
		passed = append(passed, why)
	}
	if g.MaxLatencyFactor > 0 {
		of := old.of(old.P99Workers)
		switch {
		case old.P99 <= 0 && old.Few:
			passed = append(passed, fmt.Sprintf("p99 %s (old: %s, not compared)", nw.P99, of))
		case old.P99 <= 0 && old.ByWorker:
			passed = append(passed, fmt.Sprintf("p99 %s (old: no worker with %d requests to compare)", nw.P99, MinWorkerRequests))
		case old.P99 <= 0:
			passed = append(passed, fmt.Sprintf("p99 %s (old: no request to compare)", nw.P99))
		case float64(nw.P99) > g.MaxLatencyFactor*float64(old.P99):
			if of != "" {
				of = " (" + of + ")"
			}
			return GateFail, fmt.Sprintf("new generation: p99 %s over %s requests, %.1f× the old's %s%s (at most %s×); rolled back",
				nw.P99, count(nw.Requests), float64(nw.P99)/float64(old.P99), old.P99, of, strconv.FormatFloat(g.MaxLatencyFactor, 'f', -1, 64))
		default:
			if of != "" {
				of = ", " + of
			}
			passed = append(passed, fmt.Sprintf("p99 %s (old: %s%s)", nw.P99, old.P99, of))
		}
	}
	why := "new generation:"
	for i, p := range passed {
		if i > 0 {
			why += ","
		}
		why += " " + p
	}
	return GatePass, why
}

// pct formats a percentage with one decimal.
func pct(p float64) string {
	if math.IsNaN(p) {
		return "?"
	}
	return strconv.FormatFloat(p, 'f', 1, 64)
}

// count formats n with thousands separators: 1,204.
func count(n uint64) string {
	s := strconv.FormatUint(n, 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
