package master

import (
	"bytes"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/metrics"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
)

// statsMsg is a datagram with MOLT_STATS= of n 2xx and m 5xx requests
// (and READY=1 with it when ready).
func statsMsg(t *testing.T, pid int, n, m uint64, ready bool) notify.Msg {
	t.Helper()
	var s worker.Stats
	s.Classes[worker.Class2xx], s.Classes[worker.Class5xx] = n, m
	s.Buckets[3] = n + m
	text := worker.NotifyStatsKey + "=" + s.Format()
	if ready {
		text = worker.NotifyReady + "\n" + text
	}
	f, err := worker.ParseNotify([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return notify.Msg{Pid: pid, Fields: f}
}

// TestTraffic_ReportsAcrossRestartsAndFloods: the reader takes one
// report a second (a burst of two), rejects a malformed one and keeps
// the datagram's other fields; the loop sums cumulative reports, and a
// worker's figures stay in the total after its exit.
func TestTraffic_ReportsAcrossRestartsAndFloods(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	m.rejected = notify.NewRejected(hclog.NewNullLogger(), "test", time.Hour)
	defer m.rejected.Close()
	w1 := f.started[0]
	var lim stats.Limiter
	apply := func(msg notify.Msg, worker int) {
		fig := m.takeStats(&msg, &lim)
		if _, ok := msg.Fields.Get("MOLT_STATS"); ok {
			t.Fatal("MOLT_STATS= reached the loop")
		}
		m.onNotify(notified{Msg: msg, worker: worker, stats: fig})
	}
	apply(statsMsg(t, w1, 10, 1, true), w1)
	if m.procs[w1].state != workerReady {
		t.Fatal("READY=1 sent with a report was lost")
	}
	apply(statsMsg(t, w1, 20, 2, false), w1) // the burst's second
	for range 100 {
		apply(statsMsg(t, w1, 1000, 1000, false), w1) // a flood: dropped
	}
	if got := m.statsDropped.Load(); got != 100 {
		t.Errorf("dropped %d reports, want 100", got)
	}
	bad := statsMsg(t, w1, 1, 1, false)
	bad.Fields.Fields[0].Value = "2 " + bad.Fields.Fields[0].Value[2:]
	lim = stats.Limiter{}
	if fig := m.takeStats(&bad, &lim); fig != nil {
		t.Errorf("a report of version 2 taken: %+v", fig)
	}
	if got := m.traffic.Total(); got.Requests() != 22 || got.Errors() != 2 {
		t.Fatalf("total %d requests, %d errors; want 22, 2", got.Requests(), got.Errors())
	}
	// The worker exits; its final report, read before the exit and
	// applied after it, adds what is new in it; its replacement counts
	// from zero.
	m.onChildExited(exited(w1))
	lim = stats.Limiter{}
	apply(statsMsg(t, w1, 30, 2, false), w1)
	w2 := f.started[len(f.started)-1]
	if w2 == w1 {
		t.Fatal("no replacement started")
	}
	lim = stats.Limiter{}
	apply(statsMsg(t, w2, 5, 0, true), w2)
	if got := m.traffic.Total(); got.Requests() != 37 || got.Classes[worker.Class2xx] != 35 {
		t.Fatalf("after the restart: %d requests, %d 2xx; want 37, 35", got.Requests(), got.Classes[worker.Class2xx])
	}
	m.onStatsTick(statsTick{at: time.Now().Add(-time.Second)})
	apply(statsMsg(t, w2, 15, 0, false), w2)
	m.onStatsTick(statsTick{at: time.Now()})
	st := m.status()
	if len(st.Traffic) != 1 || st.Traffic[0].Requests != 47 || st.Traffic[0].WindowReqs != 10 || st.Traffic[0].ReportsDropped != 100 {
		t.Errorf("status traffic %+v", st.Traffic)
	}
}

// TestTraffic_HugeReportKeepsTheHistogramCumulative: a worker that
// reports the largest count there is (2^64-1 in its first bucket, 2 in
// the others) cannot make molt_request_duration_seconds' buckets go down
// (a sum that wrapped around): they stay cumulative, saturated.
func TestTraffic_HugeReportKeepsTheHistogramCumulative(t *testing.T) {
	m, f := newTestMaster(t, 1, nil)
	w1 := f.started[0]
	var s worker.Stats
	for i := range s.Buckets {
		s.Buckets[i] = 2
	}
	s.Buckets[0] = math.MaxUint64
	s.Classes[worker.Class5xx] = math.MaxUint64
	fig := stats.Figures(s)
	m.onNotify(notified{Msg: notify.Msg{Pid: w1}, worker: w1, stats: &fig})
	var sn metrics.Snapshot
	trafficFamilies(m, &sn)
	var prev float64
	n := 0
	for _, fam := range sn.Families {
		if fam.Name != "molt_request_duration_seconds" {
			continue
		}
		for _, smp := range fam.Samples {
			if smp.Suffix != "_bucket" {
				continue
			}
			if smp.Value < prev {
				t.Errorf("bucket %v = %v after %v: not cumulative", smp.Labels, smp.Value, prev)
			}
			prev = smp.Value
			n++
		}
	}
	if n != worker.NumBuckets {
		t.Fatalf("%d buckets, want %d", n, worker.NumBuckets)
	}
}

// TestTraffic_OldMasterSendsEachWorkersFigures: during an upgrade the old
// master sends, every second, each worker slot's own figures (the gates'
// baseline) and then its generation's total. A slot's figures count every
// worker it had: a worker that restarts over and over (5 successors of
// w1 here, each reporting 1e12 errors) stays one source, not six.
func TestTraffic_OldMasterSendsEachWorkersFigures(t *testing.T) {
	m, f, h, child := newUpgradingMaster(t)
	if err := m.onUSR2(); err != nil {
		t.Fatal(err)
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindHello, Pid: child}})
	if msg := recv(t, h); msg.Kind != upgrade.KindConfig {
		t.Fatalf("configuration %+v", msg)
	}
	w1, w2 := f.started[0], f.started[1]
	for _, ev := range []notified{statsOf(w1, 10, 1), statsOf(w2, 1e12, 1e12)} {
		m.onNotify(ev)
	}
	for pid := 9001; pid <= 9005; pid++ { // w1's slot, restarted
		m.applyStats(pid, m.procs[w1].slot, *statsOf(pid, 0, 1e12).stats)
	}
	m.onStatsTick(statsTick{at: time.Now()})
	msg := recv(t, h)
	if msg.Kind != upgrade.KindWorkerFigures || msg.To != child || msg.Gen != m.gen || len(msg.Sources) != 2 {
		t.Fatalf("first figures message %+v, want the 2 workers'", msg)
	}
	got := map[int]uint64{}
	for _, s := range msg.Sources {
		fig, ok := figuresOf(s.Figures)
		if !ok {
			t.Fatalf("source %+v", s)
		}
		got[s.ID] = fig.Errors()
	}
	if got[1] != 1+5e12 || got[2] != 1e12 {
		t.Errorf("errors by slot %v, want 1: 1+5e12, 2: 1e12", got)
	}
	if msg := recv(t, h); msg.Kind != upgrade.KindFigures || len(msg.Figures) != worker.NumClasses+worker.NumBuckets {
		t.Fatalf("then %+v, want the total", msg)
	}
}

