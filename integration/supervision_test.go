package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"github.com/molt-server/molt/test/load"
)

// TestSupervision_KilledWorkerIsReplaced: kill -9 of a worker; the master
// logs the exit and starts a replacement in the same slot at once.
func TestSupervision_KilledWorkerIsReplaced(t *testing.T) {
	t.Parallel()
	m, addr, before := startSteady(t, 2)
	victim := before[0]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var after []int
	test.WaitFor(t, stepTimeout, "a replacement worker", func() error {
		after = m.waitWorkers(2)
		if slices.Contains(after, victim) {
			return fmt.Errorf("victim %d still listed", victim)
		}
		return nil
	})
	l := test.WaitLog(t, m.log, stepTimeout, 1, "the exit line", test.Event("worker.exited_unexpectedly", "pid", strconv.Itoa(victim)))
	if l[0].Str("status") != "signal: killed" || l[0].Str("restart_in") != "0s" {
		t.Errorf("exit line %s: want status 'signal: killed' and an immediate restart", l[0].Raw)
	}
	for i := 0; i < 20; i++ {
		if r := get(t, addr, "/"); r.WorkerPid() == victim {
			t.Fatal("answered by the killed worker")
		}
	}
	m.stop(test.Event("worker.exited_unexpectedly"))
}

// TestSupervision_CrashLoopBacksOff: an app that dies at start is
// restarted with growing delays, and the master keeps running.
func TestSupervision_CrashLoopBacksOff(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--", bins.fakeapp, "crash"}})
	m.addr()
	crashes := test.WaitLog(t, m.log, stepTimeout, 5, "five crashes", test.Event("worker.exited_unexpectedly"))
	var delays []time.Duration
	for _, l := range crashes[:5] {
		d, err := time.ParseDuration(l.Str("restart_in"))
		if err != nil {
			t.Fatalf("restart_in %q: %v", l.Str("restart_in"), err)
		}
		delays = append(delays, d)
		if l.Str("status") != "exit status 1" {
			t.Errorf("crash line %s: want exit status 1", l.Raw)
		}
	}
	if delays[0] != 0 {
		t.Errorf("first crash waits %v, want an immediate restart", delays[0])
	}
	for i := 2; i < len(delays); i++ {
		if delays[i] <= delays[i-1] {
			t.Errorf("backoff did not grow: %v", delays)
			break
		}
	}
	if !test.Alive(m.Pid) {
		t.Fatal("a crash loop of workers took the master down")
	}
	// molt ctl status shows the slot waiting out its backoff.
	test.WaitFor(t, stepTimeout, "status to show the slot restarting", func() error {
		st := statusOf(t, m.pidFile)
		for _, p := range st.Procs {
			if p.State == "restarting" && p.PID == 0 && p.Failures >= 5 && p.RestartIn != "" {
				return nil
			}
		}
		return fmt.Errorf("procs %+v", st.Procs)
	})
	if code, out := ctl(t, m.pidFile, "status"); code != 0 || !strings.Contains(out, "failures in a row)") {
		t.Errorf("status: exit %d:\n%s", code, out)
	}
	m.stop(test.Event("worker.exited_unexpectedly"))
}

// TestSupervision_ReadyTimeoutAndReadyDelay: an app that never sends
// READY=1 is stopped and replaced after --ready-timeout; with
// --ready=delay:DUR the same app counts as ready.
func TestSupervision_ReadyTimeoutAndReadyDelay(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--ready-timeout", "1s", "--", bins.fakeapp, "serve", "--no-notify"}})
	m.addr()
	test.WaitLog(t, m.log, stepTimeout, 2, "two workers stopped for not being ready", test.Event("worker.not_ready"))
	m.stop(test.Event("worker.not_ready"), test.Event("worker.exited_unexpectedly"))

	d := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready", "delay:300ms", "--", bins.fakeapp, "serve", "--no-notify"}})
	addr := d.addr()
	d.waitServing()
	for _, l := range test.Find(d.log, test.Event("worker.ready")) {
		if l.Str("how") != "delay" {
			t.Errorf("ready line %s: want how=delay", l.Raw)
		}
	}
	get(t, addr, "/")
	d.stop()
}

