package master

import (
	"math"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/metrics"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
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