// statsOf is worker pid's report of n 2xx and e 5xx requests.
func statsOf(pid int, n, e uint64) notified {
	var s stats.Figures
	s.Classes[worker.Class2xx], s.Classes[worker.Class5xx] = n, e
	s.Buckets[3] = n + e
	return notified{Msg: notify.Msg{Pid: pid}, worker: pid, stats: &s}
}

// vector is the channel's vector of n 2xx and e 5xx requests, the 5xx in
// the last bucket.
func vector(n, e uint64) []uint64 {
	var s stats.Figures
	s.Classes[worker.Class2xx], s.Classes[worker.Class5xx] = n, e
	s.Buckets[3], s.Buckets[worker.NumBuckets-1] = n, e
	return figuresVector(s)
}

// TestTraffic_NewMasterBaseline: a new master hands its side the old
// generation's figures worker by worker once the old master sends them;
// from an old master that sends only the total (an older version), the
// sum, logged once (stats.old_sum_only). It keeps no more workers than
// twice the old master's, refusing the rest with a count, logged at the
// next tick (stats.old_worker_rejected).
func TestTraffic_NewMasterBaseline(t *testing.T) {
	m, _ := newTestMaster(t, 2, nil)
	var buf bytes.Buffer
	m.log = hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true})
	m.oldWorkers = 2
	since := time.Now()
	total := func(n, e uint64) upgrade.Msg {
		return upgrade.Msg{Kind: upgrade.KindFigures, Gen: 1, Figures: vector(n, e)}
	}
	if tr := m.gateTraffic(since, time.Now()); tr.OldByWorker || strings.Contains(buf.String(), "stats.old_sum_only") {
		t.Fatalf("before any figure from the old master: %+v, or the fallback logged:\n%s", tr, buf.String())
	}
	m.onParentFigures(total(0, 0))
	m.onParentFigures(total(3000, 1e12))
	tr := m.gateTraffic(since.Add(-time.Hour), time.Now())
	_ = m.gateTraffic(since.Add(-time.Hour), time.Now())
	if tr.OldByWorker || tr.Old.Requests != 3000+1e12 {
		t.Fatalf("from an older old master: %+v, want the sum", tr)
	}
	if n := strings.Count(buf.String(), `"event":"stats.old_sum_only"`); n != 1 {
		t.Errorf("%d stats.old_sum_only lines, want 1:\n%s", n, buf.String())
	}

	// A newer one: worker by worker, 4 at most (2 workers); one of
	// them lies, one sends a vector of the wrong length.
	workers := func(n uint64) upgrade.Msg {
		return upgrade.Msg{Kind: upgrade.KindWorkerFigures, Gen: 1, Sources: []upgrade.Source{
			{ID: 10, Figures: vector(n, 1)}, {ID: 11, Figures: vector(n, 1)}, {ID: 12, Figures: vector(n, n*n)},
			{ID: 13, Figures: vector(n, 1)}, {ID: 14, Figures: vector(n, 1)}, {ID: 15, Figures: []uint64{1, 2}},
		}}
	}
	m.takeOldWorkers(workers(100), since.Add(-time.Second), since) // before the window: not counted
	m.takeOldWorkers(workers(1100), since.Add(time.Second), since)
	tr = m.gateTraffic(since, time.Now())
	if !tr.OldByWorker || len(tr.OldWorkers) != 4 {
		t.Fatalf("worker by worker: %+v, want 4 workers", tr)
	}
	if b := upgrade.OldBaseline(tr.Old, tr.OldWorkers, tr.OldByWorker); b.Workers != 4 || b.Share != 0 {
		t.Errorf("baseline %+v, want the median of 4 workers, 0%%", b)
	}
	for _, w := range tr.OldWorkers {
		if w.Requests != 1000 && w.Requests != 1000+1100*1100-100*100 {
			t.Errorf("an old worker's window of %d requests, want 1000 (or the liar's)", w.Requests)
		}
	}
	m.onStatsTick(statsTick{at: time.Now()})
	m.onStatsTick(statsTick{at: time.Now()})
	if n := strings.Count(buf.String(), `"event":"stats.old_worker_rejected"`); n != 1 || !strings.Contains(buf.String(), `"rejected":4`) {
		t.Errorf("%d stats.old_worker_rejected lines, want 1 counting 4:\n%s", n, buf.String())
	}
}
