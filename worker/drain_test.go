package worker

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dupListener makes another process-like copy of l: a new fd on the same
// socket, as each worker has.
func dupListener(t *testing.T, l net.Listener) net.Listener {
	t.Helper()
	fd, err := unix.FcntlInt(rawFDOf(t, l.(syscall.Conn)), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "dup")
	defer f.Close()
	d, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// kaClient sends requests one after another on a keep-alive connection,
// written by hand (net/http's client retries silently and would hide a
// dropped request). A response with Connection: close ends the
// connection; the next request dials anew.
type kaClient struct {
	addr       string
	conn       net.Conn
	br         *bufio.Reader
	failures   []string
	byServer   map[string]int
	closeSeen  map[string]int // responses carrying Connection: close, by server
	afterDrain map[string]int // responses of the draining server after drain start, by resp.Close
	done       atomic.Int64   // answered requests
}

func newKAClient(addr string) *kaClient {
	return &kaClient{addr: addr, byServer: map[string]int{}, closeSeen: map[string]int{}, afterDrain: map[string]int{}}
}

// connectTo dials until the kernel hands the connection to server name
// (both servers accept on one socket; which one wins a connection is up to
// the scheduler) and leaves that connection open for the next request.
func (c *kaClient) connectTo(t *testing.T, name string) {
	t.Helper()
	for i := 0; i < 5000; i++ {
		if _, err := c.do("/", false); err != nil {
			t.Fatal(err)
		}
		if c.byServer[name] > 0 && c.conn != nil {
			c.byServer = map[string]int{}
			return
		}
		if c.conn != nil {
			c.conn.Close()
			c.conn = nil
		}
	}
	t.Fatalf("server %s never accepted a connection in 5000 tries", name)
}

func (c *kaClient) do(path string, draining bool) (*http.Response, error) {
	if c.conn == nil {
		conn, err := net.Dial("tcp", c.addr)
		if err != nil {
			return nil, err
		}
		c.conn, c.br = conn, bufio.NewReader(conn)
	}
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c.conn, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		c.conn.Close()
		c.conn = nil
		return nil, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		c.conn.Close()
		c.conn = nil
		return nil, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	server := resp.Header.Get("X-Server")
	c.byServer[server]++
	if resp.Close {
		c.closeSeen[server]++
		c.conn.Close()
		c.conn = nil
	}
	if draining && server == "A" {
		// ReadResponse removes the Connection header into resp.Close.
		c.afterDrain[fmt.Sprint(resp.Close)]++
	}
	c.done.Add(1)
	return resp, nil
}

func serverNamed(name string, slowStarted chan<- struct{}) *http.Server {
	return &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Server", name)
		if r.URL.Path == "/slow" {
			if slowStarted != nil {
				slowStarted <- struct{}{}
			}
			time.Sleep(500 * time.Millisecond)
		}
		io.WriteString(w, "ok\n")
	})}
}

