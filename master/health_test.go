package master

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serveOnce answers one request on c with handler h (nil: no answer,
// the connection is closed at once).
func serveOnce(c net.Conn, h func(r *http.Request) string) {
	defer c.Close()
	if h == nil {
		return
	}
	r, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		return
	}
	_, _ = c.Write([]byte(h(r)))
}

func TestGetHealth(t *testing.T) {
	cases := []struct {
		name string
		h    func(r *http.Request) string
		want string // "" passes
	}{
		{"ok", func(r *http.Request) string {
			if r.Method != "GET" || r.URL.Path != "/healthz" {
				return "HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"
			}
			return "HTTP/1.1 204 No Content\r\n\r\n"
		}, ""},
		{"503", func(*http.Request) string { return "HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n" }, "status 503"},
		{"redirect", func(*http.Request) string { return "HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n" }, "status 302"},
		{"closed", nil, "closed without an answer"},
		{"garbage", func(*http.Request) string { return "hello\r\n\r\n" }, "bad answer"},
		{"endless headers", func(*http.Request) string {
			return "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", 2*maxHealthResponse)
		}, "answer longer than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mine, theirs, err := healthPair()
			if err != nil {
				t.Fatal(err)
			}
			defer mine.Close()
			wc, err := net.FileConn(theirs)
			theirs.Close()
			if err != nil {
				t.Fatal(err)
			}
			go serveOnce(wc, c.h)
			err = getHealth(mine, "/healthz", 5*time.Second)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("got %v, want a pass", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("got %v, want an error containing %q", err, c.want)
			}
		})
	}
}

func TestGetHealth_Timeout(t *testing.T) {
	mine, theirs, err := healthPair()
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	defer theirs.Close() // held open, never answered
	err = getHealth(mine, "/healthz", 100*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "no answer within") {
		t.Errorf("got %v, want a timeout", err)
	}
}

func TestCheckHealthPath(t *testing.T) {
	for _, p := range []string{"", "/", "/healthz", "/health?full=1", "/a%20b"} {
		if err := checkHealthPath(p); err != nil {
			t.Errorf("%q: %v", p, err)
		}
	}
	for _, p := range []string{"healthz", "/a b", "/a\r\nX-Injected: 1", "/\x7f", "/é", "http://elsewhere/healthz", "/" + strings.Repeat("a", 1024)} {
		if err := checkHealthPath(p); err == nil {
			t.Errorf("%q: accepted", p)
		}
	}
}

// nextEvent takes the next event a goroutine sent the test master.
func nextEvent(t *testing.T, m *Master) event {
	t.Helper()
	select {
	case ev := <-m.events:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
		return nil
	}
}

// TestLoop_HealthCheckGatesReadiness: with a health check, READY=1 starts
// the check; the worker is ready only once it passed. A failed check
// stops the worker, and its exit is refilled with the crash backoff.
func TestLoop_HealthCheckGatesReadiness(t *testing.T) {
	withCheck := func(c *Config) { c.HealthCheck = "/healthz" }

	m, f := newTestMaster(t, 1, withCheck)
	pid := f.started[0]
	m.onNotify(ready(pid))
	if p := m.procs[pid]; p.state != workerStarting || !p.checking || m.phase != phaseStarting {
		t.Fatalf("after READY=1: worker %v (checking %v), phase %v; want starting, checking, starting", p.state, p.checking, m.phase)
	}
	_ = nextEvent(t, m) // the real check's result (the fake proc has no socket)
	m.onHealthDone(healthDone{pid: pid, how: "notify", what: "GET /healthz"})
	if p := m.procs[pid]; p.state != workerReady || m.phase != phaseServing {
		t.Fatalf("after a passed check: worker %v, phase %v; want ready, serving", p.state, m.phase)
	}

	m, f = newTestMaster(t, 1, withCheck)
	pid = f.started[0]
	m.onNotify(ready(pid))
	ev, ok := nextEvent(t, m).(healthDone)
	if !ok || ev.err == nil || !strings.Contains(ev.err.Error(), "no health socket") {
		t.Fatalf("check of a worker without a socket: %v", ev)
	}
	m.onHealthDone(ev)
	if p := m.procs[pid]; p.state != workerStopping || len(f.signals) == 0 || f.signals[len(f.signals)-1] != (sentSignal{-pid, syscall.SIGTERM}) {
		t.Fatalf("after a failed check: worker %v, signals %v; want it stopped", p.state, f.signals)
	}
	m.onHealthDone(ev) // a late duplicate changes nothing
	m.onChildExited(exited(pid))
	// Replaced (the first failure at once, as a crash), and the
	// replacement is checked too; its failure waits out a backoff.
	if len(f.started) != 2 {
		t.Fatalf("%d workers started, want a replacement", len(f.started))
	}
	pid = f.started[1]
	m.onNotify(ready(pid))
	m.onHealthDone(nextEvent(t, m).(healthDone))
	m.onChildExited(exited(pid))
	if tm := f.lastTimer(t, respawnDue); tm.d <= 0 || len(f.started) != 2 {
		t.Errorf("second failed check: respawn in %v (%d started), want a backoff", tm.d, len(f.started))
	}
	if m.phase != phaseStarting {
		t.Errorf("phase %v, want starting: no worker passed", m.phase)
	}
}

