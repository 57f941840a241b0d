package worker

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeTable is an accept table in ordinary memory with entries entries in
// use, and a balancer for entry self with the given bound.
func fakeTable(t *testing.T, entries, self int, bound time.Duration) *balancer {
	t.Helper()
	words := make([]uint64, (entries+1)*TableLine/8) // 8-byte aligned
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&mem[0])), uint32(entries))
	b := newBalancer(mem, self)
	if b == nil {
		t.Fatal("newBalancer refused a valid table")
	}
	b.bound = bound
	return b
}

// set writes entry i as a sibling would.
func (b *balancer) set(i int, state uint32, active int64) {
	atomic.StoreUint32(b.state(i), state)
	atomic.StoreInt64(b.word64(i, TableOffActive), active)
}

func loopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func dial(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// acceptIn runs Accept in a goroutine and reports what it returned.
func acceptIn(ln net.Listener) <-chan error {
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if c != nil {
			c.Close()
		}
		done <- err
	}()
	return done
}

func TestBalance_OverShareWaitsForSiblingThenAccepts(t *testing.T) {
	b := fakeTable(t, 2, 0, time.Minute)
	b.set(0, EntryAccepting, 3)
	b.set(1, EntryAccepting, 0)
	ln := b.wrap(loopback(t), true)
	dial(t, ln)
	done := acceptIn(ln)
	// Observation window: over its share by 3 with a connection pending
	// and a bound of a minute, it must leave the connection alone.
	select {
	case err := <-done:
		t.Fatalf("accepted at once while over its share (%v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	b.set(1, EntryAccepting, 2) // the sibling caught up to within slack
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting after the sibling caught up")
	}
	// Own count: 3 set above, +1 accepted, -1 closed.
	if got := b.active(0); got != 3 {
		t.Errorf("own active = %d after accept and close, want 3", got)
	}
}

func TestBalance_HungSiblingCostsOneBoundedWait(t *testing.T) {
	bound := 200 * time.Millisecond
	b := fakeTable(t, 2, 0, bound)
	b.set(0, EntryAccepting, 5)
	b.set(1, EntryAccepting, 0) // never accepts
	ln := b.wrap(loopback(t), true)
	dial(t, ln)
	start := time.Now()
	if err := <-acceptIn(ln); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < bound {
		t.Errorf("accepted after %v, before the bound %v, with the sibling hung", d, bound)
	}
	// Ignored now: the next connections are accepted without waiting.
	for range 3 {
		dial(t, ln)
		start = time.Now()
		if err := <-acceptIn(ln); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d >= bound {
			t.Errorf("waited %v again for a sibling already seen hung", d)
		}
	}
}

func TestBalance_AbsentAndDrainingSiblingsDoNotCount(t *testing.T) {
	for _, state := range []uint32{EntryAbsent, EntryNotAccepting} {
		b := fakeTable(t, 3, 0, time.Minute)
		b.set(0, EntryAccepting, 9)
		b.set(1, state, 0)
		// Entry 2 is beyond the header's count of entries in use.
		atomic.StoreUint32((*uint32)(unsafe.Pointer(&b.mem[0])), 2)
		b.set(2, EntryAccepting, 0)
		if b.over(time.Now().UnixNano()) {
			t.Errorf("state %d: over its share with no accepting sibling in use", state)
		}
		ln := b.wrap(loopback(t), true)
		dial(t, ln)
		select {
		case err := <-acceptIn(ln):
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("state %d: waited for a sibling that does not accept", state)
		}
	}
}

func TestBalance_CloseEndsAWaitAndMarksNotAccepting(t *testing.T) {
	b := fakeTable(t, 2, 0, time.Minute)
	b.set(0, EntryAccepting, 3)
	b.set(1, EntryAccepting, 0)
	ln := b.wrap(loopback(t), true)
	if got := atomic.LoadUint32(b.state(0)); got != EntryAccepting {
		t.Fatalf("state %d after wrap, want accepting", got)
	}
	dial(t, ln)
	done := acceptIn(ln)
	// Observation window: it is waiting its turn (see the test above).
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Accept on a closed listener returned a connection")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end the wait")
	}
	if got := atomic.LoadUint32(b.state(0)); got != EntryNotAccepting {
		t.Errorf("state %d after Close, want not accepting", got)
	}
}

