// Package load is a deliberately simple, independent load generator for
// molt's tests. It speaks raw HTTP/1.1 over TCP or a unix socket, never
// through net/http's Client, which silently retries failed idempotent
// requests and would hide exactly the drops the tests look for. Every
// request is paced (a fixed total rate): saturation is the benchmark's
// job, and on two shared cores an unpaced client starves race-built
// servers (STYLE.md §5).
package load

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Config describes a load run.
type Config struct {
	// Network is "tcp" (default) or "unix"; Addr is host:port or a path.
	Network, Addr string
	// Path is the request path (default "/").
	Path string
	// Clients is the number of concurrent clients (default 1).
	Clients int
	// Rate is the total requests per second over all clients (default
	// 100 per client).
	Rate float64
	// KeepAlive keeps one connection per client across requests (until a
	// response says Connection: close); otherwise each request dials.
	KeepAlive bool
	// Timeout bounds each request, dial included (default 10s).
	Timeout time.Duration
}

// Class is a kind of failure.
type Class string

// Failure classes.
const (
	Refused Class = "refused" // connection refused
	Reset   Class = "reset"   // connection reset or broken pipe
	EOF     Class = "eof"     // closed before a whole response
	Timeout Class = "timeout" // no answer in time
	Status  Class = "status"  // an answer that is not 200
	Other   Class = "other"
)

// Result counts a run's requests.
type Result struct {
	Requests int // attempted
	OK       int // answered 200
	Failures map[Class]int
	// ByMaster and ByWorker count answered requests by the
	// X-Molt-Master-Pid and X-Molt-Worker-Pid headers.
	ByMaster, ByWorker map[int]int
	// Conns counts new connections by the X-Molt-Worker-Pid of their
	// first answer (without keep-alive, every answered request).
	Conns map[int]int
	// Samples describes the first failures.
	Samples []string
	// Fails lists the failures (up to maxFails), each with what a test
	// needs to attribute it: when it was in flight and which worker had
	// answered last on its connection.
	Fails []Failure
}

// Failure is one failed request.
type Failure struct {
	Class      Class
	Start, End time.Time
	// LastWorker is the X-Molt-Worker-Pid of the last answer on the same
	// keep-alive connection, 0 on a connection that had no answer yet (a
	// new connection, and every request without keep-alive).
	LastWorker int
	Err        string
}

const (
	maxSamples = 20
	maxFails   = 10000
)

// Failed returns the number of failed requests.
func (r Result) Failed() int {
	n := 0
	for _, c := range r.Failures {
		n += c
	}
	return n
}

// String summarizes r on one line.
func (r Result) String() string {
	var cls []string
	for c, n := range r.Failures {
		cls = append(cls, fmt.Sprintf("%s=%d", c, n))
	}
	sort.Strings(cls)
	return fmt.Sprintf("%d requests, %d ok, %d failed %v, %d masters, %d workers",
		r.Requests, r.OK, r.Failed(), cls, len(r.ByMaster), len(r.ByWorker))
}

func (r *Result) add(o Result) {
	r.Requests += o.Requests
	r.OK += o.OK
	for c, n := range o.Failures {
		r.Failures[c] += n
	}
	for p, n := range o.ByMaster {
		r.ByMaster[p] += n
	}
	for p, n := range o.ByWorker {
		r.ByWorker[p] += n
	}
	for p, n := range o.Conns {
		r.Conns[p] += n
	}
	for _, s := range o.Samples {
		if len(r.Samples) < maxSamples {
			r.Samples = append(r.Samples, s)
		}
	}
	for _, f := range o.Fails {
		if len(r.Fails) < maxFails {
			r.Fails = append(r.Fails, f)
		}
	}
}

func newResult() Result {
	return Result{Failures: map[Class]int{}, ByMaster: map[int]int{}, ByWorker: map[int]int{}, Conns: map[int]int{}}
}

// Run is a load run in progress.
type Run struct {
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	results []*Result // one per client, guarded by mu
}

