// Package metrics is the master's Prometheus endpoint (--metrics-listen):
// the figures a master publishes (Snapshot), the monotonic part of them
// that travels from master to master (Counters), and the HTTP server that
// renders the last published snapshot in the Prometheus text format.
//
// The master's loop never waits for it: the loop builds a Snapshot and
// stores it with one atomic pointer write (Server.Publish); the HTTP
// goroutines only load that pointer. A scrape never reaches the loop.
package metrics

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// Outcomes of an upgrade (molt_upgrades_total's outcome label).
const (
	OutcomeCommitted  = "committed"
	OutcomeRolledBack = "rolled_back"
	OutcomeTakenBack  = "taken_back"
)

// ReasonOK is the reason of a commit.
const ReasonOK = "ok"

// DurationBuckets are the upper bounds, in seconds, of every duration
// histogram: upgrades take from tens of milliseconds (a quick app, a short
// probation) to minutes (a slow drain).
var DurationBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// Histogram is a duration histogram over DurationBuckets.
type Histogram struct {
	// Counts: one per bucket, not cumulative, the last one for +Inf.
	Counts []uint64 `json:"counts"`
	Sum    float64  `json:"sum"`
}

// Observe adds one duration, in seconds.
func (h *Histogram) Observe(sec float64) {
	if len(h.Counts) != len(DurationBuckets)+1 {
		h.Counts = make([]uint64, len(DurationBuckets)+1)
	}
	i := sort.SearchFloat64s(DurationBuckets, sec) // the first bound >= sec
	h.Counts[i]++
	h.Sum += sec
}

func (h Histogram) count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

func (h Histogram) plus(o Histogram) Histogram {
	out := Histogram{Counts: make([]uint64, len(DurationBuckets)+1), Sum: h.Sum + o.Sum}
	for i := range out.Counts {
		if i < len(h.Counts) {
			out.Counts[i] += h.Counts[i]
		}
		if i < len(o.Counts) {
			out.Counts[i] += o.Counts[i]
		}
	}
	return out
}

// Counters are a master's monotonic figures. A new master starts from its
// old master's (sent over the G1↔G2 channel, upgrade.KindMetrics) and adds
// its own, so that they keep counting across upgrades.
type Counters struct {
	// Upgrades counts ended upgrades by UpgradeKey(outcome, reason).
	Upgrades map[string]uint64 `json:"upgrades,omitempty"`
	// Restarts counts workers that exited unexpectedly and were replaced;
	// Backoffs, the respawns the crash-loop backoff delayed.
	Restarts uint64 `json:"restarts,omitempty"`
	Backoffs uint64 `json:"backoffs,omitempty"`
	// Resurrections counts masters the keeper started because every
	// master had died.
	Resurrections uint64 `json:"resurrections,omitempty"`
	// UpgradeSeconds: from the signal to the end, by outcome;
	// DrainSeconds: by what drained ("generation": an old generation after
	// a commit; "worker": one worker told to stop).
	UpgradeSeconds map[string]Histogram `json:"upgrade_seconds,omitempty"`
	DrainSeconds   map[string]Histogram `json:"drain_seconds,omitempty"`
}

// UpgradeKey is the key of Counters.Upgrades.
func UpgradeKey(outcome, reason string) string { return outcome + "/" + reason }

// Plus returns c + o, fresh maps.
func (c Counters) Plus(o Counters) Counters {
	out := Counters{Restarts: c.Restarts + o.Restarts, Backoffs: c.Backoffs + o.Backoffs, Resurrections: c.Resurrections + o.Resurrections,
		Upgrades: map[string]uint64{}, UpgradeSeconds: map[string]Histogram{}, DrainSeconds: map[string]Histogram{}}
	for _, m := range []map[string]uint64{c.Upgrades, o.Upgrades} {
		for k, v := range m {
			out.Upgrades[k] += v
		}
	}
	for _, pair := range [][2]map[string]Histogram{{c.UpgradeSeconds, out.UpgradeSeconds}, {o.UpgradeSeconds, out.UpgradeSeconds},
		{c.DrainSeconds, out.DrainSeconds}, {o.DrainSeconds, out.DrainSeconds}} {
		for k, h := range pair[0] {
			pair[1][k] = pair[1][k].plus(h)
		}
	}
	return out
}

// Limits of what DecodeCounters accepts: an old master is trusted, but a
// malformed or older message must not make this one render garbage.
const (
	maxKeys     = 64
	maxLabelLen = 64
)

// Encode is the JSON form sent to a new master.
func (c Counters) Encode() ([]byte, error) {
	b, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("metrics: encode counters: %w", err)
	}
	return b, nil
}

// DecodeCounters parses what an old master sent; it refuses too many keys,
// keys that are not short label values, and histograms of other buckets.
func DecodeCounters(b []byte) (Counters, error) {
	var c Counters
	if err := json.Unmarshal(b, &c); err != nil {
		return Counters{}, fmt.Errorf("metrics: decode counters: %w", err)
	}
	if len(c.Upgrades) > maxKeys || len(c.UpgradeSeconds) > maxKeys || len(c.DrainSeconds) > maxKeys {
		return Counters{}, errors.New("metrics: decode counters: too many keys")
	}
	for k := range c.Upgrades {
		o, r, ok := strings.Cut(k, "/")
		if !ok || !labelValueOK(o) || !labelValueOK(r) {
			return Counters{}, fmt.Errorf("metrics: decode counters: bad upgrade key %q", k)
		}
	}
	for _, m := range []map[string]Histogram{c.UpgradeSeconds, c.DrainSeconds} {
		for k, h := range m {
			if !labelValueOK(k) || len(h.Counts) != len(DurationBuckets)+1 || h.Sum < 0 {
				return Counters{}, fmt.Errorf("metrics: decode counters: bad histogram %q", k)
			}
		}
	}
	return c, nil
}

// labelValueOK: the label values molt uses are short words.
func labelValueOK(s string) bool {
	if len(s) > maxLabelLen {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
			return false
		}
	}
	return true
}

// Snapshot is everything one scrape shows: what the master's loop
// published last.
type Snapshot struct {
	Counters
	// Gen is the publishing master's generation.
	Gen int
	// Workers counts worker processes by generation and state.
	Workers []WorkerCount
	// LastPhases: the phases of the last upgrade this master saw, in
	// seconds since its signal (upgrade.Phases, without the _ms).
	LastPhases map[string]float64
	// Families are added by collectors the master registers (the
	// per-generation request figures plug in here); rendered after molt's
	// own, in order.
	Families []Family
}

// WorkerCount is one sample of molt_workers.
type WorkerCount struct {
	Gen   int
	State string
	N     int
}

// Family is one metric family a collector adds: Type is "counter",
// "gauge" or "histogram"; a histogram's samples are its _bucket, _sum and
// _count lines, named in Sample.Suffix.
type Family struct {
	Name, Help, Type string
	Samples          []Sample
}

// Sample is one line of a Family.
type Sample struct {
	Suffix string      // "" or _bucket, _sum, _count
	Labels [][2]string // name, value
	Value  float64
}

// labels renders {a="x",b="y"} ("" for none), escaping values as the text
// format wants.
func labels(kv [][2]string) string {
	if len(kv) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, p := range kv {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p[0])
		b.WriteString(`="`)
		b.WriteString(escape(p[1]))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

var escaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)

func escape(s string) string { return escaper.Replace(s) }

func formatBound(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
