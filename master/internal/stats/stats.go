// Package stats aggregates a generation's traffic figures: the cumulative
// MOLT_STATS= reports of its workers (worker.Stats), summed so that a
// worker that exits keeps counting in its generation's total, and a
// bounded ring of per-second snapshots of the total to answer "over the
// last W seconds: requests by class, histogram, p50/p99". Not safe for
// concurrent use: the master's loop owns it.
package stats

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/molt-server/molt/worker"
)

// Figures are cumulative or windowed counts: requests by class
// (worker.Class2xx ...) and the latency histogram (worker.BucketBounds).
type Figures worker.Stats

// Requests is the number of requests counted, every class.
func (f Figures) Requests() uint64 {
	var n uint64
	for _, c := range f.Classes {
		n = addSat(n, c)
	}
	return n
}

// Errors is the number of server errors: 5xx and panicked handlers.
func (f Figures) Errors() uint64 {
	return addSat(f.Classes[worker.Class5xx], f.Classes[worker.ClassPanicked])
}

// ErrorShare is Errors over Requests, 0 to 1; 0 with no request.
func (f Figures) ErrorShare() float64 {
	n := f.Requests()
	if n == 0 {
		return 0
	}
	return float64(f.Errors()) / float64(n)
}

// Add adds g to f, saturating.
func (f *Figures) Add(g Figures) {
	for i := range f.Classes {
		f.Classes[i] = addSat(f.Classes[i], g.Classes[i])
	}
	for i := range f.Buckets {
		f.Buckets[i] = addSat(f.Buckets[i], g.Buckets[i])
	}
}

// Sub returns f - g, each count at least 0.
func (f Figures) Sub(g Figures) Figures {
	var d Figures
	for i := range f.Classes {
		d.Classes[i] = subSat(f.Classes[i], g.Classes[i])
	}
	for i := range f.Buckets {
		d.Buckets[i] = subSat(f.Buckets[i], g.Buckets[i])
	}
	return d
}

// below reports whether some count of f is lower than g's.
func (f Figures) below(g Figures) bool {
	for i := range f.Classes {
		if f.Classes[i] < g.Classes[i] {
			return true
		}
	}
	for i := range f.Buckets {
		if f.Buckets[i] < g.Buckets[i] {
			return true
		}
	}
	return false
}

// Quantile estimates the q-quantile (0 < q <= 1) of the latency from the
// histogram, interpolating linearly inside the bucket it falls in (from
// 0 for the first); a quantile in the last, unbounded bucket is that
// bucket's lower bound. 0 with an empty histogram.
func (f Figures) Quantile(q float64) time.Duration {
	var total uint64
	for _, n := range f.Buckets {
		total = addSat(total, n)
	}
	if total == 0 || q <= 0 || math.IsNaN(q) {
		return 0
	}
	rank := math.Min(q, 1) * float64(total)
	var seen float64
	for i, n := range f.Buckets {
		if n == 0 {
			continue
		}
		if seen+float64(n) >= rank {
			if i == len(worker.BucketBounds) {
				return worker.BucketBounds[i-1]
			}
			lo := time.Duration(0)
			if i > 0 {
				lo = worker.BucketBounds[i-1]
			}
			hi := worker.BucketBounds[i]
			return lo + time.Duration(float64(hi-lo)*(rank-seen)/float64(n))
		}
		seen += float64(n)
	}
	return worker.BucketBounds[len(worker.BucketBounds)-1]
}

func addSat(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}