// TestBalance_ADroppedListenerEndsAWait: a reload shuts down a listener
// (SHUT_RDWR) while this worker waits, over its share, for a connection:
// Accept reports the failure instead of waiting for ever.
func TestBalance_ADroppedListenerEndsAWait(t *testing.T) {
	b := fakeTable(t, 2, 0, 100*time.Millisecond)
	b.set(0, EntryAccepting, 3)
	b.set(1, EntryAccepting, 0)
	raw := loopback(t)
	ln := b.wrap(raw, true)
	done := acceptIn(ln)
	// Observation window: no connection, so it waits for one.
	time.Sleep(50 * time.Millisecond)
	rc, err := raw.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Accept on a shut-down listener returned a connection")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting on a listener that no longer listens")
	}
}

// TestBalance_CountsReturnToZero: HTTP/1.1 keep-alive, hijacked and
// HTTP/2 connections count while open and not after they close, both
// for Balance's wrapped connections and for ServeHTTP's, which stay
// *net.TCPConn and are counted through ConnState.
func TestBalance_CountsReturnToZero(t *testing.T) {
	for _, served := range []bool{false, true} {
		t.Run(map[bool]string{false: "Balance", true: "ServeHTTP"}[served], func(t *testing.T) {
			countsReturnToZero(t, served)
		})
	}
}

func countsReturnToZero(t *testing.T, served bool) {
	b := fakeTable(t, 1, 0, time.Minute)
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, r *http.Request) {
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
		c.Close()
		<-release // a WebSocket's handler runs on: the connection is load
	})
	var notTCP atomic.Int32
	serve := func(srv *http.Server, raw net.Listener, useTLS bool) {
		srv.ConnState = func(c net.Conn, s http.ConnState) {
			if tc, ok := c.(*tls.Conn); ok {
				c = tc.NetConn()
			}
			if _, ok := c.(*net.TCPConn); !ok {
				notTCP.Add(1)
			}
		}
		if served {
			newDrainer(srv).bal = b
		}
		t.Cleanup(func() { srv.Close() })
		ln := b.wrap(raw, !served)
		if useTLS {
			go srv.ServeTLS(ln, "", "")
		} else {
			go srv.Serve(ln)
		}
	}
	raw1, raw2 := loopback(t), loopback(t)
	serve(&http.Server{Handler: mux}, raw1, false)
	tlsConf, pool := selfSigned(t)
	serve(&http.Server{Handler: mux, TLSConfig: tlsConf}, raw2, true)

	get := func(c *http.Client, url string, wantMajor int) {
		t.Helper()
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != wantMajor {
			t.Fatalf("%s: HTTP/%d, want HTTP/%d", url, resp.ProtoMajor, wantMajor)
		}
	}
	h1 := &http.Transport{}
	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	get(&http.Client{Transport: h1}, "http://"+raw1.Addr().String()+"/", 1)
	hj := &http.Transport{}
	defer hj.CloseIdleConnections()
	get(&http.Client{Transport: hj}, "http://"+raw1.Addr().String()+"/hijack", 1)
	get(&http.Client{Transport: h2}, "https://"+raw2.Addr().String()+"/", 2)
	if served {
		// The hijacked connection counts while its handler runs.
		waitActive(t, b, 3)
	}
	close(release)
	// Open now: the keep-alive and the HTTP/2 connection.
	waitActive(t, b, 2)
	h1.CloseIdleConnections()
	h2.CloseIdleConnections()
	waitActive(t, b, 0)
	if served {
		if n := notTCP.Load(); n != 0 {
			t.Errorf("ConnState saw %d connections that are not *net.TCPConn", n)
		}
	} else if _, ok := b.track(&net.TCPConn{}).(interface{ NetConn() net.Conn }).NetConn().(*net.TCPConn); !ok {
		t.Error("NetConn does not return the *net.TCPConn")
	}
	if got := b.accepts(0); got != 3 {
		t.Errorf("accepts = %d, want 3", got)
	}
}

