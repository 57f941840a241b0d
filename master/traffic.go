package master

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"time"

	"github.com/molt-server/molt/master/internal/metrics"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
)

// Traffic figures (docs/worker-protocol.md, "Traffic figures"): each
// worker reports its cumulative MOLT_STATS= figures once a second; the
// master sums them by generation (stats.Series) and snapshots the total
// every second. During an upgrade the old master sends its generation's
// figures to the new one every second, worker by worker
// (upgrade.KindWorkerFigures: the gates' baseline is their median) and
// the total (upgrade.KindFigures), so the new master holds both
// generations over the same window.

// trafficWindow is the window of the per-second rates "ctl status" shows.
const trafficWindow = 10 * time.Second

// statsTick is the once-a-second event of the figures.
type statsTick struct{ at time.Time }

func (statsTick) String() string { return "stats tick" }

// startStatsTicker sends a statsTick every second until the loop ends.
// A tick the loop's queue has no room for is skipped: the next one
// snapshots the same cumulative figures.
func (m *Master) startStatsTicker() {
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case now := <-t.C:
				select {
				case m.events <- statsTick{at: now}:
				default:
				}
			case <-m.done:
				return
			}
		}
	}()
}

// takeStats takes the MOLT_STATS= field out of a worker's datagram, in
// its reader (never in the loop): at most one report a second per worker
// passes (lim), a bad one is counted in the rejections. It returns the
// figures to apply, if any; msg keeps the other fields.
func (m *Master) takeStats(msg *notify.Msg, lim *stats.Limiter) *stats.Figures {
	v, ok := msg.Fields.Get(worker.NotifyStatsKey)
	if !ok {
		return nil
	}
	kept := msg.Fields.Fields[:0:0]
	for _, f := range msg.Fields.Fields {
		if f.Key != worker.NotifyStatsKey {
			kept = append(kept, f)
		}
	}
	msg.Fields.Fields = kept
	if !lim.Allow(time.Now()) {
		m.statsDropped.Add(1)
		return nil
	}
	s, err := worker.ParseStats(v)
	if err != nil {
		m.rejected.Add(msg.Pid, err.Error())
		return nil
	}
	f := stats.Figures(s)
	return &f
}

// trafficSeries returns this generation's figures, made when first
// needed.
func (m *Master) trafficSeries() *stats.Series {
	if m.traffic == nil {
		m.traffic = stats.NewSeries(m.gen, 0)
	}
	return m.traffic
}

// applyStats adds a worker's report to its generation's figures, and to
// its slot's: slot is the worker's slot number, or -1 for a worker
// already gone (its slot was recorded with its first report).
func (m *Master) applyStats(pid, slot int, f stats.Figures) {
	if slot >= 0 {
		m.trafficSeries().Assign(pid, slot)
	}
	if err := m.trafficSeries().Report(pid, f); err != nil {
		m.rejected.Add(pid, err.Error())
	}
}

// onStatsTick snapshots the figures and, on an old master with an
// upgrade in flight, sends them to the new master; on a new master, it
// logs the old workers' figures it refused since the last tick.
func (m *Master) onStatsTick(ev statsTick) {
	m.trafficSeries().SetGen(m.gen)
	m.traffic.Tick(ev.at)
	if m.oldRejected > m.oldRejectedLogged {
		m.oldRejectedLogged = m.oldRejected
		m.log.Warn("figures of old workers refused", "event", "stats.old_worker_rejected", "rejected", m.oldRejected,
			"max_workers", 2*m.oldWorkers, "error", m.oldRejectErr)
	}
	up := m.old.Attempt()
	if up == nil || up.Pid <= 0 || m.children == nil || up.ID == m.figuresUnsent {
		return
	}
	if err := m.sendFigures(up.Pid); err != nil {
		// A new master that does not read its channel costs the loop
		// one SendTimeout, not one a second.
		m.figuresUnsent = up.ID
		m.log.Warn("figures not sent to the new master; no more for this upgrade", "event", "stats.send_failed", "new_pid", up.Pid, "error", err)
	}
}