// TestServeHTTP_DrainLosesNoRequest is DESIGN §6 in one process: two
// servers ("workers") share one socket through their own fds; A drains
// while keep-alive and connection-per-request clients keep sending. No
// request may fail, A's answers after the drain began must carry
// Connection: close, and a slow request in flight on A completes.
func TestServeHTTP_DrainLosesNoRequest(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	t.Setenv(EnvDrainTimeout, "20s")
	shared, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()
	addr := shared.Addr().String()
	slowStarted := make(chan struct{}, 1)
	srvA, srvB := serverNamed("A", slowStarted), serverNamed("B", nil)
	lnA, lnB := dupListener(t, shared), dupListener(t, shared)
	go srvB.Serve(lnB)
	defer srvB.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- serveHTTP(ctx, srvA, nil, []net.Listener{lnA}) }()

	// A keep-alive connection that A serves carries the slow request.
	slow := newKAClient(addr)
	slow.connectTo(t, "A")
	defer func() {
		if slow.conn != nil { // keeps it referenced until the end: an
			slow.conn.Close() // unreferenced conn is closed by its finalizer
		}
	}()

	var draining atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	clients := make([]*kaClient, 10)
	for i := range clients {
		c := newKAClient(addr)
		clients[i] = c
		keepAlive := i < 8 // and two that dial for every request
		if keepAlive && i%2 == 0 {
			c.connectTo(t, "A") // half the keep-alive clients start on A
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond): // paced, not a flood
				}
				d := draining.Load()
				if _, err := c.do("/", d); err != nil {
					c.failures = append(c.failures, fmt.Sprintf("request %d (draining=%v): %v", n, d, err))
				}
				if !keepAlive && c.conn != nil {
					c.conn.Close()
					c.conn = nil
				}
			}
		}()
	}
	// Let every client get going first, so that A has keep-alive
	// connections with a history when the drain begins.
	for i, c := range clients {
		for j := 0; c.done.Load() < 20; j++ {
			if j == 1000 {
				t.Fatalf("client %d: no traffic", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// An idle keep-alive client on A: it was served before the drain and
	// sends its next request a second after the drain began, after the
	// slow request is done and while A has nothing else to do. It must
	// still be answered (with Connection: close), not find its connection
	// closed: that is the keep-alive race of RFC 9112 §9.6.
	idle := newKAClient(addr)
	idle.connectTo(t, "A")
	idleDone := make(chan error, 1)
	drainBegan := make(chan struct{})
	go func() {
		<-drainBegan
		time.Sleep(time.Second) // the client's think time, by design of the scenario
		resp, err := idle.do("/", true)
		if err == nil && (!resp.Close || resp.Header.Get("X-Server") != "A") {
			err = fmt.Errorf("answered by %q with close=%v, want A with Connection: close", resp.Header.Get("X-Server"), resp.Close)
		}
		idleDone <- err
	}()
	slowDone := make(chan error, 1)
	go func() {
		resp, err := slow.do("/slow", false)
		if err == nil && resp.StatusCode != 200 {
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		slowDone <- err
	}()
	select {
	case <-slowStarted:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request never reached server A")
	}
	draining.Store(true)
	cancel() // A drains now, with the slow request in flight
	close(drainBegan)
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeHTTP returned %v after a clean drain", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("ServeHTTP did not return within 15s of the drain")
	}
	if err := <-slowDone; err != nil {
		t.Errorf("the in-flight slow request failed: %v", err)
	}
	if err := <-idleDone; err != nil {
		t.Errorf("the idle keep-alive client's request after the drain began: %v", err)
	}
	close(stop)
	wg.Wait()

	var failures []string
	total, byA, withClose, withoutClose := 0, 0, 0, 0
	for _, c := range clients {
		failures = append(failures, c.failures...)
		for s, n := range c.byServer {
			total += n
			if s == "A" {
				byA += n
			}
		}
		withClose += c.afterDrain["true"]
		withoutClose += c.afterDrain["false"]
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed:\n%s", len(failures), total+len(failures), strings.Join(failures[:min(10, len(failures))], "\n"))
	}
	if byA == 0 || total < 100 {
		t.Errorf("too little traffic to judge: %d requests, %d by A", total, byA)
	}
	if withClose == 0 {
		t.Error("no answer of A after the drain began carried Connection: close")
	}
	t.Logf("%d requests, %d by A; after drain start A answered %d with Connection: close, %d without (those were in flight at the start)", total, byA, withClose, withoutClose)
}

// TestServeHTTP_NoListener explains itself.
func TestServeHTTP_NoListener(t *testing.T) {
	t.Setenv(EnvListenPID, "")
	err := serveHTTP(context.Background(), &http.Server{}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "no listener") {
		t.Errorf("ServeHTTP without listeners: %v", err)
	}
}

// TestServeHTTP_AListenerShutDownByTheMasterEndsQuietly: a reload drops a
// listener by shutting the shared socket down (DESIGN §4); the worker's
// Serve on it ends, the worker goes on serving its other listener, and a
// later stop drains it with no error.
func TestServeHTTP_AListenerShutDownByTheMasterEndsQuietly(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	t.Setenv(EnvDrainTimeout, "20s")
	kept, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	dropped, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dropped.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	srv := serverNamed("A", nil)
	go func() {
		served <- serveHTTP(ctx, srv, nil, []net.Listener{dupListener(t, kept), dupListener(t, dropped)})
	}()
	c := newKAClient(dropped.Addr().String())
	if _, err := c.do("/", false); err != nil {
		t.Fatalf("request on the listener to be dropped: %v", err)
	}
	c.conn.Close()
	// What the master does to a dropped listener: shutdown, then close.
	if err := syscall.Shutdown(int(rawFDOf(t, dropped.(syscall.Conn))), syscall.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		k := newKAClient(kept.Addr().String())
		if _, err := k.do("/", false); err != nil {
			t.Fatalf("request %d on the kept listener after the other was shut down: %v", i, err)
		}
		k.conn.Close()
		select {
		case err := <-served:
			t.Fatalf("ServeHTTP returned after a listener was shut down: %v", err)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeHTTP after the stop: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("ServeHTTP did not return after its context was cancelled")
	}
}
