package worker

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Traffic figures (docs/worker-protocol.md, "Traffic figures"): a worker
// counts the requests it answered by class and their latency in a
// histogram of fixed buckets, and sends the cumulative figures to the
// master once a second as MOLT_STATS=. ServeHTTP does it for a Go app;
// an app in another language sends the same field itself.

// NotifyStatsKey is the notify field of the traffic figures.
const NotifyStatsKey = "MOLT_STATS"

// EnvStats, set to "off" in a worker's environment, turns the counting
// and the reports of ServeHTTP off.
const EnvStats = "MOLT_STATS"

// StatsInterval is how often ServeHTTP reports the figures.
const StatsInterval = time.Second

// The request classes, in the order of the format.
const (
	Class2xx      = iota
	Class3xx      // 3xx
	Class4xx      // 4xx
	Class5xx      // 5xx
	ClassPanicked // the handler panicked (http.ErrAbortHandler included), its client still there
	// ClassCut: the request's connection or stream closed before the
	// handler returned (the client went away, an HTTP/2 reset, or the
	// drain timeout closed it): the answer may not have reached the
	// client, whatever status it had, and whether the handler returned
	// or panicked.
	ClassCut
	// ClassOther: a hijacked connection (WebSocket, raw stream) or a
	// status outside 200-599 (101 Switching Protocols, 6xx-9xx).
	ClassOther
	NumClasses
)

// ClassNames are the classes' names, in their order.
var ClassNames = [NumClasses]string{"2xx", "3xx", "4xx", "5xx", "panicked", "cut", "other"}