// sendFigures sends this generation's figures to the new master to: each
// worker slot's own (every worker the slot had: a worker that restarts
// stays one source of the gates' median), upgrade.MaxSources a message,
// then the total.
func (m *Master) sendFigures(to int) error {
	var err error
	batch := make([]upgrade.Source, 0, upgrade.MaxSources)
	flush := func() {
		if len(batch) > 0 && err == nil {
			err = m.children.Send(upgrade.Msg{Kind: upgrade.KindWorkerFigures, To: to, Pid: os.Getpid(), Gen: m.gen, Sources: batch})
		}
		batch = batch[:0]
	}
	m.traffic.Slots(func(n int, f stats.Figures) {
		batch = append(batch, upgrade.Source{ID: n + 1, Figures: figuresVector(f)}) // slots count from 0, IDs from 1
		if len(batch) == upgrade.MaxSources {
			flush()
		}
	})
	flush()
	if err != nil {
		return err
	}
	return m.children.Send(upgrade.Msg{Kind: upgrade.KindFigures, To: to, Pid: os.Getpid(), Gen: m.gen, Figures: figuresVector(m.traffic.Total())})
}

// onParentFigures takes the old generation's figures (a new master).
func (m *Master) onParentFigures(msg upgrade.Msg) {
	f, ok := figuresOf(msg.Figures)
	if !ok {
		m.log.Warn("figures from the old master have the wrong length; ignored", "event", "stats.bad_figures", "len", len(msg.Figures))
		return
	}
	if m.parentTraffic == nil || m.parentTraffic.Gen() != msg.Gen {
		m.parentTraffic = stats.NewSeries(msg.Gen, 0)
		m.log.Info("receiving the old generation's traffic figures", "event", "stats.old_generation", "old_gen", msg.Gen,
			"requests", f.Requests(), "errors", f.Errors())
	}
	m.parentTraffic.SetTotal(f)
	m.parentTraffic.Tick(time.Now())
}

// onParentWorkerFigures takes the old generation's figures worker slot
// by worker slot (a new master). It keeps at most twice as many as the
// old master runs (it may add slots on TTIN during the upgrade; one no
// longer sent keeps its place until StaleAfter); the rest is refused,
// counted and logged at the next tick.
func (m *Master) onParentWorkerFigures(msg upgrade.Msg) {
	var from time.Time
	if m.new != nil {
		from = m.new.ServingSince()
	}
	m.takeOldWorkers(msg, time.Now(), from)
}

// takeOldWorkers applies the figures of msg, received at now, to the old
// generation's workers' windows, which start at from (zero: not yet).
func (m *Master) takeOldWorkers(msg upgrade.Msg, now, from time.Time) {
	if m.oldWorkers <= 0 {
		m.oldRejected += uint64(len(msg.Sources))
		m.oldRejectErr = errors.New("per-worker figures before the old master's configuration")
		return
	}
	if m.parentWorkers == nil || m.parentWorkers.Gen() != msg.Gen {
		m.parentWorkers = stats.NewSources(msg.Gen, 2*m.oldWorkers)
		m.log.Info("receiving the old generation's traffic figures worker by worker", "event", "stats.old_by_worker",
			"old_gen", msg.Gen, "max_workers", 2*m.oldWorkers)
	}
	for _, src := range msg.Sources {
		var err error
		if f, ok := figuresOf(src.Figures); ok {
			err = m.parentWorkers.Report(src.ID, f, now, from)
		} else {
			err = fmt.Errorf("worker %d: %d figures, want %d", src.ID, len(src.Figures), worker.NumClasses+worker.NumBuckets)
		}
		if err != nil {
			m.oldRejected++
			m.oldRejectErr = err
		}
	}
}

// figuresVector lays f out as the channel carries it: the class counts,
// then the bucket counts.
func figuresVector(f stats.Figures) []uint64 {
	v := make([]uint64, 0, worker.NumClasses+worker.NumBuckets)
	v = append(v, f.Classes[:]...)
	return append(v, f.Buckets[:]...)
}

func figuresOf(v []uint64) (stats.Figures, bool) {
	var f stats.Figures
	if len(v) != worker.NumClasses+worker.NumBuckets {
		return f, false
	}
	copy(f.Classes[:], v)
	copy(f.Buckets[:], v[worker.NumClasses:])
	return f, true
}

// generations returns this master's figures and, on a new master during
// its upgrade, the old generation's as the old master last sent them
// (nil if none came). The gates of a probation evaluate both over the
// same window: own.Window(d, now) and old.Window(d, now), with the same
// now. own is snapshotted by the loop's tick, old at each message from
// the old master (both once a second).
func (m *Master) generations() (own, old *stats.Series) {
	return m.trafficSeries(), m.parentTraffic
}

