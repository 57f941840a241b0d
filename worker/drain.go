package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// IdleGrace is how long the drain gives an idle HTTP/1.1 keep-alive
// connection to send one more request (answered with Connection: close)
// before closing it. Closing an idle connection races with a client that
// is sending on it (RFC 9112 §9.6); waiting makes the race need a client
// that stayed idle this long and then sent at the very moment of closing.
// It is bounded by half the drain timeout.
const IdleGrace = 2 * time.Second

// ServeHTTP serves srv on lns (all of Listeners() when lns is empty) as a
// worker: it installs a handler for the stop signal (StopSignal), sends
// READY=1 once serving has started, pings the watchdog if one is enabled,
// and waits for the stop signal, ctx being done, or the master being gone
// (MasterGone). Then it drains without dropping a request and returns:
// nil after a clean drain, an error if serving failed or the drain hit
// the drain timeout (DrainTimeout), in which case the remaining
// connections were closed. The signal handler is removed before it
// returns.
//
// The drain (DESIGN §6): net/http's Shutdown alone is not one. Once it
// has begun, a request read on an existing keep-alive connection is closed
// unanswered and idle connections are closed at once, racing clients that
// send on them (golang/go#65802, golang/go#75591). ServeHTTP instead
//   - sends STOPPING=1 and closes only this process's copies of the
//     listeners: other workers keep accepting on the shared sockets;
//   - answers every further request with Connection: close, so each
//     keep-alive client learns of the drain from an answered request;
//   - waits until its HTTP/1 connections have closed, closing one only
//     after it has been idle for IdleGrace;
//   - then calls Shutdown, which sends HTTP/2 clients GOAWAY and waits for
//     their streams, and waits for in-flight handlers.
//
// Handlers that hijack connections (WebSocket, raw streams) own them: they
// should watch Draining(r.Context()), finish, and return; ServeHTTP waits
// for every handler call to return, within the drain timeout.
//
// The first ServeHTTP call of the process also serves the worker's
// private health socket (EnvHealthFD), with srv's handler: the master's
// --health-check PATH request reaches this very process, whichever
// worker the shared sockets would have chosen.
//
// Under molt, ServeHTTP counts the requests it serves and reports the
// figures to the master every second (StatsInterval, MOLT_STATS=; off
// with MOLT_STATS=off in the environment), a last time once drained.
//
// ServeHTTP wraps srv.Handler, srv.ConnState and srv.BaseContext (calling
// the app's own). Call it once per server.
func ServeHTTP(ctx context.Context, srv *http.Server, lns ...net.Listener) error {
	return serveHTTP(ctx, srv, MasterGone(), lns)
}

func serveHTTP(ctx context.Context, srv *http.Server, gone <-chan struct{}, lns []net.Listener) error {
	if len(lns) == 0 {
		all, err := Listeners()
		if err != nil {
			return err
		}
		for _, l := range all {
			lns = append(lns, l...)
		}
		if len(lns) == 0 {
			return errors.New("worker: no listener: the process was not started by molt or systemd socket activation")
		}
	}
	sig, err := StopSignal()
	if err != nil {
		return err
	}
	timeout, err := DrainTimeout()
	if err != nil {
		return err
	}
	// Accept no more than a fair share (docs/worker-protocol.md,
	// "Balance"); a copy, not to change the caller's slice.
	// Its connections stay *net.TCPConn: the drainer's ConnState counts
	// them closed.
	lns = append([]net.Listener(nil), lns...)
	bal := theBalancer()
	if bal != nil {
		for i := range lns {
			lns[i] = bal.wrap(lns[i], false)
		}
	}
	// The master's private health check (EnvHealthFD), answered by the
	// app's handler, drained like a listener; not balanced.
	if hl := takeHealth(); hl != nil {
		lns = append(lns, hl)
	}
	sigC := make(chan os.Signal, 1)
	signal.Notify(sigC, sig)
	defer signal.Stop(sigC)

	if statsOn() {
		// Counted inside the drainer's wrapper; reported until the
		// drain has ended (docs/worker-protocol.md, "Traffic figures").
		if srv.Handler == nil {
			srv.Handler = http.DefaultServeMux
		}
		srv.Handler = countRequests(srv.Handler)
		defer startReporting()()
	}
	d := newDrainer(srv)
	d.bal = bal
	served := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { served <- srv.Serve(ln) }()
	}
	stopWatchdog := StartWatchdog(ctx)
	defer stopWatchdog()
	var serveErr error
	if err := Ready(); err != nil {
		serveErr = err
	} else {
		serveErr = waitForStop(ctx, sigC, gone, served, len(lns))
	}
	if err := d.drain(lns, served, timeout); err != nil {
		return errors.Join(serveErr, err)
	}
	return serveErr
}

