package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// fdNonBlocking reads whether fd of pid has O_NONBLOCK, from
// /proc/pid/fdinfo (flags in octal).
func fdNonBlocking(t *testing.T, pid, fd int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		t.Fatalf("fdinfo of worker %d fd %d: %v", pid, fd, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			fl, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			if err != nil {
				t.Fatalf("fdinfo of worker %d fd %d: flags %q", pid, fd, v)
			}
			return fl&0o4000 != 0 // O_NONBLOCK
		}
	}
	t.Fatalf("fdinfo of worker %d fd %d has no flags:\n%s", pid, fd, b)
	return false
}

// TestBlocking_PythonBlockingAcceptThroughAnUpgradeUnderLoad: a Python
// worker written for systemd-socket-activate (setblocking(True), then
// accept in a loop) on a listener with the option ",blocking" serves
// through an upgrade under load, in both connection modes, with no failed
// request: its socket stays blocking in both generations (the master never
// switches it back), and the old workers' drain ends when their stop
// signal interrupts the blocked accept, long before --drain-timeout.
func TestBlocking_PythonBlockingAcceptThroughAnUpgradeUnderLoad(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	m := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "web=127.0.0.1:0,blocking", "--workers", "2", "--probation", "2s",
		"--drain-timeout", "60s", "--", "python3", app, "--blocking-accept"}})
	addr := m.addr()
	m.waitServing()
	old := m.waitWorkers(2)
	for _, w := range old {
		if fdNonBlocking(t, w, 3) {
			t.Errorf("worker %d: its listener is non-blocking", w)
		}
	}
	l := startLoad(t, addr)
	// Observation window, not synchronization: the primary checks its
	// listeners every second; over 2.5s under load it must leave this one
	// blocking, and the workers keep serving.
	time.Sleep(2500 * time.Millisecond)
	n := m.upgrade()
	waitGone(t, "the old workers to exit", old)
	// The same window under the new primary.
	time.Sleep(2500 * time.Millisecond)
	l.stop(t)
	for _, w := range workersOf(n) {
		test.Track(t, w)
		if fdNonBlocking(t, w, 3) {
			t.Errorf("new worker %d: its listener is non-blocking", w)
		}
	}
	if got := test.Find(m.log, test.Event("listener.healed")); len(got) != 0 {
		t.Errorf("the master switched the blocking listener's mode: %v", got)
	}
	if got := get(t, addr, "/"); got.Status != 200 {
		t.Errorf("GET after the upgrade: %d", got.Status)
	}
	// With no load, the workers wait in accept with nothing to come: the
	// stop ends their drain only by interrupting it (m.stop allows 20s,
	// --drain-timeout is 60s).
	m.stop()
	if got := test.Find(m.log, test.Event("worker.drain_timeout")); len(got) != 0 {
		t.Errorf("a drain reached --drain-timeout: %v", got)
	}
}

// TestBlocking_WithoutTheOptionABlockingAcceptWorkerDies: without the
// option, the same worker's setblocking(True) switches the shared socket
// to blocking mode; the master switches it back (listener.healed, fault
// blocking) and the worker's next accept fails with EAGAIN: it dies, as
// issue 13 saw. molt does not guess the app's intent (a Go worker that
// switched it by mistake would hang its drains); the warning names the
// option.
func TestBlocking_WithoutTheOptionABlockingAcceptWorkerDies(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--", "python3", app, "--blocking-accept"}})
	addr := m.addr()
	m.waitServing()
	m.waitWorkers(1)
	test.WaitLog(t, m.log, stepTimeout, 1, "the master to switch the listener back", test.Event("listener.healed", "fault", "blocking"))
	// The worker's accept blocked before the switch returns with the next
	// connection; the one after fails. Requests may fail here: that is
	// the failure this test shows.
	test.WaitFor(t, stepTimeout, "the blocking worker to die", func() error {
		_, _ = test.Get(addr, "/", 200*time.Millisecond)
		if len(test.Find(m.log, test.Event("worker.exited_unexpectedly"))) == 0 {
			return fmt.Errorf("no worker.exited_unexpectedly yet")
		}
		return nil
	})
	m.stop(test.Event("worker.exited_unexpectedly"))
}