func subSat(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// ErrNotMonotonic: a worker's report has a count lower than its previous
// one (cumulative figures never go down).
var ErrNotMonotonic = errors.New("figures lower than the worker's previous report")

// DefaultKeep is how many per-second snapshots a Series keeps: 5 minutes.
const DefaultKeep = 300

// Series is one generation's figures: its total, the last report of each
// live worker, what each worker slot's workers reported, and a ring of
// snapshots of the total.
type Series struct {
	gen     int
	total   Figures
	workers map[int]Figures   // by worker pid: its last report
	gone    map[int]time.Time // workers that exited, and when
	// slotOf is each worker's slot (Assign); slots, by slot, the sum of
	// what its workers added: a slot's figures count every worker it
	// ever had, so a worker that restarts (or crashes on purpose) is
	// still one slot, not one more worker.
	slotOf map[int]int
	slots  map[int]Figures
	// slotAt is, for each slot, the first Tick after its last report;
	// fresh the slots reported since the last Tick, lastTick its time.
	slotAt   map[int]time.Time
	fresh    map[int]bool
	lastTick time.Time
	ring     []snapshot // oldest first once full, from head
	head     int
	keep     int
}

type snapshot struct {
	at  time.Time
	fig Figures
}

// NewSeries returns an empty series for generation gen that keeps keep
// snapshots (DefaultKeep if keep < 2).
func NewSeries(gen, keep int) *Series {
	if keep < 2 {
		keep = DefaultKeep
	}
	return &Series{gen: gen, workers: map[int]Figures{}, gone: map[int]time.Time{}, slotOf: map[int]int{}, slots: map[int]Figures{}, slotAt: map[int]time.Time{}, fresh: map[int]bool{}, keep: keep}
}

// Gen is the series' generation.
func (s *Series) Gen() int { return s.gen }

// SetGen renames the generation (a new master learns its number from the
// old one after it started counting).
func (s *Series) SetGen(gen int) { s.gen = gen }

// Report takes worker pid's cumulative figures: what they add since its
// previous report goes into the total. A report with a count lower than
// the previous one is refused (ErrNotMonotonic) and changes nothing: a
// worker can only lie about its own figures, upwards.
func (s *Series) Report(pid int, f Figures) error {
	prev := s.workers[pid]
	if f.below(prev) {
		return fmt.Errorf("worker %d: %w", pid, ErrNotMonotonic)
	}
	d := f.Sub(prev)
	s.total.Add(d)
	s.workers[pid] = f
	if n, ok := s.slotOf[pid]; ok {
		sf := s.slots[n]
		sf.Add(d)
		s.slots[n], s.fresh[n] = sf, true
	}
	return nil
}

// Assign records that worker pid serves slot n: what it reports from
// then on also counts in that slot's figures. A worker's slot never
// changes; a second Assign is ignored.
func (s *Series) Assign(pid, n int) {
	if _, ok := s.slotOf[pid]; !ok {
		s.slotOf[pid] = n
	}
}

// GoneGrace is how long a Series keeps the last report of a worker that
// exited: its final report, read before its exit but applied after it,
// still counts (as what it adds to that last report).
const GoneGrace = 5 * time.Second

// WorkerGone records that worker pid exited at now; what it reported
// stays in the total, and Tick forgets it GoneGrace later.
func (s *Series) WorkerGone(pid int, now time.Time) {
	if _, ok := s.workers[pid]; ok {
		s.gone[pid] = now
	}
}

// Knows reports whether worker pid has reported and is not forgotten.
func (s *Series) Knows(pid int) bool {
	_, ok := s.workers[pid]
	return ok
}

// SetTotal replaces the total (the figures of another master's
// generation, as it sent them).
func (s *Series) SetTotal(f Figures) { s.total = f }

// Total is the generation's cumulative figures.
func (s *Series) Total() Figures { return s.total }

// Tick records a snapshot of the total at now; the oldest is dropped
// beyond keep. Call it once a second.
func (s *Series) Tick(now time.Time) {
	s.lastTick = now
	for n := range s.fresh {
		s.slotAt[n] = now
		delete(s.fresh, n)
	}
	for pid, at := range s.gone {
		if now.Sub(at) >= GoneGrace {
			delete(s.workers, pid)
			delete(s.gone, pid)
			delete(s.slotOf, pid)
		}
	}
	sn := snapshot{at: now, fig: s.total}
	if len(s.ring) < s.keep {
		s.ring = append(s.ring, sn)
		return
	}
	s.ring[s.head] = sn
	s.head = (s.head + 1) % s.keep
}

// at returns the i-th snapshot, oldest first.
func (s *Series) at(i int) snapshot { return s.ring[(s.head+i)%len(s.ring)] }

// Window is what a generation served between two snapshots.
type Window struct {
	Figures
	From, To time.Time
}

// Span is the window's length.
func (w Window) Span() time.Duration { return w.To.Sub(w.From) }

// Rate is requests per second over the window; 0 for an empty one.
func (w Window) Rate() float64 {
	if w.Span() <= 0 {
		return 0
	}
	return float64(w.Requests()) / w.Span().Seconds()
}

// Window returns the figures over the last d before now: the latest
// snapshot minus the latest one taken at or before now-d (the oldest
// kept one, if none is that old: the window is then shorter, see Span).
// Zero with fewer than two snapshots.
func (s *Series) Window(d time.Duration, now time.Time) Window {
	n := len(s.ring)
	if n < 2 {
		return Window{}
	}
	last := s.at(n - 1)
	from := s.at(0)
	cut := now.Add(-d)
	for i := n - 2; i >= 0; i-- {
		if sn := s.at(i); !sn.at.After(cut) {
			from = sn
			break
		}
	}
	return Window{Figures: last.fig.Sub(from.fig), From: from.at, To: last.at}
}

// Limiter takes a worker's reports at one a second, with a burst of two
// (a token bucket): a worker reporting every second and once more as it
// exits loses none; a flood is dropped. The zero Limiter is full.
type Limiter struct {
	tokens float64 // spent tokens: 0 is full
	last   time.Time
}

// limiterBurst is the bucket's size.
const limiterBurst = 2

// Allow reports whether a report arriving at now is taken.
func (l *Limiter) Allow(now time.Time) bool {
	if !l.last.IsZero() {
		l.tokens = math.Max(0, l.tokens-now.Sub(l.last).Seconds())
	}
	l.last = now
	if l.tokens+1 > limiterBurst {
		return false
	}
	l.tokens++
	return true
}

// Slots calls fn with each slot's figures (cumulative: every worker the
// slot had), in no particular order, leaving out a slot with no report
// in the GoneGrace before the last Tick (one removed by TTOU, or whose
// worker is not running) and one reported only since: the sum stays,
// for when it reports again.
func (s *Series) Slots(fn func(n int, f Figures)) {
	for n, f := range s.slots {
		if at, ok := s.slotAt[n]; ok && s.lastTick.Sub(at) <= GoneGrace {
			fn(n, f)
		}
	}
}

// Sources are another master's generation's figures worker by worker,
// as that master sends them (each worker's cumulative report), for the
// gates' baseline (upgrade.OldBaseline): each worker's figures over a
// window that starts when the caller says (Report's from). Bounded: at
// most max workers; a worker the sender no longer reports makes room for
// a new one once it is StaleAfter old. Not safe for concurrent use.
type Sources struct {
	gen, max int
	byID     map[int]*source
}

type source struct {
	base, last Figures // at the window's start (or first report), and now
	seen       time.Time
}

// ErrTooManySources: a report for one more worker than a Sources keeps.
var ErrTooManySources = errors.New("more workers than the sender can have")

// StaleAfter is how long a worker may go unreported (the sender reports
// each of its workers every second) before a new one may take its place
// in a full Sources: it exited.
const StaleAfter = 3 * time.Second

// NewSources returns empty Sources of generation gen keeping at most n
// workers (at least 1).
func NewSources(gen, n int) *Sources {
	return &Sources{gen: gen, max: max(n, 1), byID: map[int]*source{}}
}

// Gen is the sources' generation.
func (s *Sources) Gen() int { return s.gen }

// Report takes worker id's cumulative figures f, received at: a report
// at or before from (zero: the window has not started) is the worker's
// base, what its window counts from; one after adds to its window. A
// worker first reported after from counts from that first report. A
// report lower than the worker's previous one (ErrNotMonotonic), or for
// one worker more than max when none is stale (ErrTooManySources), is
// refused and changes nothing.
func (s *Sources) Report(id int, f Figures, at, from time.Time) error {
	src, ok := s.byID[id]
	switch {
	case ok && f.below(src.last):
		return fmt.Errorf("worker %d: %w", id, ErrNotMonotonic)
	case !ok && len(s.byID) >= s.max && !s.evict(at):
		return fmt.Errorf("worker %d: %w (%d)", id, ErrTooManySources, s.max)
	case !ok:
		src = &source{base: f}
		s.byID[id] = src
	}
	if from.IsZero() || !at.After(from) {
		src.base = f
	}
	src.last, src.seen = f, at
	return nil
}

// evict forgets the worker reported longest ago, if that is StaleAfter
// before now.
func (s *Sources) evict(now time.Time) bool {
	oldest, at := 0, now
	for id, src := range s.byID {
		if src.seen.Before(at) {
			oldest, at = id, src.seen
		}
	}
	if oldest == 0 || now.Sub(at) < StaleAfter {
		return false
	}
	delete(s.byID, oldest)
	return true
}

// Len is the number of workers kept.
func (s *Sources) Len() int { return len(s.byID) }

// Windows appends each worker's figures over its window to dst.
func (s *Sources) Windows(dst []Figures) []Figures {
	for _, src := range s.byID {
		dst = append(dst, src.last.Sub(src.base))
	}
	return dst
}
