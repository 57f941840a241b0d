package drill

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/molt-server/molt/master"
)

// Report is what a drill saw. Times are in milliseconds (…Ms) or seconds
// since the start (…S); -1 means unknown (no generation header).
type Report struct {
	Target    string               `json:"target"`
	Modes     []string             `json:"modes"`
	Clients   int                  `json:"clients_per_mode"`
	Rate      float64              `json:"rate_per_mode"`
	ElapsedS  float64              `json:"elapsed_s"`
	Requests  int                  `json:"requests"`
	OK        int                  `json:"ok"`
	Failed    int                  `json:"failed"`
	Failures  map[Class]int        `json:"failures"`
	ByMode    map[string]ModeStats `json:"by_mode"`
	Latency   Percentiles          `json:"latency"`
	Steady    Percentiles          `json:"latency_steady"`
	InUpgrade Percentiles          `json:"latency_in_upgrades"`
	Upgrades  []Upgrade            `json:"upgrades"`
	Timeline  []Span               `json:"generations"`
	ByServed  map[string]int       `json:"by_generation"`
	ByWorker  map[string]int       `json:"by_worker"`
	// ConnsByWorker counts connections by the worker that answered their
	// first request (a connection whose first request failed counts for
	// none).
	ConnsByWorker map[string]int `json:"conns_by_worker"`
	IdleConns     int            `json:"idle_conns"`
	IdleClosed    int            `json:"idle_closed_by_server"`

	Elapsed time.Duration `json:"-"`
}

// ModeStats counts one connection mode.
type ModeStats struct {
	Requests int     `json:"requests"`
	OK       int     `json:"ok"`
	Failed   int     `json:"failed"`
	PerSec   float64 `json:"per_sec"`
}

// Percentiles of the latency of answered requests, in milliseconds.
type Percentiles struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50_ms"`
	P90  float64 `json:"p90_ms"`
	P99  float64 `json:"p99_ms"`
	P999 float64 `json:"p99_9_ms"`
	Max  float64 `json:"max_ms"`
}

// Upgrade is one triggered upgrade, as the clients saw it.
type Upgrade struct {
	N     int           `json:"n"`
	At    time.Duration `json:"-"`
	Fired time.Duration `json:"-"`
	AtS   float64       `json:"at_s"`
	// FiredMs is how long the trigger took (molt ctl upgrade --wait:
	// until the commit).
	FiredMs float64 `json:"trigger_ms"`
	// NewServingMs: from the trigger to the first answer by a generation
	// not seen before it; OldGoneMs: to the last answer by the generation
	// that served before it.
	NewServingMs float64 `json:"new_serving_ms"`
	OldGoneMs    float64 `json:"old_gone_ms"`
	// ByGeneration splits the answers from this trigger to the next one
	// (or the end) by the generation that gave them: how many, and how
	// many were 5xx (a canary's exposure, a bad release's errors).
	ByGeneration map[string]Split `json:"by_generation,omitempty"`
	Error        string           `json:"error,omitempty"`
	// Fault is set for a fault (--fault) instead of an upgrade: At is
	// then the kill, and FiredMs its BackMs.
	Fault *FaultResult `json:"fault,omitempty"`
}

// Split is one generation's answers in an upgrade window.
type Split struct {
	Answers int `json:"answers"`
	Errors  int `json:"5xx"`
}

// Span is a stretch of time in which the same generations answered.
type Span struct {
	FromS  float64  `json:"from_s"`
	ToS    float64  `json:"to_s"`
	Served []string `json:"served"`
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Millisecond)*1000) / 1000 }

