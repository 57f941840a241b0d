package metrics

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	vm "github.com/VictoriaMetrics/metrics"
)

// Bounds of the endpoint: it is the operator's, but whoever can connect to
// it (any local user, on loopback) must not hold the master's descriptors
// or goroutines for long.
const (
	// MaxConns: connections served at once; more wait in the listen
	// backlog (the master accepts no more until one ends).
	MaxConns = 8
	// ReadHeaderTimeout, WriteTimeout and IdleTimeout bound each
	// connection: a client that never sends, never reads or idles is
	// closed after them.
	ReadHeaderTimeout = 5 * time.Second
	WriteTimeout      = 10 * time.Second
	IdleTimeout       = 30 * time.Second
	// CloseWait bounds how long Close waits for the connections this
	// master accepted to be answered: a master that exits right after
	// handing the endpoint over (an old one, drained) must not cut a
	// scrape it took just before.
	CloseWait = 2 * time.Second
)

// Server serves /metrics on one listening socket from the last published
// snapshot. Publish and the HTTP handlers share only an atomic pointer.
type Server struct {
	snap atomic.Pointer[Snapshot]
	file *os.File // the listening socket; kept while serving stops (it passes to the next master)

	mu  sync.Mutex     // guards srv, ln and stopped (Start, Stop, Close: the loop)
	srv *http.Server   // nil while not serving
	ln  *limitListener // srv's
	// stopped is closed when the last Stop's connections have ended.
	stopped chan struct{}
	// afterAccept (tests) runs after each accept, before Serve has the
	// connection.
	afterAccept func()
}

// NewServer returns a server for the listening socket f, not yet serving.
// The Server owns f.
func NewServer(f *os.File) *Server { return &Server{file: f} }

// File is the listening socket (to pass to a new master).
func (s *Server) File() *os.File { return s.file }

// Publish makes sn what the next scrapes show. The caller must not change
// sn afterwards.
func (s *Server) Publish(sn *Snapshot) { s.snap.Store(sn) }

// Start begins accepting on the socket, if not already; onErr gets an
// error that ends serving (called on its own goroutine).
func (s *Server) Start(onErr func(error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return nil
	}
	// A duplicate: closing the net.Listener at Stop leaves s.file open.
	ln, err := net.FileListener(s.file)
	if err != nil {
		return fmt.Errorf("metrics: listen on the inherited socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", s.handle)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: ReadHeaderTimeout, ReadTimeout: ReadHeaderTimeout,
		WriteTimeout: WriteTimeout, IdleTimeout: IdleTimeout, MaxHeaderBytes: 8 << 10,
		ErrorLog: log.New(io.Discard, "", 0)}
	srv.SetKeepAlivesEnabled(true)
	lim := &limitListener{Listener: ln, sem: make(chan struct{}, MaxConns), done: make(chan struct{}), afterAccept: s.afterAccept}
	s.srv, s.ln = srv, lim
	go func() {
		err := srv.Serve(lim)
		// Stop closes lim: that error ends serving as asked.
		if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) && onErr != nil {
			onErr(err)
		}
	}()
	return nil
}

// Stop stops accepting (connections being served finish, bounded by the
// timeouts); the socket stays open, and queued connections wait for
// whoever accepts next: this master again, or its successor.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	// Not Shutdown: net/http drops, unanswered, a request it reads once
	// Shutdown began, and a scrape this master accepted (its request
	// still in flight) must be answered; nor Close, which cuts the ones
	// being served. Instead: every connection ends after its current
	// answer (idle ones close now: an HTTP client retries a GET that
	// meets a reused connection closing), no more are accepted, and the
	// wait, bounded, is not the loop's. Connections still queued wait
	// for whoever accepts next.
	srv, ln, stopped := s.srv, s.ln, make(chan struct{})
	s.srv, s.ln, s.stopped = nil, nil, stopped
	srv.SetKeepAlivesEnabled(false)
	_ = ln.Close()
	go func() {
		defer close(stopped)
		ctx, cancel := context.WithTimeout(context.Background(), WriteTimeout)
		defer cancel()
		if !ln.idle(ctx) {
			_ = srv.Close()
		}
	}()
}

// Serving reports whether the server accepts.
func (s *Server) Serving() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv != nil
}

