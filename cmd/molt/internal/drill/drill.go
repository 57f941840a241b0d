// Package drill is the engine of "molt drill" and of "make bench": it
// drives HTTP/1.1 load at a server, triggers upgrades at an interval, and
// reports what the clients saw: requests, failures by class, latency
// percentiles overall and inside upgrade windows, how long each upgrade
// took until the new generation served and until the old one was gone,
// and which generation served over time. It works against any HTTP
// server; a header naming the serving generation (molt's demo sends
// X-Molt-Master-Pid) makes the upgrade times measurable.
//
// The client is written by hand over net.Conn and parses answers with
// http.ReadResponse: net/http's client retries failed idempotent requests
// silently and would hide exactly the failures a drill looks for. The
// integration tests keep a client of their own (test/load), so the drill
// is never its own judge.
package drill

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Mode is how a client uses connections.
type Mode string

// Modes.
const (
	KeepAlive Mode = "keep-alive" // one connection per client, reused
	Close     Mode = "close"      // a new connection per request
)

// Config is one drill.
type Config struct {
	// Target is the server: http://host:port/path, or unix:/socket/path
	// (then Path is the request path).
	Target string
	Path   string
	// Clients is the number of concurrent clients of each mode.
	Clients int
	// Modes are the connection modes to run side by side (default both).
	Modes []Mode
	// Rate bounds the requests per second of each mode (0: as fast as the
	// clients go).
	Rate float64
	// Duration is the least the load runs; with upgrades it runs until the
	// last one has had Interval to settle.
	Duration time.Duration
	// Upgrades are triggered with Trigger, the first after Interval, then
	// every Interval.
	Upgrades int
	Interval time.Duration
	Trigger  Trigger
	// Header names the serving generation in answers (X-Molt-Master-Pid);
	// WorkerHeader the serving worker (X-Molt-Worker-Pid), for balance:
	// requests per worker, and connections per worker (the worker that
	// answered a connection's first request).
	Header, WorkerHeader string
	// IdleConns are keep-alive connections opened at the start (one
	// request each) and left idle for the whole run.
	IdleConns int
	// Timeout bounds each request, dial included (default 10s).
	Timeout time.Duration
	// Progress, if not nil, gets a progress line every second.
	Progress io.Writer
}

// Trigger starts one upgrade (or injects one *Fault).
type Trigger interface {
	Fire(ctx context.Context) error
	String() string
}

// sample is one request.
type sample struct {
	start, end time.Duration // since the run began
	mode       Mode
	class      Class  // "" when answered 200
	served     string // the generation header of an answer, 200 or not
	code       int    // the answer's status; 0 with none
	worker     string
	// first: the first request on a connection the client dialed for it
	// (every request in close mode).
	first bool
}

// Class is a kind of failure.
type Class string

// Failure classes.
const (
	Refused Class = "refused"
	Reset   Class = "reset"
	EOF     Class = "eof"
	Timeout Class = "timeout"
	Status  Class = "status"
	Other   Class = "other"
)

// Run runs the drill until it is done or ctx ends, and reports.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	network, addr, host, path, err := parseTarget(cfg.Target, cfg.Path)
	if err != nil {
		return nil, err
	}
	total := cfg.Duration
	if cfg.Upgrades > 0 {
		total = max(total, time.Duration(cfg.Upgrades+1)*cfg.Interval)
	}
	began := time.Now()
	rec := &recorder{}
	idle, idleErr := openIdle(network, addr, host, path, cfg.IdleConns, cfg.Timeout)
	if idleErr != nil {
		closeAll(idle)
		return nil, idleErr
	}
	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, mode := range cfg.Modes {
		interval := time.Duration(0)
		if cfg.Rate > 0 {
			interval = time.Duration(float64(time.Second) * float64(cfg.Clients) / cfg.Rate)
		}
		for range cfg.Clients {
			c := &client{network: network, addr: addr, host: host, path: path, mode: mode, timeout: cfg.Timeout,
				header: cfg.Header, workerHeader: cfg.WorkerHeader, began: began, rec: rec}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.run(loadCtx, interval)
			}()
		}
	}
	rep := &Report{Target: cfg.Target, Clients: cfg.Clients, Rate: cfg.Rate, IdleConns: len(idle)}
	for _, m := range cfg.Modes {
		rep.Modes = append(rep.Modes, string(m))
	}
	progressDone := make(chan struct{})
	go progress(cfg.Progress, began, rec, rep, cfg.Upgrades, progressDone)
	var fireErr error
	for i := 1; i <= cfg.Upgrades && fireErr == nil; i++ {
		if !sleepUntil(ctx, began.Add(time.Duration(i)*cfg.Interval)) {
			break
		}
		u := Upgrade{N: i, At: time.Since(began)}
		err := cfg.Trigger.Fire(ctx)
		u.Fired = time.Since(began) - u.At
		if err != nil {
			u.Error = err.Error()
		}
		if f, ok := cfg.Trigger.(*Fault); ok && f.Result() != nil {
			// A fault's window starts at its kill, not at its trigger
			// (kill-new-master upgrades first).
			u.Fault = f.Result()
			if k := u.Fault.killedAt; !k.IsZero() {
				u.At, u.Fired = k.Sub(began), time.Since(k)
			}
		}
		rec.mu.Lock()
		rep.Upgrades = append(rep.Upgrades, u)
		rec.mu.Unlock()
	}
	sleepUntil(ctx, began.Add(total))
	stopLoad()
	wg.Wait()
	close(progressDone)
	rep.IdleClosed = countClosed(idle)
	closeAll(idle)
	rep.Elapsed = time.Since(began)
	rep.analyze(rec.samples)
	return rep, ctx.Err()
}