// waitForStop returns when the worker must drain: its stop signal, ctx
// done, the master gone, or a Serve call failing (the error). A listener
// the master shut down (a reload dropped it: accept fails with EINVAL
// once the socket no longer listens) ends quietly and the others serve
// on; when none is left, the worker drains. Every Serve result it takes
// is put back for drain to count.
func waitForStop(ctx context.Context, sigC <-chan os.Signal, gone <-chan struct{}, served chan error, n int) error {
	ended := 0
	defer func() {
		for range ended {
			served <- nil
		}
	}()
	for {
		select {
		case <-sigC:
			return nil
		case <-ctx.Done():
			return nil
		case <-gone:
			return nil
		case err := <-served:
			ended++
			if !errors.Is(err, syscall.EINVAL) {
				return fmt.Errorf("worker: serve: %w", err)
			}
			if ended == n {
				return nil
			}
		}
	}
}

// Draining returns a channel that is closed when the drain of the
// ServeHTTP serving the request with context ctx begins; nil (never
// closed) for a context from elsewhere. Handlers of hijacked, long-lived
// connections use it to finish in time.
func Draining(ctx context.Context) <-chan struct{} {
	c, _ := ctx.Value(drainKey{}).(chan struct{})
	return c
}

type drainKey struct{}

// drainer tracks a server's connections and handlers for the drain.
type drainer struct {
	srv      *http.Server
	drainC   chan struct{} // closed when the drain begins
	handlers sync.WaitGroup

	mu       sync.Mutex
	draining bool
	conns    map[net.Conn]connInfo
	changed  chan struct{} // a token whenever conns changes

	// bal, if not nil, counts the connections for Balance: closed ones
	// at once, hijacked ones (a WebSocket) when their handler returns.
	bal       *balancer
	hijacked  map[net.Conn]bool
	nHijacked atomic.Int32
}

type connInfo struct {
	state http.ConnState
	since time.Time // when it entered state
	h2    bool      // serves HTTP/2: Shutdown's GOAWAY drains it
}

type connKey struct{}

func newDrainer(srv *http.Server) *drainer {
	d := &drainer{
		srv:      srv,
		drainC:   make(chan struct{}),
		conns:    map[net.Conn]connInfo{},
		hijacked: map[net.Conn]bool{},
		changed:  make(chan struct{}, 1),
	}
	inner := srv.Handler
	if inner == nil {
		inner = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.handlers.Add(1)
		defer d.handlers.Done()
		if d.bal != nil {
			defer d.handlerReturned(r.Context())
		}
		if r.ProtoMajor != 1 {
			d.markH2(r.Context())
		} else if d.isDraining() {
			// net/http closes the connection after this response.
			w.Header().Set("Connection", "close")
		}
		inner.ServeHTTP(w, r)
	})
	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		d.track(c, s)
		if prevState != nil {
			prevState(c, s)
		}
	}
	prevConn := srv.ConnContext
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if prevConn != nil {
			ctx = prevConn(ctx, c)
		}
		return context.WithValue(ctx, connKey{}, c)
	}
	prevBase := srv.BaseContext
	srv.BaseContext = func(ln net.Listener) context.Context {
		base := context.Background()
		if prevBase != nil {
			base = prevBase(ln)
		}
		return context.WithValue(base, drainKey{}, d.drainC)
	}
	return d
}

func (d *drainer) isDraining() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.draining
}

// track follows ConnState. Hijacked connections leave the server's hands
// (their handler is waited for instead); HTTP/2 connections are reported
// by the HTTP/2 server through the same hook.
func (d *drainer) track(c net.Conn, s http.ConnState) {
	d.mu.Lock()
	switch s {
	case http.StateHijacked:
		delete(d.conns, c)
		if d.bal != nil {
			d.hijacked[c] = true
			d.nHijacked.Add(1)
		}
	case http.StateClosed:
		delete(d.conns, c)
		d.bal.release(c)
	default:
		d.conns[c] = connInfo{state: s, since: time.Now(), h2: d.conns[c].h2}
	}
	d.mu.Unlock()
	select {
	case d.changed <- struct{}{}:
	default:
	}
}

