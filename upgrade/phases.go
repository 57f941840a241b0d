package upgrade

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// The phases of an upgrade, timed. Each side marks the milestones it sees
// with its clock (OldConfig.Now, NewConfig.Now: a test passes a fake one)
// as it handles the events; Phases gives them as milliseconds since the
// signal, under stable names: the log fields of upgrade.committed,
// upgrade.rolled_back and upgrade.primary, and "phases" in ctl status
// (docs/upgrades.md).

// Phase names: milliseconds from the signal (USR2 or ctl upgrade) to the
// milestone.
const (
	// PhaseStart: Handover.Upgrade was called: the new master starts.
	PhaseStart = "start_ms"
	// PhasePreflight: the pre-flight run ended (it runs alongside the new
	// master's start).
	PhasePreflight = "preflight_ms"
	// PhaseHello: the new master's hello (old side: received; new side:
	// sent).
	PhaseHello = "hello_ms"
	// PhaseConfig: the configuration (old side: sent; new side: received).
	PhaseConfig = "config_ms"
	// PhaseServing: every worker of the new generation is ready.
	PhaseServing = "serving_ms"
	// PhaseCommitted: the commit (old side: Upgrade returned nil; new
	// side: it called Ready).
	PhaseCommitted = "committed_ms"
	// PhaseRolledBack: Upgrade returned the new master's failure.
	PhaseRolledBack = "rolled_back_ms"
	// PhaseGone: (new side) the old master has exited.
	PhaseGone = "gone_ms"
)

// Derived: PhaseProbation is the time from serving to the commit, the one
// duration among the offsets; PhaseTotal is the offset of the last
// milestone reached.
const (
	PhaseProbation = "probation_ms"
	PhaseTotal     = "total_ms"
)

// phaseOrder is the order of the milestones, in logs and ctl status.
var phaseOrder = []string{PhaseStart, PhasePreflight, PhaseHello, PhaseConfig, PhaseServing, PhaseCommitted, PhaseRolledBack, PhaseGone}

// Phases maps phase names to milliseconds (0.01 ms resolution).
type Phases map[string]float64

// timeline records when each milestone of one upgrade happened, the first
// time it happened.
type timeline struct {
	since time.Time // the signal; zero: unknown yet (new side before its config)
	at    map[string]time.Time
}

func (t *timeline) mark(name string, now time.Time) {
	if t.at == nil {
		t.at = map[string]time.Time{}
	}
	if _, ok := t.at[name]; !ok {
		t.at[name] = now
	}
}

func (t *timeline) reached(name string) bool {
	_, ok := t.at[name]
	return ok
}

// phases returns the milestones as offsets from the signal (from start
// when the signal is unknown), with the derived probation and total.
func (t *timeline) phases(start time.Time) Phases {
	since := t.since
	if since.IsZero() {
		since = start
	}
	p := Phases{}
	var last time.Time
	for name, at := range t.at {
		p[name] = msOf(at.Sub(since))
		if at.After(last) {
			last = at
		}
	}
	if len(t.at) == 0 {
		return p
	}
	p[PhaseTotal] = msOf(last.Sub(since))
	if s, ok := t.at[PhaseServing]; ok {
		if c, ok := t.at[PhaseCommitted]; ok {
			p[PhaseProbation] = msOf(c.Sub(s))
		}
	}
	return p
}

func msOf(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Millisecond)*100) / 100
}

// names returns the phases present, in their order: the milestones, then
// probation_ms and total_ms.
func (p Phases) names() []string {
	var out []string
	for _, n := range append(phaseOrder[:len(phaseOrder):len(phaseOrder)], PhaseProbation, PhaseTotal) {
		if _, ok := p[n]; ok {
			out = append(out, n)
		}
	}
	return out
}

// Fields returns the phases as log key/value pairs, in order.
func (p Phases) Fields() []any {
	var kv []any
	for _, n := range p.names() {
		kv = append(kv, n, p[n])
	}
	return kv
}

// String is the human form: "preflight 3.1ms, start 0.2ms, ...".
func (p Phases) String() string {
	var parts []string
	for _, n := range p.names() {
		parts = append(parts, fmt.Sprintf("%s %sms", strings.TrimSuffix(n, "_ms"), trimFloat(p[n])))
	}
	return strings.Join(parts, ", ")
}

func trimFloat(f float64) string {
	s := fmt.Sprintf("%.2f", f)
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}