// BucketBounds are the upper bounds (inclusive) of the latency
// histogram's buckets; one more bucket, the last, has no bound. The
// latency is from the handler's call to its return.
var BucketBounds = [...]time.Duration{
	50 * time.Microsecond, 100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// NumBuckets is the number of histogram buckets.
const NumBuckets = len(BucketBounds) + 1

// StatsVersion is the version of the MOLT_STATS format this package
// writes and reads.
const StatsVersion = "1"

// MaxStatsCount bounds every number of a MOLT_STATS value (15 digits):
// sums over thousands of workers cannot overflow.
const MaxStatsCount = 999_999_999_999_999

// Stats are a worker's cumulative traffic figures.
type Stats struct {
	Classes [NumClasses]uint64
	Buckets [NumBuckets]uint64
}

// ErrStats is wrapped by every error ParseStats returns.
var ErrStats = errors.New("MOLT_STATS: malformed value")

// Format returns the MOLT_STATS value of s:
//
//	1 <2xx>,<3xx>,<4xx>,<5xx>,<panicked>,<cut>,<other> <bucket 0>,...,<bucket 17>
//
// the version, a space, the 7 class counts, a space, the 18 bucket
// counts, all decimal.
func (s Stats) Format() string {
	b := make([]byte, 0, 128)
	b = append(b, StatsVersion...)
	for i, n := range s.Classes {
		b = append(b, sep(i))
		b = strconv.AppendUint(b, min(n, MaxStatsCount), 10)
	}
	for i, n := range s.Buckets {
		b = append(b, sep(i))
		b = strconv.AppendUint(b, min(n, MaxStatsCount), 10)
	}
	return string(b)
}

// sep is the separator before the i-th count of a list.
func sep(i int) byte {
	if i == 0 {
		return ' '
	}
	return ','
}

// ParseStats parses a MOLT_STATS value strictly: version 1, exactly
// NumClasses and NumBuckets counts, each 1 to 15 decimal digits. Errors
// wrap ErrStats.
func ParseStats(v string) (Stats, error) {
	var s Stats
	if len(v) > 512 {
		return s, fmt.Errorf("%w: %d bytes", ErrStats, len(v))
	}
	ver, rest, ok := strings.Cut(v, " ")
	if !ok || ver != StatsVersion {
		return s, fmt.Errorf("%w: want version %s first", ErrStats, StatsVersion)
	}
	classes, buckets, ok := strings.Cut(rest, " ")
	if !ok {
		return s, fmt.Errorf("%w: want the class counts and the bucket counts", ErrStats)
	}
	if err := parseCounts(classes, s.Classes[:], "class"); err != nil {
		return Stats{}, err
	}
	if err := parseCounts(buckets, s.Buckets[:], "bucket"); err != nil {
		return Stats{}, err
	}
	return s, nil
}

func parseCounts(v string, into []uint64, what string) error {
	i := 0
	for f := range strings.SplitSeq(v, ",") {
		if i == len(into) {
			return fmt.Errorf("%w: more than %d %s counts", ErrStats, len(into), what)
		}
		if len(f) == 0 || len(f) > 15 {
			return fmt.Errorf("%w: %s count %d: want 1 to 15 digits", ErrStats, what, i)
		}
		var n uint64
		for j := 0; j < len(f); j++ {
			c := f[j]
			if c < '0' || c > '9' {
				return fmt.Errorf("%w: %s count %d: not a decimal number", ErrStats, what, i)
			}
			n = n*10 + uint64(c-'0')
		}
		into[i] = n
		i++
	}
	if i != len(into) {
		return fmt.Errorf("%w: %d %s counts, want %d", ErrStats, i, what, len(into))
	}
	return nil
}

// BucketOf returns the histogram bucket of latency d.
func BucketOf(d time.Duration) int {
	for i, b := range BucketBounds {
		if d <= b {
			return i
		}
	}
	return len(BucketBounds)
}

// counters are this process's figures: atomics only, no lock on the
// request path.
type counters struct {
	classes [NumClasses]atomic.Uint64
	buckets [NumBuckets]atomic.Uint64
}

func (c *counters) record(class int, d time.Duration) {
	c.buckets[BucketOf(d)].Add(1)
	c.classes[class].Add(1)
}

// snapshot reads the figures. Classes first: a report never counts a
// request in a class that it does not count in the histogram.
func (c *counters) snapshot() Stats {
	var s Stats
	for i := range c.classes {
		s.Classes[i] = c.classes[i].Load()
	}
	for i := range c.buckets {
		s.Buckets[i] = c.buckets[i].Load()
	}
	return s
}

// traffic is the process's one set of figures: the master aggregates by
// worker process, whatever number of servers it runs.
var traffic counters

// TrafficStats returns this process's figures so far, as ServeHTTP
// counts them.
func TrafficStats() Stats { return traffic.snapshot() }

// reporter sends the figures every StatsInterval while at least one
// ServeHTTP serves, and once more when the last one has returned.
var reporter struct {
	mu     sync.Mutex
	active int
	stop   chan struct{}
	done   chan struct{}
}

// statsOn says whether ServeHTTP counts and reports: under molt (its
// master's pid and a notify socket set), unless MOLT_STATS=off. Under
// systemd there is no one to read the figures.
func statsOn() bool {
	return os.Getenv(EnvMasterPID) != "" && os.Getenv(EnvNotifySocket) != "" && os.Getenv(EnvStats) != "off"
}

// startReporting starts the reporter if it is not running; the returned
// function ends this server's share of it.
func startReporting() (stop func()) {
	reporter.mu.Lock()
	defer reporter.mu.Unlock()
	reporter.active++
	if reporter.active == 1 {
		st, done := make(chan struct{}), make(chan struct{})
		reporter.stop, reporter.done = st, done
		go report(st, done)
	}
	return func() {
		reporter.mu.Lock()
		reporter.active--
		var st, done chan struct{}
		if reporter.active == 0 {
			st, done = reporter.stop, reporter.done
		}
		reporter.mu.Unlock()
		if st != nil {
			close(st)
			<-done
		}
	}
}

// report sends the figures every StatsInterval, and a last time when
// stop closes: everything served until then. A lost datagram costs one
// interval's lag: the figures are cumulative.
func report(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(StatsInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			_ = NotifyTo(os.Getenv(EnvNotifySocket), NotifyStatsKey+"="+traffic.snapshot().Format())
		case <-stop:
			_ = Notify(NotifyStatsKey + "=" + traffic.snapshot().Format())
			return
		}
	}
}

