package integration

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Generous bounds: the machines are shared and the binaries race-built.
const (
	startTimeout = 30 * time.Second
	stepTimeout  = 20 * time.Second
	reqTimeout   = 10 * time.Second
)

// master is a running "molt run" (or embedding program) under test.
type master struct {
	*test.Proc
	t       *testing.T
	dir     string
	pidFile string
	log     string
	// workerLog is the workers' --worker-log ("" if the test gave none:
	// then they write to molt's stdout and stderr, the Proc's log).
	workerLog string
}

// startMolt runs bins.molt run with a pid file, a JSON log file and a
// workers' log in the test's directory, then args. It does not wait for
// anything.
func startMolt(t *testing.T, args ...string) *master {
	t.Helper()
	dir := t.TempDir()
	return startMoltIn(t, dir, args...)
}

func startMoltIn(t *testing.T, dir string, args ...string) *master {
	t.Helper()
	return startMoltAt(t, dir, bins.molt, args...)
}

// startMoltAt runs the molt binary at path (argv[0], what an upgrade
// re-executes) in dir.
func startMoltAt(t *testing.T, dir, path string, args ...string) *master {
	t.Helper()
	return startMoltEnv(t, dir, path, nil, args...)
}

// startMoltEnv is startMoltAt with env added to molt's environment.
func startMoltEnv(t *testing.T, dir, path string, env []string, args ...string) *master {
	t.Helper()
	return startMoltVia(t, dir, nil, path, env, args...)
}

// startMoltVia is startMoltEnv through launcher, a command line that
// ends by executing molt's (e.g. systemd-socket-activate -l ADDR); the
// process started is the launcher's.
func startMoltVia(t *testing.T, dir string, launcher []string, path string, env []string, args ...string) *master {
	t.Helper()
	// A second master in the same directory (same pid file) gets a log of
	// its own, so that waits never match the first one's lines.
	log, workerLog := filepath.Join(dir, "molt.log"), filepath.Join(dir, "workers.log")
	for i := 2; fileExists(log); i++ {
		log, workerLog = filepath.Join(dir, fmt.Sprintf("molt-%d.log", i)), filepath.Join(dir, fmt.Sprintf("workers-%d.log", i))
	}
	m := &master{t: t, dir: dir, pidFile: filepath.Join(dir, "molt.pid"), log: log, workerLog: workerLog}
	// The master itself, unless the test asks for the keeper (keeper_test.go).
	pre := []string{"run", "--no-keeper"}
	if len(args) > 0 && args[0] == withKeeper {
		pre, args = []string{"run"}, args[1:]
	}
	full := append(append(pre, "--pid-file", m.pidFile, "--log-file", m.log, "--worker-log", m.workerLog, "--log-json", "--log-level", "debug"), args...)
	if len(launcher) > 0 {
		full = append(append(append([]string{}, launcher[1:]...), path), full...)
		path = launcher[0]
	}
	m.Proc = test.Start(t, test.Opts{Path: path, Args: full, Env: env, Dir: dir, Log: strings.TrimSuffix(log, ".log") + ".out"})
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		b, _ := os.ReadFile(m.log)
		t.Logf("--- %s:\n%s", m.log, lastLines(string(b), 80))
		if b, _ := os.ReadFile(m.workerLog); len(b) > 0 {
			t.Logf("--- %s:\n%s", m.workerLog, lastLines(string(b), 40))
		}
	})
	return m
}

// withKeeper, as the first argument of startMolt*, runs molt with its
// keeper: the process started (m.Proc) is then the keeper.
const withKeeper = "\x00keeper"

// runToEnd runs path with args in dir until it exits (bounded by
// stepTimeout) and returns its exit code and output.
func runToEnd(t *testing.T, dir, path string, args ...string) (int, string) {
	t.Helper()
	out, err := os.CreateTemp(dir, "run-*.out")
	if err != nil {
		t.Fatal(err)
	}
	out.Close()
	p := test.Start(t, test.Opts{Path: path, Args: args, Dir: dir, Log: out.Name()})
	code := p.Wait(stepTimeout)
	return code, p.Log()
}