// handlerReturned counts the connection of a request closed for Balance
// if the handler hijacked it: the app's from then on, it is load while
// the handler runs.
func (d *drainer) handlerReturned(ctx context.Context) {
	if d.nHijacked.Load() == 0 {
		return
	}
	c, ok := ctx.Value(connKey{}).(net.Conn)
	if !ok {
		return
	}
	d.mu.Lock()
	hijacked := d.hijacked[c]
	if hijacked {
		delete(d.hijacked, c)
		d.nHijacked.Add(-1)
	}
	d.mu.Unlock()
	if hijacked {
		d.bal.release(c)
	}
}

// markH2 records that the connection of a request speaks HTTP/2.
func (d *drainer) markH2(ctx context.Context) {
	c, ok := ctx.Value(connKey{}).(net.Conn)
	if !ok {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if ci, ok := d.conns[c]; ok {
		ci.h2 = true
		d.conns[c] = ci
	}
}

// drain runs the drain of ServeHTTP, bounded by timeout.
func (d *drainer) drain(lns []net.Listener, served <-chan error, timeout time.Duration) error {
	start := time.Now()
	deadline := start.Add(timeout)
	d.mu.Lock()
	d.draining = true
	d.mu.Unlock()
	close(d.drainC)
	_ = Stopping() // best effort: the master also knows it asked
	for _, ln := range lns {
		// Only this process's copy: the shared socket keeps listening in
		// every other process that holds it, and its queue is not lost.
		_ = ln.Close()
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for range lns {
		select {
		case <-served:
		case <-timer.C:
			_ = d.srv.Close()
			return fmt.Errorf("worker: drain: Serve did not return within %v after its listener was closed (was the socket switched to blocking mode?)", timeout)
		}
	}
	grace := min(IdleGrace, timeout/2)
	if err := d.waitHTTP1(start, grace, deadline); err != nil {
		_ = d.srv.Close()
		return err
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := d.srv.Shutdown(ctx); err != nil {
		_ = d.srv.Close()
		return fmt.Errorf("worker: drain: connections still busy after %v; closed them: %w", timeout, err)
	}
	return d.waitHandlers(deadline)
}

// waitHTTP1 waits until no HTTP/1 connection is busy. A connection is busy
// while a request is in flight, and while it is new or idle for less than
// grace since it became so or since the drain began (start), whichever is
// later: the time a keep-alive client has to send one more request.
func (d *drainer) waitHTTP1(start time.Time, grace time.Duration, deadline time.Time) error {
	for {
		now := time.Now()
		busy, next := d.busyHTTP1(start, grace, now)
		if busy == 0 {
			return nil
		}
		if !now.Before(deadline) {
			return fmt.Errorf("worker: drain: %d connections still busy at the drain timeout; closed them", busy)
		}
		if next.After(deadline) {
			next = deadline
		}
		wait := time.NewTimer(next.Sub(now))
		select {
		case <-d.changed:
		case <-wait.C:
		}
		wait.Stop()
	}
}

// busyHTTP1 counts busy HTTP/1 connections at now and returns the earliest
// time one of them stops counting as busy by itself (the far future if
// none will).
func (d *drainer) busyHTTP1(start time.Time, grace time.Duration, now time.Time) (int, time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	busy, next := 0, now.Add(time.Hour)
	for _, ci := range d.conns {
		if ci.h2 {
			continue
		}
		switch ci.state {
		case http.StateActive:
			busy++
		case http.StateNew, http.StateIdle:
			until := ci.since
			if until.Before(start) {
				until = start
			}
			until = until.Add(grace)
			if until.After(now) {
				busy++
				if until.Before(next) {
					next = until
				}
			}
		}
	}
	return busy, next
}

// waitHandlers waits for every handler call, hijacking ones included.
func (d *drainer) waitHandlers(deadline time.Time) error {
	done := make(chan struct{})
	go func() {
		d.handlers.Wait()
		close(done)
	}()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
		return errors.New("worker: drain: handlers of hijacked connections still running at the drain timeout")
	}
}