// countRequests wraps h so that every request is counted in traffic.
func countRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := recorder{ResponseWriter: w}
		returned := false
		defer func() {
			class := rec.class()
			switch {
			case r.Context().Err() != nil:
				// The client went away (or the drain cut it) before the
				// handler returned, however it ended: a handler that
				// aborts because it can no longer write
				// (http.ErrAbortHandler, as httputil.ReverseProxy does)
				// is no server error, or any client could raise a
				// worker's error share by hanging up mid-answer.
				class = ClassCut
			case !returned:
				class = ClassPanicked
			}
			traffic.record(class, time.Since(start))
		}()
		h.ServeHTTP(rec.wrap(w), r)
		returned = true
	})
}

// recorder notes the status a handler answers with.
type recorder struct {
	http.ResponseWriter
	status   int // the final status written; 0: none yet (200 when the handler returns)
	hijacked bool
}

func (rec *recorder) class() int {
	switch s := rec.status; {
	case rec.hijacked:
		return ClassOther
	case s == 0:
		return Class2xx // net/http answers 200
	case s >= 200 && s < 600:
		return s/100 - 2
	}
	return ClassOther
}

func (rec *recorder) WriteHeader(code int) {
	if rec.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		rec.status = code
	}
	rec.ResponseWriter.WriteHeader(code)
}

func (rec *recorder) Write(b []byte) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.ResponseWriter.Write(b)
}

func (rec *recorder) WriteString(s string) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return io.WriteString(rec.ResponseWriter, s)
}

// Unwrap lets http.ResponseController reach net/http's writer.
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

// wrap returns a writer with the optional interfaces w has: net/http's
// HTTP/1 writer (Flusher, Hijacker, ReaderFrom, StringWriter,
// CloseNotifier) or its HTTP/2 one (Flusher, Pusher, StringWriter,
// CloseNotifier); any other gets the recorder alone.
func (rec *recorder) wrap(w http.ResponseWriter) http.ResponseWriter {
	if _, ok := w.(h1Writer); ok {
		return h1Recorder{rec}
	}
	if _, ok := w.(h2Writer); ok {
		return h2Recorder{rec}
	}
	return rec
}

type h1Writer interface {
	http.Flusher
	http.Hijacker
	io.ReaderFrom
}

type h2Writer interface {
	http.Flusher
	http.Pusher
}

type h1Recorder struct{ *recorder }

func (r h1Recorder) Flush() { r.ResponseWriter.(http.Flusher).Flush() }

func (r h1Recorder) ReadFrom(src io.Reader) (int64, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.(io.ReaderFrom).ReadFrom(src)
}

func (r h1Recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := r.ResponseWriter.(http.Hijacker).Hijack()
	if err == nil {
		r.hijacked = true
	}
	return c, rw, err
}

// CloseNotify: deprecated, but net/http's writers still offer it.
func (r h1Recorder) CloseNotify() <-chan bool {
	return r.ResponseWriter.(http.CloseNotifier).CloseNotify() //nolint:staticcheck
}

type h2Recorder struct{ *recorder }

func (r h2Recorder) Flush() { r.ResponseWriter.(http.Flusher).Flush() }

func (r h2Recorder) Push(target string, opts *http.PushOptions) error {
	return r.ResponseWriter.(http.Pusher).Push(target, opts)
}

func (r h2Recorder) CloseNotify() <-chan bool {
	return r.ResponseWriter.(http.CloseNotifier).CloseNotify() //nolint:staticcheck
}