// runCmd runs runHealthCmd in a goroutine of its own (it keeps its
// thread, which ends with it).
func runCmd(cmd string, timeout time.Duration) error {
	errC := make(chan error, 1)
	go func() { errC <- runHealthCmd(cmd, timeout, 4242, 3, nil, "", []string{"PATH=/usr/bin:/bin"}, false) }()
	return <-errC
}

func TestRunHealthCmd(t *testing.T) {
	if err := runCmd(`test "$MOLT_WORKER_PID" = 4242 && test "$MOLT_WORKER" = 3`, 5*time.Second); err != nil {
		t.Errorf("the worker's pid and slot: %v", err)
	}
	err := runCmd("echo sick; printf '\\033[2J'; exit 3", 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "exit status 3: sick") || strings.Contains(err.Error(), "\033") {
		t.Errorf("a failing command: %v", err)
	}
	// A command that exits 0 but leaves a child behind passes at once,
	// and the child is killed.
	pidFile := filepath.Join(t.TempDir(), "child")
	start := time.Now()
	if err := runCmd("sleep 30 & echo $! > "+pidFile+"; exit 0", 5*time.Second); err != nil || time.Since(start) > 900*time.Millisecond {
		t.Errorf("a command leaving a child: %v after %v", err, time.Since(start))
	}
	if b, err := os.ReadFile(pidFile); err != nil {
		t.Error(err)
	} else if child, _ := strconv.Atoi(strings.TrimSpace(string(b))); child <= 0 || alive(child) {
		t.Errorf("its child %q is still running", b)
	}
	// A command that outlives its timeout is killed with its children.
	start = time.Now()
	err = runCmd("sleep 30 & sleep 30", 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "no result within") || time.Since(start) > 5*time.Second {
		t.Errorf("a hanging command: %v after %v", err, time.Since(start))
	}
}

// TestLoop_ReloadFailsOnAFailedHealthCheck: a reload's new worker that
// fails its check fails the reload; the old workers serve on.
func TestLoop_ReloadFailsOnAFailedHealthCheck(t *testing.T) {
	spec := ListenSpec{Name: "l0", Network: "tcp", Address: "127.0.0.1:0"}
	m, f := newTestMaster(t, 2, func(c *Config) { c.Listeners = []ListenSpec{spec}; c.HealthCheck = "/healthz" })
	m.listeners = []*listener{{spec: spec}}
	pass := func(pid int) {
		m.onNotify(ready(pid))
		_ = nextEvent(t, m)
		m.onHealthDone(healthDone{pid: pid, how: "notify", what: "GET /healthz"})
	}
	pass(f.started[0])
	pass(f.started[1])
	if m.phase != phaseServing {
		t.Fatalf("phase %v, want serving", m.phase)
	}
	if err := m.onReload(nil); err != nil {
		t.Fatal(err)
	}
	pass(f.started[2])
	m.onNotify(ready(f.started[3]))
	m.onHealthDone(nextEvent(t, m).(healthDone)) // fails: no socket
	if m.rl != nil || m.slots[0].pid != f.started[0] || m.slots[1].pid != f.started[1] {
		t.Fatalf("after a failed check in a reload: slots %+v %+v, want the old workers", m.slots[0], m.slots[1])
	}
	for _, s := range f.signals {
		if s.pid == -f.started[0] || s.pid == -f.started[1] {
			t.Errorf("an old worker was signalled: %v", f.signals)
		}
	}
}

// alive reports whether pid runs (neither gone nor a zombie), within a
// second.
func alive(pid int) bool {
	for range 100 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		if f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}