// Close stops serving, waits at most CloseWait for the connections being
// served, and closes the socket.
func (s *Server) Close() error {
	s.Stop()
	s.mu.Lock()
	stopped := s.stopped
	s.mu.Unlock()
	if stopped != nil {
		select {
		case <-stopped:
		case <-time.After(CloseWait):
		}
	}
	return s.file.Close()
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	sn := s.snap.Load()
	if sn == nil {
		http.Error(w, "no figures yet", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	bw := bufio.NewWriterSize(w, 8<<10)
	Write(bw, sn)
	_ = bw.Flush()
}

// Write renders sn in the Prometheus text format (0.0.4).
func Write(w io.Writer, sn *Snapshot) {
	meta := func(name, typ, help string) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	meta("molt_upgrades_total", "counter", "Upgrades that ended, by outcome (committed, rolled_back, taken_back) and reason.")
	keys := sortedKeys(sn.Upgrades)
	if _, ok := sn.Upgrades[UpgradeKey(OutcomeCommitted, ReasonOK)]; !ok {
		// The commit series exists from the start, so that increase()
		// sees the first one.
		keys = append([]string{UpgradeKey(OutcomeCommitted, ReasonOK)}, keys...)
	}
	for _, k := range keys {
		o, r, _ := cutKey(k)
		vm.WriteCounterUint64(w, "molt_upgrades_total"+labels([][2]string{{"outcome", o}, {"reason", r}}), sn.Upgrades[k])
	}
	meta("molt_upgrade_duration_seconds", "histogram", "Upgrades from the signal to the commit or the rollback, by outcome.")
	for _, k := range sortedKeys(sn.UpgradeSeconds) {
		writeHistogram(w, "molt_upgrade_duration_seconds", [2]string{"outcome", k}, sn.UpgradeSeconds[k])
	}
	meta("molt_drain_duration_seconds", "histogram", `Drains, by kind: "generation" (an old generation, from the commit to its master's exit) and "worker" (one worker, from its stop to its exit).`)
	for _, k := range sortedKeys(sn.DrainSeconds) {
		writeHistogram(w, "molt_drain_duration_seconds", [2]string{"kind", k}, sn.DrainSeconds[k])
	}
	meta("molt_worker_restarts_total", "counter", "Workers that exited unexpectedly and were replaced.")
	vm.WriteCounterUint64(w, "molt_worker_restarts_total", sn.Restarts)
	meta("molt_worker_backoffs_total", "counter", "Respawns delayed by the crash-loop backoff.")
	vm.WriteCounterUint64(w, "molt_worker_backoffs_total", sn.Backoffs)
	meta("molt_resurrections_total", "counter", "Masters the keeper started because every master had died.")
	vm.WriteCounterUint64(w, "molt_resurrections_total", sn.Resurrections)
	meta("molt_workers", "gauge", "Worker processes by generation and state (starting, ready, stopping, restarting).")
	for _, c := range sn.Workers {
		vm.WriteGaugeUint64(w, "molt_workers"+labels([][2]string{{"generation", strconv.Itoa(c.Gen)}, {"state", c.State}}), uint64(c.N))
	}
	meta("molt_generation", "gauge", "The generation of the master that answered.")
	vm.WriteGaugeUint64(w, "molt_generation", uint64(sn.Gen))
	if len(sn.LastPhases) > 0 {
		meta("molt_last_upgrade_phase_seconds", "gauge", "The last upgrade's milestones, in seconds since its signal (docs/upgrades.md, phases).")
		for _, k := range sortedKeys(sn.LastPhases) {
			vm.WriteGaugeFloat64(w, "molt_last_upgrade_phase_seconds"+labels([][2]string{{"phase", k}}), sn.LastPhases[k])
		}
	}
	for _, f := range sn.Families {
		meta(f.Name, f.Type, f.Help)
		for _, s := range f.Samples {
			vm.WriteGaugeFloat64(w, f.Name+s.Suffix+labels(s.Labels), s.Value)
		}
	}
}

func writeHistogram(w io.Writer, name string, label [2]string, h Histogram) {
	var cum uint64
	for i, b := range DurationBuckets {
		if i < len(h.Counts) {
			cum += h.Counts[i]
		}
		vm.WriteCounterUint64(w, name+"_bucket"+labels([][2]string{label, {"le", formatBound(b)}}), cum)
	}
	vm.WriteCounterUint64(w, name+"_bucket"+labels([][2]string{label, {"le", "+Inf"}}), h.count())
	vm.WriteCounterFloat64(w, name+"_sum"+labels([][2]string{label}), h.Sum)
	vm.WriteCounterUint64(w, name+"_count"+labels([][2]string{label}), h.count())
}

func cutKey(k string) (outcome, reason string, ok bool) {
	for i := 0; i < len(k); i++ {
		if k[i] == '/' {
			return k[:i], k[i+1:], true
		}
	}
	return k, "", false
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// limitListener accepts at most cap(sem) connections at once: beyond it,
// Accept waits for one to close, and new clients wait in the backlog.
// The tokens in sem are its open connections (and an Accept in flight).
type limitListener struct {
	net.Listener
	sem         chan struct{}
	done        chan struct{} // closed by Close: a waiting Accept returns
	closeOnce   sync.Once
	afterAccept func() // tests: runs between the accept and Serve's turn
}

// idle waits until the listener holds no connection, or ctx ends; it
// reports whether it got there.
func (l *limitListener) idle(ctx context.Context) bool {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for len(l.sem) > 0 {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	return true
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	if l.afterAccept != nil {
		l.afterAccept()
	}
	return &limitConn{Conn: c, release: func() { <-l.sem }}, nil
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
