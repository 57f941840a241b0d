package stats

import (
	"errors"
	"testing"
	"time"

	"github.com/molt-server/molt/worker"
)

// fig is n requests of class c, all in bucket b.
func fig(c, b int, n uint64) Figures {
	var f Figures
	f.Classes[c] = n
	f.Buckets[b] = n
	return f
}

func plus(fs ...Figures) Figures {
	var t Figures
	for _, f := range fs {
		t.Add(f)
	}
	return t
}

func TestSeries_AggregatesAcrossWorkerRestarts(t *testing.T) {
	s := NewSeries(3, 10)
	if err := s.Report(100, fig(worker.Class2xx, 2, 10)); err != nil {
		t.Fatal(err)
	}
	if err := s.Report(101, fig(worker.Class5xx, 2, 4)); err != nil {
		t.Fatal(err)
	}
	// Cumulative: the second report of 100 adds 5, not 15.
	if err := s.Report(100, fig(worker.Class2xx, 2, 15)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1000, 0)
	s.WorkerGone(100, t0)
	// Its final report, applied after its exit, adds what is new.
	if !s.Knows(100) {
		t.Fatal("an exited worker forgotten at once")
	}
	if err := s.Report(100, fig(worker.Class2xx, 2, 15)); err != nil {
		t.Fatal(err)
	}
	s.Tick(t0.Add(GoneGrace))
	if s.Knows(100) {
		t.Error("an exited worker still known after GoneGrace")
	}
	// Its replacement (another pid, counting from 0) adds to the total.
	if err := s.Report(102, fig(worker.Class2xx, 2, 7)); err != nil {
		t.Fatal(err)
	}
	tot := s.Total()
	if got := tot.Classes[worker.Class2xx]; got != 22 {
		t.Errorf("2xx = %d, want 22 (15 from the exited worker, 7 from its replacement)", got)
	}
	if got := tot.Requests(); got != 26 {
		t.Errorf("requests = %d, want 26", got)
	}
	if got := tot.ErrorShare(); got != 4.0/26 {
		t.Errorf("error share = %v", got)
	}
	// A lying worker cannot take back what it reported, nor anyone else's.
	if err := s.Report(101, fig(worker.Class5xx, 2, 1)); !errors.Is(err, ErrNotMonotonic) {
		t.Errorf("a lower report: %v, want ErrNotMonotonic", err)
	}
	if got := s.Total(); got != tot {
		t.Errorf("a refused report changed the total: %v", got)
	}
	// A huge report saturates instead of wrapping.
	big := fig(worker.Class2xx, 0, ^uint64(0)-3)
	if err := s.Report(103, big); err != nil {
		t.Fatal(err)
	}
	if got := s.Total().Requests(); got != ^uint64(0) {
		t.Errorf("requests = %d, want saturated", got)
	}
}

func TestSeries_Window(t *testing.T) {
	s := NewSeries(1, 5)
	t0 := time.Unix(1000, 0)
	if w := s.Window(time.Minute, t0); w.Requests() != 0 || w.Rate() != 0 {
		t.Errorf("empty series: %+v", w)
	}
	// 10 requests a second for 8 seconds; the ring keeps 5 snapshots.
	for i := 0; i <= 8; i++ {
		if err := s.Report(1, fig(worker.Class2xx, 4, uint64(10*i))); err != nil {
			t.Fatal(err)
		}
		s.Tick(t0.Add(time.Duration(i) * time.Second))
	}
	now := t0.Add(8 * time.Second)
	w := s.Window(2*time.Second, now)
	if w.Requests() != 20 || w.Span() != 2*time.Second || w.Rate() != 10 {
		t.Errorf("2 s window: %d requests over %v, rate %v", w.Requests(), w.Span(), w.Rate())
	}
	// Longer than the ring: as long as it keeps (4 s between 5 snapshots).
	w = s.Window(time.Hour, now)
	if w.Requests() != 40 || w.Span() != 4*time.Second {
		t.Errorf("1 h window: %d requests over %v", w.Requests(), w.Span())
	}
}

func TestFigures_Quantile(t *testing.T) {
	var empty Figures
	if q := empty.Quantile(0.99); q != 0 {
		t.Errorf("empty: p99 = %v", q)
	}
	// 99 requests at <= 1 ms (bucket 4: 500 µs to 1 ms), 1 in 50-100 ms.
	f := plus(fig(worker.Class2xx, 4, 99), fig(worker.Class2xx, 10, 1))
	if q := f.Quantile(0.5); q <= 500*time.Microsecond || q > time.Millisecond {
		t.Errorf("p50 = %v, want in (500µs, 1ms]", q)
	}
	if q := f.Quantile(0.99); q != time.Millisecond {
		t.Errorf("p99 = %v, want 1ms", q)
	}
	if q := f.Quantile(1); q != 100*time.Millisecond {
		t.Errorf("p100 = %v, want 100ms", q)
	}
	// A five times slower release moves p99 by about five.
	slow := plus(fig(worker.Class2xx, 8, 99), fig(worker.Class2xx, 10, 1)) // 10-25 ms
	if r := float64(slow.Quantile(0.99)) / float64(fig(worker.Class2xx, 6, 100).Quantile(0.99)); r < 4 || r > 6 {
		t.Errorf("p99 ratio %v, want about 5", r)
	}
	// The unbounded bucket answers its lower bound.
	if q := fig(worker.Class2xx, worker.NumBuckets-1, 3).Quantile(0.5); q != 10*time.Second {
		t.Errorf("p50 in the last bucket = %v", q)
	}
}