func (cfg *Config) defaults() error {
	if cfg.Clients <= 0 {
		cfg.Clients = 16
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = []Mode{KeepAlive, Close}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 10 * time.Second
	}
	if cfg.Upgrades > 0 {
		if cfg.Trigger == nil {
			return errors.New("upgrades need a way to trigger them")
		}
		if cfg.Interval <= 0 {
			return errors.New("upgrades need a positive interval")
		}
	}
	return nil
}

// parseTarget splits a target into dial network and address, the Host
// header and the request path.
func parseTarget(target, path string) (network, addr, host, reqPath string, err error) {
	if p, ok := strings.CutPrefix(target, "unix:"); ok {
		if path == "" {
			path = "/"
		}
		return "unix", p, "localhost", path, nil
	}
	u, err := url.Parse(target)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		return "", "", "", "", fmt.Errorf("target %q: want http://host:port/path or unix:/path (https is not supported)", target)
	}
	addr = u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "80")
	}
	reqPath = u.RequestURI()
	if path != "" {
		reqPath = path
	}
	return "tcp", addr, u.Host, reqPath, nil
}

// sleepUntil waits until t; false if ctx ended first.
func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// recorder collects samples from every client.
type recorder struct {
	mu      sync.Mutex
	samples []sample
	ok      int
	failed  int
}

func (r *recorder) add(s sample) {
	r.mu.Lock()
	r.samples = append(r.samples, s)
	if s.class == "" {
		r.ok++
	} else {
		r.failed++
	}
	r.mu.Unlock()
}

func progress(w io.Writer, began time.Time, rec *recorder, rep *Report, upgrades int, done <-chan struct{}) {
	if w == nil {
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			fmt.Fprintln(w)
			return
		case <-t.C:
			rec.mu.Lock()
			ok, failed, fired := rec.ok, rec.failed, len(rep.Upgrades)
			rec.mu.Unlock()
			fmt.Fprintf(w, "\rdrill %5.0fs  answered %d  failed %d  upgrades %d/%d ", time.Since(began).Seconds(), ok, failed, fired, upgrades)
		}
	}
}

// client is one simulated user.
type client struct {
	network, addr, host, path string
	mode                      Mode
	timeout                   time.Duration
	header, workerHeader      string
	began                     time.Time
	rec                       *recorder
	conn                      net.Conn
	br                        *bufio.Reader
}

func (c *client) run(ctx context.Context, interval time.Duration) {
	defer c.close()
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	for ctx.Err() == nil {
		if tick != nil {
			select {
			case <-ctx.Done():
				return
			case <-tick:
			}
		}
		start := time.Since(c.began)
		first := c.conn == nil
		resp, err := c.do()
		s := sample{start: start, end: time.Since(c.began), mode: c.mode, first: first}
		if resp != nil {
			// An answer, 200 or not: which generation gave it.
			s.served, s.code = resp.Header.Get(c.header), resp.StatusCode
		}
		if err != nil {
			s.class = classify(err)
		} else {
			s.worker = resp.Header.Get(c.workerHeader)
		}
		c.rec.add(s)
	}
}

type statusError int

func (e statusError) Error() string { return fmt.Sprintf("status %d", int(e)) }

func (c *client) do() (*http.Response, error) {
	if c.conn == nil {
		conn, err := net.DialTimeout(c.network, c.addr, c.timeout)
		if err != nil {
			return nil, err
		}
		c.conn, c.br = conn, bufio.NewReader(conn)
	}
	_ = c.conn.SetDeadline(time.Now().Add(c.timeout))
	hdr := ""
	if c.mode == Close {
		hdr = "Connection: close\r\n"
	}
	if _, err := fmt.Fprintf(c.conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: molt-drill\r\n%s\r\n", c.path, c.host, hdr); err != nil {
		c.close()
		return nil, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		c.close()
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		c.close()
		return nil, err
	}
	if resp.Close || c.mode == Close {
		c.close() // the server said so, or the mode: the next request dials
	}
	if resp.StatusCode != http.StatusOK {
		return resp, statusError(resp.StatusCode)
	}
	return resp, nil
}

func (c *client) close() {
	if c.conn != nil {
		_ = c.conn.Close()
		c.conn, c.br = nil, nil
	}
}

func classify(err error) Class {
	var se statusError
	var ne net.Error
	switch {
	case errors.As(err, &se):
		return Status
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOENT):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return Reset
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return EOF
	case errors.As(err, &ne) && ne.Timeout():
		return Timeout
	}
	return Other
}

// openIdle opens n keep-alive connections and sends one request on each.
func openIdle(network, addr, host, path string, n int, timeout time.Duration) ([]net.Conn, error) {
	var conns []net.Conn
	for i := range n {
		c, err := net.DialTimeout(network, addr, timeout)
		if err != nil {
			return conns, fmt.Errorf("idle connection %d of %d: %w (raise the open-file limit: ulimit -n)", i+1, n, err)
		}
		conns = append(conns, c)
		_ = c.SetDeadline(time.Now().Add(timeout))
		br := bufio.NewReader(c)
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: molt-drill\r\n\r\n", path, host); err != nil {
			return conns, fmt.Errorf("idle connection %d: %w", i+1, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return conns, fmt.Errorf("idle connection %d: %w", i+1, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		_ = c.SetDeadline(time.Time{})
	}
	return conns, nil
}

// countClosed counts the idle connections the server has closed.
func countClosed(conns []net.Conn) int {
	n := 0
	buf := make([]byte, 1)
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(buf); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			n++
		}
	}
	return n
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		_ = c.Close()
	}
}