// TestSupervision_DrainTimeoutKillsAStubbornWorker: a worker that ignores
// its stop signal is killed when --drain-timeout passes; QUIT still ends
// with exit 0.
func TestSupervision_DrainTimeoutKillsAStubbornWorker(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--drain-timeout", "1s", "--", bins.fakeapp, "serve", "--ignore-stop"}})
	m.addr()
	m.waitServing()
	w := m.waitWorkers(1)
	m.Signal(quit)
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("exit %d, want 0", code)
	}
	test.WaitLog(t, m.log, time.Second, 1, "the kill line", test.Event("worker.drain_timeout", "pid", strconv.Itoa(w[0])))
	ex := test.Find(m.log, test.Event("worker.exited", "pid", strconv.Itoa(w[0])))
	if len(ex) != 1 || ex[0].Str("status") != "signal: killed" {
		t.Errorf("stubborn worker's exit: %v", ex)
	}
}

// TestSupervision_MasterKilledLeavesNoWorker: SIGKILL of the master; its
// workers see it go (a Go worker through the parent pipe, any app through
// its stop signal via Pdeathsig), answer what they hold and are gone once
// the drain timeout has passed; a new master then serves on the same
// address and pid file, and under load no request fails outside that
// outage. The test binary is a subreaper, so the orphans re-parent to it
// and the leak check sees them.
func TestSupervision_MasterKilledLeavesNoWorker(t *testing.T) {
	t.Parallel()
	cases := map[string][]string{
		"go demo": nil,
		"go app":  {"--", bins.fakeapp, "serve"},
		"python":  {"--", "python3", pyApp(t)},
	}
	for name, app := range cases {
		t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
			// A port below the ephemeral range: once the master and its
			// workers are gone, no client's connection can take it
			// before the new master binds it again (test.FreeAddr).
			m := start(t, runOpts{Args: append([]string{"--listen", freeAddr(t), "--workers", "2", "--drain-timeout", "3s"}, app...)})
			addr := m.addr()
			m.waitServing()
			workers := m.waitWorkers(2)
			// A request on a connection a worker holds when the master dies
			// is answered: the workers drain, they do not drop what they
			// hold. (The first answer proves a worker accepted it.)
			// Under load (the demo case), no request fails outside the
			// outage: from the kill until the new master serves.
			var held *keepAlive
			var l *loadPair
			if app == nil {
				l = startLoad(t, addr)
				held = dialKeepAlive(t, addr)
				held.get(t, "/")
				held.send(t, "/sleep?ms=1000")
			}
			killed := time.Now()
			m.Signal(syscall.SIGKILL)
			m.Wait(stepTimeout)
			if held != nil {
				if status := held.read(t); status != 200 {
					t.Errorf("the request in flight when the master died: status %d", status)
				}
			}
			waitGone(t, "workers to exit after their master died", workers)
			// A new master can start on the same pid file: the lock died
			// with the old one, and the stale pid file is replaced.
			// ... and on the same address.
			n := start(t, runOpts{Dir: m.dir, Args: append([]string{"--listen", addr, "--workers", "1"}, app...)})
			n.addr()
			n.waitServing()
			serving := time.Now()
			get(t, addr, "/")
			if l != nil {
				ka, pc := l.stopWithin(t, "the outage", killed, serving)
				for name, res := range map[string]load.Result{"keep-alive": ka, "connection per request": pc} {
					if res.ByMaster[n.Pid] == 0 {
						t.Errorf("%s load: the new master answered nothing: %v", name, res.ByMaster)
					}
				}
			}
			if got := n.current(); got != n.Pid {
				t.Errorf("pid file %d, want the new master %d", got, n.Pid)
			}
			n.stop()
		})
	}
}

// pyApp returns the path of the Python test worker, requiring python3.
func pyApp(t *testing.T) string {
	t.Helper()
	test.RequireCommand(t, "python3")
	p, err := filepath.Abs("../test/pyapp/app.py")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// keepAlive is one raw HTTP/1.1 keep-alive connection, for tests that
// must know which connection a request is on.
type keepAlive struct {
	c  net.Conn
	br *bufio.Reader
}

func dialKeepAlive(t *testing.T, addr string) *keepAlive {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, reqTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &keepAlive{c: c, br: bufio.NewReader(c)}
}

func (k *keepAlive) send(t *testing.T, path string) {
	t.Helper()
	k.c.SetDeadline(time.Now().Add(stepTimeout))
	if _, err := fmt.Fprintf(k.c, "GET %s HTTP/1.1\r\nHost: molt-test\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
}

// read reads one response and returns its status.
func (k *keepAlive) read(t *testing.T) int {
	t.Helper()
	r, err := http.ReadResponse(k.br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	io.Copy(io.Discard, r.Body)
	r.Body.Close()
	return r.StatusCode
}

func (k *keepAlive) get(t *testing.T, path string) {
	t.Helper()
	k.send(t, path)
	if s := k.read(t); s != 200 {
		t.Fatalf("GET %s: status %d", path, s)
	}
}