func (r *Report) analyze(samples []sample) {
	r.ElapsedS = math.Round(r.Elapsed.Seconds()*100) / 100
	r.Failures, r.ByMode, r.ByServed, r.ByWorker, r.ConnsByWorker = map[Class]int{}, map[string]ModeStats{}, map[string]int{}, map[string]int{}, map[string]int{}
	sort.Slice(samples, func(i, j int) bool { return samples[i].end < samples[j].end })
	for _, s := range samples {
		r.Requests++
		st := r.ByMode[string(s.mode)]
		st.Requests++
		if s.class == "" {
			r.OK++
			st.OK++
			if s.served != "" {
				r.ByServed[s.served]++
			}
			if s.worker != "" {
				r.ByWorker[s.worker]++
				if s.first {
					r.ConnsByWorker[s.worker]++
				}
			}
		} else {
			r.Failed++
			st.Failed++
			r.Failures[s.class]++
		}
		r.ByMode[string(s.mode)] = st
	}
	for m, st := range r.ByMode {
		st.PerSec = math.Round(float64(st.OK)/r.Elapsed.Seconds()*10) / 10
		r.ByMode[m] = st
	}
	known := len(r.ByServed) > 0
	var windows [][2]time.Duration
	for i := range r.Upgrades {
		u := &r.Upgrades[i]
		u.AtS, u.FiredMs = math.Round(u.At.Seconds()*100)/100, ms(u.Fired)
		u.NewServingMs, u.OldGoneMs = -1, -1
		next := r.Elapsed
		if i+1 < len(r.Upgrades) {
			next = r.Upgrades[i+1].At
		}
		end := u.At + u.Fired
		if known {
			u.ByGeneration = split(samples, u.At, next)
			ns, og := generations(samples, u.At, next)
			if ns >= 0 {
				u.NewServingMs = ms(ns)
				end = max(end, u.At+ns)
			}
			if og >= 0 {
				u.OldGoneMs = ms(og)
				end = max(end, u.At+og)
			}
		}
		windows = append(windows, [2]time.Duration{u.At, end})
	}
	var all, steady, in []time.Duration
	for _, s := range samples {
		if s.class != "" {
			continue
		}
		lat := s.end - s.start
		all = append(all, lat)
		inside := false
		for _, w := range windows {
			if s.start >= w[0] && s.start <= w[1] {
				inside = true
				break
			}
		}
		if inside {
			in = append(in, lat)
		} else {
			steady = append(steady, lat)
		}
	}
	r.Latency, r.Steady, r.InUpgrade = percentiles(all), percentiles(steady), percentiles(in)
	if known {
		r.Timeline = timeline(samples)
	}
}

// generations finds, for an upgrade triggered at at (the next one at
// next), when a new generation first answered and when the one that
// served just before it last did, both relative to at.
func generations(samples []sample, at, next time.Duration) (newServing, oldGone time.Duration) {
	seen := map[string]bool{}
	recent := map[string]bool{}
	for _, s := range samples {
		if s.end >= at {
			break
		}
		if s.served != "" {
			seen[s.served] = true
			if s.end >= at-2*time.Second {
				recent[s.served] = true
			}
		}
	}
	if len(recent) == 0 {
		recent = seen
	}
	newServing, oldGone = -1, -1
	for _, s := range samples {
		if s.end < at || s.served == "" {
			continue
		}
		if s.end > next {
			break
		}
		if newServing < 0 && !seen[s.served] {
			newServing = s.end - at
		}
		if recent[s.served] {
			oldGone = s.end - at
		}
	}
	return newServing, oldGone
}

// split counts the answers, and the 5xx among them, by generation from
// at to next.
func split(samples []sample, at, next time.Duration) map[string]Split {
	out := map[string]Split{}
	for _, s := range samples {
		if s.end < at || s.served == "" || s.code == 0 {
			continue
		}
		if s.end > next {
			break
		}
		sp := out[s.served]
		sp.Answers++
		if s.code >= 500 && s.code <= 599 {
			sp.Errors++
		}
		out[s.served] = sp
	}
	return out
}

func percentiles(lat []time.Duration) Percentiles {
	if len(lat) == 0 {
		return Percentiles{}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(lat)))) - 1
		return ms(lat[max(0, min(i, len(lat)-1))])
	}
	return Percentiles{N: len(lat), P50: at(0.5), P90: at(0.9), P99: at(0.99), P999: at(0.999), Max: ms(lat[len(lat)-1])}
}

// timeline groups whole seconds by the set of generations that answered.
func timeline(samples []sample) []Span {
	var spans []Span
	sec := -1
	set := map[string]bool{}
	flush := func() {
		if sec < 0 || len(set) == 0 {
			return
		}
		var served []string
		for s := range set {
			served = append(served, s)
		}
		sort.Strings(served)
		if n := len(spans); n > 0 && strings.Join(spans[n-1].Served, ",") == strings.Join(served, ",") && spans[n-1].ToS == float64(sec) {
			spans[n-1].ToS = float64(sec + 1)
			return
		}
		spans = append(spans, Span{FromS: float64(sec), ToS: float64(sec + 1), Served: served})
	}
	for _, s := range samples {
		if s.served == "" {
			continue
		}
		if t := int(s.end / time.Second); t != sec {
			flush()
			sec, set = t, map[string]bool{}
		}
		set[s.served] = true
	}
	flush()
	return spans
}