func TestLimiter(t *testing.T) {
	var l Limiter
	t0 := time.Unix(1000, 0)
	// Every second and a last one right after: all taken.
	for i := 0; i < 10; i++ {
		if !l.Allow(t0.Add(time.Duration(i) * time.Second)) {
			t.Fatalf("report %d at one a second dropped", i)
		}
	}
	if !l.Allow(t0.Add(9*time.Second + time.Millisecond)) {
		t.Fatal("the final report right after a periodic one dropped")
	}
	// A flood: nothing more within the second.
	taken := 0
	for i := 0; i < 1000; i++ {
		if l.Allow(t0.Add(9*time.Second + 2*time.Millisecond + time.Duration(i)*time.Microsecond)) {
			taken++
		}
	}
	if taken != 0 {
		t.Errorf("flood: %d taken", taken)
	}
	if !l.Allow(t0.Add(11 * time.Second)) {
		t.Error("a report a second after the flood dropped")
	}
}

// TestSources_WindowsAndBound: each worker's window counts from its last
// report at or before the window's start (or its first report, if later);
// a report that goes down is refused; the Sources keep at most their
// bound of workers, a new one taking the place of one unreported for
// StaleAfter.
func TestSources_WindowsAndBound(t *testing.T) {
	t0 := time.Unix(1000, 0)
	from := t0.Add(2 * time.Second)
	s := NewSources(4, 3)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// Before the window: bases; no window started yet (from zero) too.
	must(s.Report(10, fig(worker.Class2xx, 1, 100), t0, time.Time{}))
	must(s.Report(11, fig(worker.Class5xx, 1, 50), t0, from))
	must(s.Report(10, fig(worker.Class2xx, 1, 150), from, from))
	// In the window.
	must(s.Report(10, fig(worker.Class2xx, 1, 170), from.Add(time.Second), from))
	must(s.Report(11, fig(worker.Class5xx, 1, 80), from.Add(time.Second), from))
	// First reported in the window: counts from there.
	must(s.Report(12, fig(worker.Class2xx, 1, 5), from.Add(time.Second), from))
	must(s.Report(12, fig(worker.Class2xx, 1, 9), from.Add(2*time.Second), from))
	if err := s.Report(11, fig(worker.Class5xx, 1, 79), from.Add(2*time.Second), from); !errors.Is(err, ErrNotMonotonic) {
		t.Errorf("a report going down: %v", err)
	}
	got := map[uint64]bool{}
	for _, w := range s.Windows(nil) {
		got[w.Requests()] = true
	}
	if len(got) != 3 || !got[20] || !got[30] || !got[4] {
		t.Errorf("windows of %v requests, want 20, 30 and 4", got)
	}
	// Full: a fourth worker is refused while the others report...
	at := from.Add(3 * time.Second)
	if err := s.Report(13, fig(worker.Class2xx, 1, 1), at, from); !errors.Is(err, ErrTooManySources) {
		t.Errorf("a fourth worker of 3: %v", err)
	}
	// ... and takes the place of one unreported for StaleAfter.
	must(s.Report(10, fig(worker.Class2xx, 1, 200), at, from))
	must(s.Report(12, fig(worker.Class2xx, 1, 10), at, from))
	must(s.Report(13, fig(worker.Class2xx, 1, 1), from.Add(time.Second+StaleAfter), from))
	if s.Len() != 3 {
		t.Errorf("%d workers kept, want 3", s.Len())
	}
}

// TestSeries_SlotsCountEveryWorkerOfTheSlot: a slot's figures add up
// what each of its workers reported, one after the other and side by
// side (a recycling), including a final report after the exit; a
// worker's slot is the first one it is assigned.
func TestSeries_SlotsCountEveryWorkerOfTheSlot(t *testing.T) {
	s := NewSeries(1, 10)
	s.Assign(100, 0)
	s.Assign(101, 1)
	_ = s.Report(100, fig(worker.Class5xx, 1, 5))
	_ = s.Report(101, fig(worker.Class2xx, 1, 7))
	s.WorkerGone(100, time.Unix(1000, 0))
	_ = s.Report(100, fig(worker.Class5xx, 1, 6)) // its final report
	s.Assign(102, 0)                              // its successor
	s.Assign(102, 1)                              // ignored
	_ = s.Report(102, fig(worker.Class5xx, 1, 4))
	s.Tick(time.Unix(1000+int64(GoneGrace/time.Second), 0)) // 100 forgotten
	s.Assign(100, 1)                                        // a reused pid starts from nothing
	_ = s.Report(100, fig(worker.Class2xx, 1, 3))
	got := map[int]Figures{}
	s.Slots(func(n int, f Figures) { got[n] = f })
	if len(got) != 2 || got[0].Errors() != 10 || got[0].Requests() != 10 || got[1].Requests() != 10 || got[1].Errors() != 0 {
		t.Errorf("slots %+v, want slot 0: 10 requests, all errors; slot 1: 10, none", got)
	}
	if tot := s.Total(); tot.Requests() != 20 {
		t.Errorf("total %d requests, want 20", tot.Requests())
	}
	// Slot 0 reports no more (removed): it is left out once GoneGrace
	// passed without a report; slot 1 goes on.
	for i := int64(1); i <= int64(GoneGrace/time.Second)+1; i++ {
		s.Tick(time.Unix(1000+int64(GoneGrace/time.Second)+i, 0))
		_ = s.Report(100, fig(worker.Class2xx, 1, uint64(3+i)))
	}
	got = map[int]Figures{}
	s.Slots(func(n int, f Figures) { got[n] = f })
	if _, ok := got[0]; ok || len(got) != 1 {
		t.Errorf("slots %+v, want slot 1 only", got)
	}
}
