package upgrade

import (
	"fmt"
	"math"
	"strconv"
	"time"
)

// The gates of a probation (docs/upgrades.md, "Gates"): the new
// generation's traffic over the probation, against the old generation's
// over the same window. The new master, which has both (the old master
// sends its figures over the channel), feeds them to its side as
// Traffic events; Judge is the rule, over plain numbers.

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
// one's over the same window. waive drops the minimum of requests (the
// extension's bound is reached, or the canary met it already). The reason
// names the figures, e.g. "new generation: 5xx 23.4% over 1,204 requests
// (old: 0.1%)".
func (g Gates) Judge(nw, old Figures, waive bool) (Verdict, string) {
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
		why := fmt.Sprintf("5xx %s%% over %s requests (old: %s%%)", pct(nw.Share()), count(nw.Requests), pct(old.Share()))
		if nw.Share()-old.Share() > g.MaxErrorRate {
			return GateFail, fmt.Sprintf("new generation: %s, more than %s points above; rolled back", why, pct(g.MaxErrorRate))
		}
		passed = append(passed, why)
	}
	if g.MaxLatencyFactor > 0 {
		switch {
		case old.Requests == 0 || old.P99 <= 0:
			passed = append(passed, fmt.Sprintf("p99 %s (old: no request to compare)", nw.P99))
		case float64(nw.P99) > g.MaxLatencyFactor*float64(old.P99):
			return GateFail, fmt.Sprintf("new generation: p99 %s over %s requests, %.1f× the old's %s (at most %s×); rolled back",
				nw.P99, count(nw.Requests), float64(nw.P99)/float64(old.P99), old.P99, strconv.FormatFloat(g.MaxLatencyFactor, 'f', -1, 64))
		default:
			passed = append(passed, fmt.Sprintf("p99 %s (old: %s)", nw.P99, old.P99))
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