// waitActive waits until entry 0 counts want open connections.
func waitActive(t *testing.T, b *balancer, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for b.active(0) != want {
		if time.Now().After(deadline) {
			t.Fatalf("active = %d, want %d", b.active(0), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestBalance_OpensOnlyASealedTableMeantForIt: a table that a sibling
// could shrink under the mapping (SIGBUS) is not used, nor one passed to
// another pid, nor any with MOLT_ACCEPT_BALANCE=off.
func TestBalance_OpensOnlyASealedTableMeantForIt(t *testing.T) {
	memfd := func(seal bool) int { return testTable(t, seal) }
	for _, c := range []struct {
		name      string
		seal      bool
		pid       int
		off, want bool
	}{
		{"sealed", true, os.Getpid(), false, true},
		{"unsealed", false, os.Getpid(), false, false},
		{"other pid", true, os.Getpid() + 1, false, false},
		{"off", true, os.Getpid(), true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv(EnvAcceptTable, strconv.Itoa(memfd(c.seal)))
			t.Setenv(EnvAcceptEntry, "1")
			t.Setenv(EnvListenPID, strconv.Itoa(c.pid))
			if c.off {
				t.Setenv(EnvAcceptBalance, "off")
			}
			b := openBalancer()
			if (b != nil) != c.want {
				t.Fatalf("openBalancer() = %v, want a balancer: %v", b, c.want)
			}
			if b != nil {
				unix.Munmap(b.mem)
			}
		})
	}
}

// fakePeer gives b an old generation's table in ordinary memory with
// entries entries in use, all accepting, and returns a setter of an
// entry's accepts.
func fakePeer(t *testing.T, b *balancer, entries int) func(i int, accepts int64) {
	t.Helper()
	words := make([]uint64, (entries+1)*TableLine/8)
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&mem[0])), uint32(entries))
	for i := range entries {
		atomic.StoreUint32((*uint32)(unsafe.Pointer(&mem[(i+1)*TableLine+TableOffState])), EntryAccepting)
		atomic.StoreInt64((*int64)(unsafe.Pointer(&mem[(i+1)*TableLine+TableOffAccepts])), 100)
	}
	b.peer = newPeerTable(mem)
	if b.peer == nil {
		t.Fatal("newPeerTable refused a valid table")
	}
	return func(i int, accepts int64) {
		atomic.StoreInt64((*int64)(unsafe.Pointer(&mem[(i+1)*TableLine+TableOffAccepts])), accepts)
	}
}

// A canary ahead of the old generation's least busy worker waits its
// turn (bounded), counts from what the old workers had accepted when it
// started, and accepts at once when they catch up or hang.
func TestBalance_CanaryKeepsToTheOldGenerationsPace(t *testing.T) {
	bound := 200 * time.Millisecond
	b := fakeTable(t, 1, 0, bound)
	setAccepts := fakePeer(t, b, 2)
	ln := b.wrap(loopback(t), true)
	accept := func() time.Duration {
		t.Helper()
		dial(t, ln)
		start := time.Now()
		if err := <-acceptIn(ln); err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	for i := range peerSlack + 1 { // its slack: the old workers accepted nothing yet
		if d := accept(); d >= bound {
			t.Fatalf("accept %d waited %v within the slack", i, d)
		}
	}
	setAccepts(0, 100+10) // entry 1 still at its base: the least busy
	setAccepts(1, 100+1)  // catches up partly: one more turn
	if d := accept(); d >= bound {
		t.Fatalf("waited %v with the least busy old worker one behind the slack", d)
	}
	// Now ahead, the old workers accepting nothing more: one bounded wait,
	// then the one behind (entry 1) is ignored.
	if d := accept(); d < bound {
		t.Errorf("accepted after %v, ahead of the old generation, before the bound %v", d, bound)
	}
	if d := accept(); d >= bound {
		t.Errorf("waited %v again for old workers already seen hung", d)
	}
	if lo, ok := b.peer.least(time.Now().Add(2 * b.ignore).UnixNano()); !ok || lo != 1 {
		t.Errorf("least = %d, %v after the ignore period; want 1 (entry 1)", lo, ok)
	}
	setAccepts(1, 0) // a new worker in entry 1 (or a lie): its count rebases
	if lo, _ := b.peer.least(time.Now().Add(2 * b.ignore).UnixNano()); lo != 0 {
		t.Errorf("least = %d after entry 1's count fell, want 0", lo)
	}
}

// A canary maps the old generation's table only when it is sealed, and
// read-only.
func TestBalance_CanaryOpensOnlyASealedPeerTable(t *testing.T) {
	memfd := func(seal bool) int { return testTable(t, seal) }
	for _, seal := range []bool{true, false} {
		t.Setenv(EnvAcceptTable, strconv.Itoa(memfd(true)))
		t.Setenv(EnvAcceptEntry, "0")
		t.Setenv(EnvListenPID, strconv.Itoa(os.Getpid()))
		t.Setenv(EnvAcceptPeerTable, strconv.Itoa(memfd(seal)))
		b := openBalancer()
		if b == nil {
			t.Fatal("openBalancer refused its own table")
		}
		if (b.peer != nil) != seal {
			t.Errorf("sealed %v: peer table mapped: %v", seal, b.peer != nil)
		}
		if b.peer != nil {
			unix.Munmap(b.peer.mem)
		}
		unix.Munmap(b.mem)
	}
}

// testTable is a 4-entry accept table, a memfd sealed against shrinking
// and growing or not; the caller's openBalancer closes it.
func testTable(t *testing.T, seal bool) int {
	t.Helper()
	fd, err := unix.MemfdCreate("test-table", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, 4*TableLine); err != nil {
		t.Fatal(err)
	}
	if seal {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}