// Start begins a run; it goes on until Stop or ctx is done.
func Start(ctx context.Context, cfg Config) *Run {
	if cfg.Network == "" {
		cfg.Network = "tcp"
	}
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 1
	}
	if cfg.Rate <= 0 {
		cfg.Rate = 100 * float64(cfg.Clients)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	ctx, cancel := context.WithCancel(ctx)
	r := &Run{cancel: cancel}
	interval := time.Duration(float64(time.Second) * float64(cfg.Clients) / cfg.Rate)
	for i := 0; i < cfg.Clients; i++ {
		res := newResult()
		r.results = append(r.results, &res)
		c := &client{cfg: cfg, res: r.results[i], mu: &r.mu}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			c.run(ctx, interval)
		}()
	}
	return r
}

// Snapshot returns the counts so far. Safe to call concurrently.
func (r *Run) Snapshot() Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	total := newResult()
	for _, res := range r.results {
		total.add(*res)
	}
	return total
}

// Stop ends the run, waits for the clients (each finishes or abandons its
// current request within the request timeout) and returns the counts.
func (r *Run) Stop() Result {
	r.cancel()
	r.wg.Wait()
	return r.Snapshot()
}

type client struct {
	cfg  Config
	res  *Result
	mu   *sync.Mutex
	conn net.Conn
	br   *bufio.Reader
	last int // the worker pid of the last answer on conn
}

func (c *client) run(ctx context.Context, interval time.Duration) {
	defer c.close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start, last, fresh := time.Now(), c.last, c.conn == nil
		if fresh {
			last = 0
		}
		resp, err := c.do()
		c.mu.Lock()
		c.res.Requests++
		if err != nil {
			cls := classify(err)
			c.res.Failures[cls]++
			if len(c.res.Samples) < maxSamples {
				c.res.Samples = append(c.res.Samples, fmt.Sprintf("%s: %v", cls, err))
			}
			if len(c.res.Fails) < maxFails {
				c.res.Fails = append(c.res.Fails, Failure{Class: cls, Start: start, End: time.Now(), LastWorker: last, Err: err.Error()})
			}
		} else {
			c.res.OK++
			if m, err := strconv.Atoi(resp.Header.Get("X-Molt-Master-Pid")); err == nil {
				c.res.ByMaster[m]++
			}
			if w, err := strconv.Atoi(resp.Header.Get("X-Molt-Worker-Pid")); err == nil {
				c.res.ByWorker[w]++
				if fresh {
					c.res.Conns[w]++
				}
				c.last = w
			}
		}
		c.mu.Unlock()
	}
}

// statusError is an answer that is not 200.
type statusError struct{ code int }

func (e statusError) Error() string { return "status " + strconv.Itoa(e.code) }

// do sends one request and reads the whole response.
func (c *client) do() (*http.Response, error) {
	if c.conn == nil {
		conn, err := net.DialTimeout(c.cfg.Network, c.cfg.Addr, c.cfg.Timeout)
		if err != nil {
			return nil, err
		}
		c.conn, c.br = conn, bufio.NewReader(conn)
	}
	c.conn.SetDeadline(time.Now().Add(c.cfg.Timeout))
	hdr := ""
	if !c.cfg.KeepAlive {
		hdr = "Connection: close\r\n"
	}
	if _, err := fmt.Fprintf(c.conn, "GET %s HTTP/1.1\r\nHost: molt-load\r\n%s\r\n", c.cfg.Path, hdr); err != nil {
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
	if resp.Close || !c.cfg.KeepAlive {
		c.close() // the server said so: not a failure, the next request dials
	}
	if resp.StatusCode != 200 {
		return nil, statusError{resp.StatusCode}
	}
	return resp, nil
}

func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.br = nil, nil
	}
}

// classify sorts an error into a Class.
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
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return Timeout
	case strings.Contains(err.Error(), "connection reset"):
		return Reset
	}
	return Other
}