// TrafficStatus is one generation's figures in "ctl status".
type TrafficStatus struct {
	Gen int `json:"gen"`
	// Source: "workers" (this master's own), or "old master" (received
	// over the upgrade channel).
	Source string `json:"source"`
	// Requests and Classes are cumulative since the generation started.
	Requests uint64            `json:"requests"`
	Classes  map[string]uint64 `json:"classes"`
	// The rest is over the last WindowSeconds (up to 10; shorter at
	// the start).
	WindowSeconds float64 `json:"window_seconds"`
	WindowReqs    uint64  `json:"window_requests"`
	RPS           float64 `json:"rps"`
	// ErrorShare: (5xx + panicked) / requests over the window, 0 to 1.
	ErrorShare float64 `json:"error_share"`
	P50MS      float64 `json:"p50_ms"`
	P99MS      float64 `json:"p99_ms"`
	// ReportsDropped counts reports past one a second per worker.
	ReportsDropped uint64 `json:"reports_dropped,omitempty"`
}

func trafficStatus(s *stats.Series, source string) TrafficStatus {
	tot := s.Total()
	w := s.Window(trafficWindow, time.Now())
	ts := TrafficStatus{Gen: s.Gen(), Source: source, Requests: tot.Requests(), Classes: map[string]uint64{},
		WindowSeconds: w.Span().Seconds(), WindowReqs: w.Requests(), RPS: w.Rate(), ErrorShare: w.ErrorShare(),
		P50MS: ms(w.Quantile(0.5)), P99MS: ms(w.Quantile(0.99))}
	for i, n := range tot.Classes {
		ts.Classes[worker.ClassNames[i]] = n
	}
	return ts
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// trafficStatuses lists this generation's figures, and the old one's
// on a new master in its upgrade.
func (m *Master) trafficStatuses() []TrafficStatus {
	own, old := m.generations()
	own.SetGen(m.gen)
	ts := trafficStatus(own, "workers")
	ts.ReportsDropped = m.statsDropped.Load()
	out := []TrafficStatus{ts}
	if old != nil && m.newUncommitted() {
		out = append(out, trafficStatus(old, "old master"))
	}
	return out
}

// trafficFamilies adds the per-generation request figures to a metrics
// snapshot: this master's generation and, on a new master during its
// upgrade, the old one's as its master last sent them. Cumulative, like
// the figures: molt_requests_total by class, and the latency histogram
// (its buckets are worker.BucketBounds; no _sum: the workers report
// counts only).
func trafficFamilies(m *Master, sn *metrics.Snapshot) {
	own, old := m.generations()
	reqs := metrics.Family{Name: "molt_requests_total", Type: "counter",
		Help: "Requests the workers answered, by generation and class (2xx, 3xx, 4xx, 5xx, panicked, cut, other), from their MOLT_STATS= reports."}
	lat := metrics.Family{Name: "molt_request_duration_seconds", Type: "histogram",
		Help: "Handler latency by generation, from the workers' MOLT_STATS= reports (no _sum: they send bucket counts only)."}
	for _, s := range []*stats.Series{old, own} {
		if s == nil {
			continue
		}
		gen := [2]string{"generation", strconv.Itoa(s.Gen())}
		tot := s.Total()
		for i, n := range tot.Classes {
			reqs.Samples = append(reqs.Samples, metrics.Sample{Labels: [][2]string{gen, {"class", worker.ClassNames[i]}}, Value: float64(n)})
		}
		var cum uint64
		for i, n := range tot.Buckets {
			// Saturating: a worker may report any count, up to 2^64-1,
			// and the buckets must stay cumulative.
			if cum += n; cum < n {
				cum = math.MaxUint64
			}
			le := "+Inf"
			if i < len(worker.BucketBounds) {
				le = strconv.FormatFloat(worker.BucketBounds[i].Seconds(), 'g', -1, 64)
			}
			lat.Samples = append(lat.Samples, metrics.Sample{Suffix: "_bucket", Labels: [][2]string{gen, {"le", le}}, Value: float64(cum)})
		}
		lat.Samples = append(lat.Samples, metrics.Sample{Suffix: "_count", Labels: [][2]string{gen}, Value: float64(cum)})
	}
	sn.Families = append(sn.Families, reqs, lat)
}