// refused asserts that nothing listens at addr any more: a dial is
// refused (ECONNREFUSED), or for a unix path finds no socket (ENOENT).
func refused(t *testing.T, network, addr string) {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	switch {
	case err == nil:
		c.Close()
		t.Errorf("%s %s still accepts connections", network, addr)
	case !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT):
		t.Errorf("dial %s %s: %v, want connection refused or no such file", network, addr, err)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// addrs waits until the master logged n "listening" lines and returns
// listener name -> address.
func (m *master) addrs(n int) map[string]string {
	m.t.Helper()
	out := map[string]string{}
	for _, l := range test.WaitLog(m.t, m.log, startTimeout, n, "listening lines", test.Event("listener.listening")) {
		a := l.Str("addr")
		if l.Str("network") == "unix" {
			a = "unix:" + a
		}
		out[l.Str("listener")] = a
	}
	return out
}

// addr is the address of the only listener.
func (m *master) addr() string {
	m.t.Helper()
	for _, a := range m.addrs(1) {
		return a
	}
	return ""
}

// waitServing waits for the "serving" line: every worker ready.
func (m *master) waitServing() {
	m.t.Helper()
	test.WaitLog(m.t, m.log, startTimeout, 1, "the master serving", test.Event("master.serving"))
}

// workers returns the master's live worker pids, sorted, and registers
// each for the leak check at cleanup.
func (m *master) workers() []int {
	m.t.Helper()
	var pids []int
	for _, p := range test.Children(m.Pid) {
		if test.Alive(p) {
			pids = append(pids, p)
			test.Track(m.t, p)
		}
	}
	sort.Ints(pids)
	return pids
}

// waitWorkers waits until the master has exactly n live workers and every
// one of them has been logged ready, and returns them.
func (m *master) waitWorkers(n int) []int {
	m.t.Helper()
	var pids []int
	test.WaitFor(m.t, stepTimeout, fmt.Sprintf("%d ready workers", n), func() error {
		pids = m.workers()
		if len(pids) != n {
			return fmt.Errorf("%d workers: %v", len(pids), pids)
		}
		ready := map[string]bool{}
		for _, l := range test.Find(m.log, test.Event("worker.ready")) {
			ready[l.Str("pid")] = true
		}
		for _, p := range pids {
			if !ready[strconv.Itoa(p)] {
				return fmt.Errorf("worker %d not ready yet", p)
			}
		}
		return nil
	})
	return pids
}

// get sends GET path and fails the test unless it is answered 200.
func get(t *testing.T, addr, path string) test.Response {
	t.Helper()
	r, err := test.Get(addr, path, reqTimeout)
	if err != nil {
		t.Fatalf("GET %s%s: %v", addr, path, err)
	}
	if r.Status != 200 {
		t.Fatalf("GET %s%s: status %d: %s", addr, path, r.Status, r.Body)
	}
	return r
}

// stop sends QUIT and waits for a clean exit, then checks the log.
func (m *master) stop(allow ...func(test.Line) bool) {
	m.t.Helper()
	m.Signal(quit)
	if code := m.Wait(stepTimeout); code != 0 {
		m.t.Errorf("master exited %d after QUIT, want 0", code)
	}
	m.checkLogs(allow...)
}

// checkLogs runs test.CheckLogs on every file the master and its workers
// write to: molt's log, the workers' log, and the process's stdout and
// stderr (where a master under a keeper, and workers without a
// --worker-log, write their panics and races).
func (m *master) checkLogs(allow ...func(test.Line) bool) {
	m.t.Helper()
	test.CheckLogs(m.t, m.log, allow...)
	if m.workerLog != "" {
		test.CheckLogs(m.t, m.workerLog, allow...)
	}
	if m.Proc != nil {
		test.CheckLogs(m.t, m.LogPath, allow...)
	}
}

// readPID reads a pid file.
func readPID(t *testing.T, path string) int {
	t.Helper()
	pid, err := pidIn(path)
	if err != nil {
		t.Fatalf("pid file %s: %v", path, err)
	}
	return pid
}

// pidIn reads the pid in the pid file at path.
func pidIn(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