// TestBlocking_AReloadSwitchesTheModeUnderLoad: a reload that adds the
// option ",blocking" to a kept listener and starts blocking-accept Python
// workers switches the socket before they start (listener.mode_changed);
// the old workers (select then accept) drain, the new ones serve and the
// master leaves the socket blocking, and no request fails.
func TestBlocking_AReloadSwitchesTheModeUnderLoad(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	conf := func(opt, arg string) string {
		return fmt.Sprintf("listen = [\"web=127.0.0.1:0%s\"]\nworkers = 2\ndrain_timeout = \"60s\"\ncommand = [\"python3\", %q%s]\n", opt, app, arg)
	}
	m := start(t, runOpts{Dir: test.ShortTempDir(t), Config: conf("", "")})
	addr := m.addr()
	m.waitServing()
	old := m.waitWorkers(2)
	l := startLoad(t, addr)
	writeConfig(t, m.config, conf(",blocking", `, "--blocking-accept"`))
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	test.WaitLog(t, m.log, stepTimeout, 1, "the mode switch", test.Event("listener.mode_changed", "listener", "web"))
	waitGone(t, "the old workers to exit", old)
	// Observation window, not synchronization: the master checks its
	// listeners every second and must leave this one blocking.
	time.Sleep(2500 * time.Millisecond)
	l.stop(t)
	for _, w := range m.waitWorkers(2) {
		if fdNonBlocking(t, w, 3) {
			t.Errorf("new worker %d: its listener is non-blocking", w)
		}
	}
	if st := statusOf(t, m.pidFile); len(st.Listeners) != 1 || !st.Listeners[0].Blocking {
		t.Errorf("status listeners %+v, want web blocking", st.Listeners)
	}
	for _, bad := range []string{"listener.healed", "worker.drain_timeout"} {
		if got := test.Find(m.log, test.Event(bad)); len(got) != 0 {
			t.Errorf("%s: %v", bad, got)
		}
	}
	m.stop()
}

// TestBlocking_AFailedReloadSwitchesTheModeBack: a reload that adds the
// option and starts workers that fail switches the socket to blocking and,
// when it fails, back: the old Go workers serve on, under load, on a
// non-blocking socket, and the master's checks find nothing to repair.
func TestBlocking_AFailedReloadSwitchesTheModeBack(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Dir: test.ShortTempDir(t), Config: "listen = [\"web=127.0.0.1:0\"]\nworkers = 2\nready_timeout = \"5s\"\n"})
	addr := m.addr()
	m.waitServing()
	old := m.waitWorkers(2)
	l := startLoad(t, addr)
	writeConfig(t, m.config, "listen = [\"web=127.0.0.1:0,blocking\"]\nworkers = 2\nready_timeout = \"5s\"\ncommand = [\"/bin/false\"]\n")
	if code, _ := ctl(t, m.pidFile, "reload", "--wait"); code == 0 {
		t.Fatal("a reload whose workers fail succeeded")
	}
	if got := test.Find(m.log, test.Event("listener.mode_changed", "blocking", "false")); len(got) != 1 {
		t.Errorf("%d listener.mode_changed lines back to non-blocking, want 1", len(got))
	}
	// Observation window, not synchronization: the master checks its
	// listeners every second and finds the socket as the configuration
	// (the old one) says.
	time.Sleep(2500 * time.Millisecond)
	l.stop(t)
	for _, w := range old {
		if !test.Alive(w) {
			t.Errorf("old worker %d is gone", w)
		} else if !fdNonBlocking(t, w, 3) {
			t.Errorf("old worker %d: its listener is still blocking", w)
		}
	}
	if got := test.Find(m.log, test.Event("listener.healed")); len(got) != 0 {
		t.Errorf("listener.healed: %v", got)
	}
	m.stop(test.Event("reload.failed"), test.Event("worker.exited_unexpectedly"))
}

// TestBlocking_SocketActivationKeepsItBlocking: under
// systemd-socket-activate (which passes a blocking socket) a listener with
// the option stays blocking once molt adopts it, and blocking-accept
// Python workers serve on it under load: the first connection, queued
// before molt ran, is answered too.
func TestBlocking_SocketActivationKeepsItBlocking(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	tcp := freeAddr(t)
	m := start(t, runOpts{Launcher: activate(t, "web", tcp), Keeper: true,
		Args: []string{"--listen", "web=" + tcp + ",blocking", "--workers", "2", "--", "python3", app, "--blocking-accept"}})
	firstGet(t, m, 1, tcp)
	m.waitServing()
	if got := activatedListeners(statusOf(t, m.pidFile)); got != "web" {
		t.Errorf("activated listeners %q, want web", got)
	}
	l := startLoad(t, tcp)
	// Observation window, not synchronization: the master checks its
	// listeners every second and must leave this one blocking.
	time.Sleep(2500 * time.Millisecond)
	l.stop(t)
	for _, w := range workersOf(m.masterPid()) {
		test.Track(t, w)
		if fdNonBlocking(t, w, 3) {
			t.Errorf("worker %d: its listener is non-blocking", w)
		}
	}
	if got := test.Find(m.log, test.Event("listener.healed")); len(got) != 0 {
		t.Errorf("listener.healed: %v", got)
	}
	m.stop()
}