// Print writes the report for a human. The generations and workers are
// what the answers' headers said: the server chose them, so they are
// shown as master.Printable makes them (a header may carry U+202E or a
// C1 control: Go's HTTP parser refuses only C0 controls and DEL).
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "molt drill: %s for %.1fs, %d clients per mode (%s)", r.Target, r.ElapsedS, r.Clients, strings.Join(r.Modes, ", "))
	if r.Rate > 0 {
		fmt.Fprintf(w, ", %.0f requests/s per mode", r.Rate)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "requests   %d, answered %d, failed %d\n", r.Requests, r.OK, r.Failed)
	for _, m := range r.Modes {
		st := r.ByMode[m]
		fmt.Fprintf(w, "  %-11s %d answered (%.0f/s), %d failed\n", m, st.OK, st.PerSec, st.Failed)
	}
	if r.Failed > 0 {
		var cls []string
		for c, n := range r.Failures {
			cls = append(cls, fmt.Sprintf("%s %d", c, n))
		}
		sort.Strings(cls)
		fmt.Fprintf(w, "failures   %s\n", strings.Join(cls, ", "))
	}
	fmt.Fprintln(w, "latency ms        p50      p90      p99    p99.9      max        n")
	for _, row := range []struct {
		name string
		p    Percentiles
	}{{"overall", r.Latency}, {"steady", r.Steady}, {"in upgrades", r.InUpgrade}} {
		if row.p.N == 0 {
			continue
		}
		fmt.Fprintf(w, "  %-12s %8.2f %8.2f %8.2f %8.2f %8.2f %8d\n", row.name, row.p.P50, row.p.P90, row.p.P99, row.p.P999, row.p.Max, row.p.N)
	}
	for _, u := range r.Upgrades {
		line := fmt.Sprintf("upgrade %d at %.1fs: trigger took %.0fms", u.N, u.AtS, u.FiredMs)
		if f := u.Fault; f != nil {
			line = fmt.Sprintf("fault %s at %.1fs: master %d (%s) killed", f.Name, u.AtS, f.KilledPID, f.Version(f.KilledVersion))
			if f.UpgradedFrom != 0 {
				line += fmt.Sprintf(" after its commit (from %d)", f.UpgradedFrom)
			}
			if f.BackPID != 0 {
				line += fmt.Sprintf("; master %d (%s) serving with every worker after %.0fms", f.BackPID, f.Version(f.BackVersion), f.BackMs)
			}
			if f.KeeperKept {
				line += fmt.Sprintf("; keeper %d unchanged", f.KeeperPID)
			}
			if f.Resurrections > 0 {
				line += fmt.Sprintf("; resurrections %d, the last because %s", f.Resurrections, strconv.QuoteToGraphic(f.ResurrectedBecause))
			}
		}
		if u.NewServingMs >= 0 {
			line += fmt.Sprintf("; new generation answered after %.0fms", u.NewServingMs)
		}
		if u.OldGoneMs >= 0 {
			line += fmt.Sprintf("; old generation's last answer after %.0fms", u.OldGoneMs)
		}
		if u.Error != "" {
			line += "; trigger failed: " + master.Printable(u.Error)
		}
		fmt.Fprintln(w, line)
		if len(u.ByGeneration) > 0 {
			var gens []string
			for g := range u.ByGeneration {
				gens = append(gens, g)
			}
			sort.Strings(gens)
			var parts []string
			for _, g := range gens {
				sp := u.ByGeneration[g]
				parts = append(parts, fmt.Sprintf("%s %d answers, %d 5xx (%.1f%%)", master.Printable(g), sp.Answers, sp.Errors, 100*float64(sp.Errors)/float64(max(sp.Answers, 1))))
			}
			fmt.Fprintf(w, "  by generation: %s\n", strings.Join(parts, "; "))
		}
	}
	if len(r.ByWorker) > 0 {
		var ws []string
		for w := range r.ByWorker {
			ws = append(ws, w)
		}
		sort.Strings(ws)
		var parts []string
		for _, w := range ws {
			parts = append(parts, fmt.Sprintf("%s %d (%d conns)", master.Printable(w), r.ByWorker[w], r.ConnsByWorker[w]))
		}
		fmt.Fprintf(w, "workers    %s\n", strings.Join(parts, ", "))
	}
	if len(r.Timeline) > 0 {
		var parts []string
		for _, s := range r.Timeline {
			parts = append(parts, fmt.Sprintf("%.0f-%.0fs %s", s.FromS, s.ToS, master.Printable(strings.Join(s.Served, "+"))))
		}
		fmt.Fprintf(w, "generations %s\n", strings.Join(parts, " | "))
	}
	if r.IdleConns > 0 {
		fmt.Fprintf(w, "idle connections: %d opened, %d closed by the server by the end\n", r.IdleConns, r.IdleClosed)
	}
}
