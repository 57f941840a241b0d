package integration

// The harness: how an integration test drives molt.
//
// Start: start(t, runOpts{...}) runs "molt run --no-keeper" (Keeper: with
// its keeper) with a pid file, a JSON debug log and a workers' log in the
// test's directory, then Args, and returns a *master without waiting:
//
//	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2"}})
//	addr := m.addr()  // waits for the listener.listening line
//	m.waitServing()   // waits for master.serving: every worker ready
//	get(t, addr, "/") // one request, must be answered 200
//
// startSteady(t, n, args...) is that on 127.0.0.1:0 with n workers,
// returned once they are ready.
//
// runOpts also sets the directory, the binary, the environment, a
// launcher (socket activation) and a config file (Config, then
// m.config). m.workers, m.waitWorkers(n) and waitWorkerCount(t, pid, n)
// look at the workers.
//
// Upgrade: start with Deploy (byRename or bySymlink), which installs
// bins.molt at dir/molt and runs that path. m.install(bins.molt2, how)
// deploys a new binary; m.upgrade() sends USR2 to the current master
// (m.current(), the pid file's) and waits for the takeover. After a USR2
// the test sent itself, m.waitNewServing(old) waits for both generations
// serving and m.waitTakeover(old) for the new one alone. Every
// generation still running is stopped at cleanup.
//
// Load: l := startLoad(t, addr) runs the standard load (32 paced clients,
// keep-alive and connection per request); l.stop(t) fails the test on
// any failed request (l.stopWithin, l.stopAttributed: on failures outside
// an outage the test caused). startLoadPart(t, addr, n) is 1/n of it, for
// the standard load spread over n servers.
//
// Logs: wait on event keys, never messages: test.WaitLog(t, m.log,
// timeout, n, what, test.Event("key", "field", "value")); read with
// test.Find. m.checkLogs(allow...) fails on panics, races and unexpected
// error lines in every file molt and its workers wrote to.
//
// Stop: m.stop(allow...) sends QUIT to the current master (the process
// started, or under Deploy the generation the pid file names), waits for
// a clean exit and checks the logs. Also: ctl and statusOf (molt ctl),
// runToEnd (a command until it exits), refused (nothing listens).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"github.com/molt-server/molt/test/load"
)

// Generous bounds: the machines are shared and the binaries race-built.
const (
	startTimeout = 30 * time.Second
	stepTimeout  = 20 * time.Second
	reqTimeout   = 10 * time.Second
)

// runOpts says how start runs molt. The zero value runs bins.molt in a
// fresh directory with the default files and no arguments.
type runOpts struct {
	// Dir is where molt runs and writes its files (default: a new
	// directory, a short one under Deploy). A second master in the same
	// directory shares the pid file but gets logs of its own.
	Dir string
	// Path is the binary (argv[0], what an upgrade re-executes); default
	// bins.molt, or Dir/molt under Deploy.
	Path string
	// Deploy installs bins.molt at Dir/molt that way (byRename,
	// bySymlink) and runs it from there, so that the test can upgrade it.
	Deploy deploy
	// Keeper runs molt with its keeper: the process started (m.Pid) is
	// the keeper, and the pid file names the master.
	Keeper bool
	// Env is added to molt's environment.
	Env []string
	// Launcher is a command line that ends by executing molt's (e.g.
	// systemd-socket-activate -l ADDR); the process started is the
	// launcher's.
	Launcher []string
	// Config, if set, is written to Dir/molt.hcl (master.config) and
	// passed as --config before Args.
	Config string
	// Args follow the default arguments.
	Args []string
}

// deploy is how a test puts a new binary in place (runOpts.Deploy,
// master.install).
type deploy int

const (
	noDeploy  deploy = iota // run Path in place; the test does not upgrade it
	byRename                // a new file renamed over the path
	bySymlink               // the path is a symlink, re-pointed to a new release
)

func (d deploy) String() string {
	return map[deploy]string{noDeploy: "in place", byRename: "new file", bySymlink: "re-pointed symlink"}[d]
}

// master is molt under test (or an embedding program): the process
// started, and under Deploy the generations that follow it.
type master struct {
	*test.Proc
	t       *testing.T
	dir     string
	pidFile string
	log     string
	// workerLog is the workers' --worker-log ("" if the test gave none:
	// then they write to molt's stdout and stderr, the Proc's log).
	workerLog string
	// config is the config file start wrote (runOpts.Config), "" if none.
	config string
	// path is the deployed binary's path under Deploy ("" otherwise).
	path     string
	releases int
}

// start runs molt as o says. It does not wait for anything.
func start(t *testing.T, o runOpts) *master {
	t.Helper()
	dir := o.Dir
	switch {
	case dir != "":
	case o.Deploy != noDeploy:
		dir = test.ShortTempDir(t)
	default:
		dir = t.TempDir()
	}
	// A second master in the same directory (same pid file) gets a log of
	// its own, so that waits never match the first one's lines.
	log, workerLog := filepath.Join(dir, "molt.log"), filepath.Join(dir, "workers.log")
	for i := 2; fileExists(log); i++ {
		log, workerLog = filepath.Join(dir, fmt.Sprintf("molt-%d.log", i)), filepath.Join(dir, fmt.Sprintf("workers-%d.log", i))
	}
	m := &master{t: t, dir: dir, pidFile: filepath.Join(dir, "molt.pid"), log: log, workerLog: workerLog}
	path := o.Path
	if o.Deploy != noDeploy {
		m.path = filepath.Join(dir, "molt")
		m.install(bins.molt, o.Deploy)
		path = m.path
	}
	if path == "" {
		path = bins.molt
	}
	full := []string{"run", "--no-keeper"}
	if o.Keeper {
		full = []string{"run"}
	}
	full = append(full, "--pid-file", m.pidFile, "--log-file", m.log, "--worker-log", m.workerLog, "--log-json", "--log-level", "debug")
	if o.Config != "" {
		m.config = filepath.Join(dir, "molt.hcl")
		writeConfig(t, m.config, o.Config)
		full = append(full, "--config", m.config)
	}
	full = append(full, o.Args...)
	if len(o.Launcher) > 0 {
		full = append(append(append([]string{}, o.Launcher[1:]...), path), full...)
		path = o.Launcher[0]
	}
	m.Proc = test.Start(t, test.Opts{Path: path, Args: full, Env: o.Env, Dir: dir, Log: strings.TrimSuffix(log, ".log") + ".out"})
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
	if o.Deploy != noDeploy {
		t.Cleanup(m.stopGenerations)
	}
	return m
}

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

// startSteady starts molt (the demo) on 127.0.0.1 with n workers and
// args, and returns it once its n workers are ready, with its address and
// the workers.
func startSteady(t *testing.T, n int, args ...string) (*master, string, []int) {
	t.Helper()
	m := start(t, runOpts{Args: append([]string{"--listen", "127.0.0.1:0", "--workers", strconv.Itoa(n)}, args...)})
	addr := m.addr()
	m.waitServing()
	return m, addr, m.waitWorkers(n)
}

// workers returns the master's live worker pids, sorted, and registers
// each for the leak check at cleanup.
func (m *master) workers() []int {
	m.t.Helper()
	pids := workersOf(m.Pid)
	for _, p := range pids {
		test.Track(m.t, p)
	}
	sort.Ints(pids)
	return pids
}

// workersOf returns the live children of master that are not other
// masters (an old master's children include the new master).
func workersOf(master int, notMasters ...int) []int {
	var out []int
	for _, p := range test.Children(master) {
		if test.Alive(p) && !slices.Contains(notMasters, p) {
			out = append(out, p)
		}
	}
	return out
}

// waitWorkerCount waits until master (any generation, not only the
// process started) has n live workers, children other than notMasters.
func waitWorkerCount(t *testing.T, master, n int, notMasters ...int) {
	t.Helper()
	test.WaitFor(t, stepTimeout, fmt.Sprintf("%d workers of %d", n, master), func() error {
		if w := workersOf(master, notMasters...); len(w) != n {
			return fmt.Errorf("%d workers: %v", len(w), w)
		}
		return nil
	})
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

// writeConfig writes an HCL config file atomically (a reload must never
// read half a file).
func writeConfig(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
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

// install puts bin at m.path, atomically, the way a deploy does: a new
// file renamed over the path, or a new release directory and the path
// (a symlink) re-pointed to it, also by rename. Never cp onto the path:
// that fails with ETXTBSY on a running binary (golang/go#22315).
func (m *master) install(bin string, how deploy) {
	t := m.t
	t.Helper()
	target := m.path
	if how == bySymlink {
		m.releases++
		rel := filepath.Join(m.dir, "releases", strconv.Itoa(m.releases))
		if err := os.MkdirAll(rel, 0o755); err != nil {
			t.Fatal(err)
		}
		target = filepath.Join(rel, "molt")
	}
	tmp := target + ".tmp"
	if err := os.Link(bin, tmp); err != nil {
		t.Fatalf("install %s: %v", bin, err)
	}
	if how == bySymlink {
		if err := os.Rename(tmp, target); err != nil {
			t.Fatal(err)
		}
		tmp = m.path + ".tmp"
		if err := os.Symlink(target, tmp); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(tmp, m.path); err != nil {
		t.Fatal(err)
	}
	// A rename between two links of one file (the same binary deployed
	// again) does nothing at all: the temporary name stays.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
}

// deployFile puts an arbitrary file (a broken "new version") at m.path.
func (m *master) deployFile(content string, mode os.FileMode) {
	t := m.t
	t.Helper()
	tmp := m.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(tmp, mode)
	if err := os.Rename(tmp, m.path); err != nil {
		t.Fatal(err)
	}
}

// current returns the pid in the pid file: the current master.
func (m *master) current() int {
	m.t.Helper()
	return readPID(m.t, m.pidFile)
}

// upgrade sends USR2 to the current master and waits until a new master
// has taken over: the pid file names it, the old master is gone, and no
// .oldbin is left. It returns the new pid.
func (m *master) upgrade() int {
	m.t.Helper()
	old := m.current()
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		m.t.Fatal(err)
	}
	return m.waitTakeover(old)
}

// waitTakeover waits until a master other than old owns the pid file,
// old is gone and no .oldbin is left; it returns the new master.
func (m *master) waitTakeover(old int) int {
	t := m.t
	t.Helper()
	var pid int
	test.WaitFor(t, 60*time.Second, fmt.Sprintf("a new master to take over from %d", old), func() error {
		b, err := os.ReadFile(m.pidFile)
		if err != nil {
			return err
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == old {
			return fmt.Errorf("pid file names %q", b)
		}
		if test.Alive(old) {
			return fmt.Errorf("old master %d still running", old)
		}
		if fileExists(m.pidFile + ".oldbin") {
			return fmt.Errorf(".oldbin still there")
		}
		return nil
	})
	test.Track(t, pid)
	return pid
}

// waitNewServing waits until a new master serves alongside old: molt.pid
// names it, molt.pid.oldbin names old. It returns the new master's pid.
func (m *master) waitNewServing(old int) int {
	t := m.t
	t.Helper()
	var pid int
	test.WaitFor(t, 60*time.Second, "the new generation serving", func() error {
		p, err := pidIn(m.pidFile)
		if err != nil || p == old {
			return fmt.Errorf("molt.pid: %d %v", p, err)
		}
		o, err := pidIn(m.pidFile + ".oldbin")
		if err != nil || o != old {
			return fmt.Errorf("molt.pid.oldbin: %d %v", o, err)
		}
		pid = p
		return nil
	})
	test.Track(t, pid)
	return pid
}

// stop sends QUIT to the current master and waits for a clean exit, then
// checks the logs. The current master is the process started or, under
// Deploy, the one the pid file names (not the test's own child once the
// first master has exited).
func (m *master) stop(allow ...func(test.Line) bool) {
	m.t.Helper()
	if m.path != "" {
		if pid := m.current(); pid != m.Pid {
			if sig := test.StopPID(pid, 20*time.Second); sig != syscall.SIGQUIT {
				m.t.Errorf("master %d needed %v to stop", pid, sig)
			}
			m.checkLogs(allow...)
			return
		}
	}
	m.Signal(quit)
	if code := m.Wait(stepTimeout); code != 0 {
		m.t.Errorf("master exited %d after QUIT, want 0", code)
	}
	m.checkLogs(allow...)
}

// stopGenerations stops every master named by the pid files other than
// the first one (which test.Start stops), at cleanup.
func (m *master) stopGenerations() {
	for _, f := range []string{m.pidFile, m.pidFile + ".oldbin"} {
		pid, err := pidIn(f)
		if err != nil || pid == m.Pid {
			continue
		}
		if sig := test.StopPID(pid, 20*time.Second); sig != 0 && sig != syscall.SIGQUIT {
			m.t.Errorf("master %d needed %v to stop", pid, sig)
		}
	}
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

// loadPair runs the integration tests' standard load: keep-alive and
// connection-per-request clients, 32 in all, paced (STYLE.md §5).
type loadPair struct {
	ka, pc *load.Run
	cancel context.CancelFunc
}

// startLoad starts the load and returns once both kinds of client have
// been answered, so that what the test does next happens under load.
func startLoad(t *testing.T, addr string) *loadPair {
	t.Helper()
	return startLoadPart(t, addr, 1)
}

// startLoadPart is startLoad with 1/parts of the standard load's clients
// and rate, for the standard load spread over parts servers.
func startLoadPart(t *testing.T, addr string, parts int) *loadPair {
	t.Helper()
	clients := max(16/parts, 1)
	rate := 160 / float64(parts)
	ctx, cancel := context.WithCancel(context.Background())
	network := "tcp"
	if len(addr) > 5 && addr[:5] == "unix:" {
		network, addr = "unix", addr[5:]
	}
	l := &loadPair{
		ka:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: clients, Rate: rate, KeepAlive: true}),
		pc:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: clients, Rate: rate}),
		cancel: cancel,
	}
	l.more(t, 2*clients)
	return l
}

// more waits until each kind of client has had n more answers.
func (l *loadPair) more(t *testing.T, n int) {
	t.Helper()
	ka, pc := l.ka.Snapshot().OK, l.pc.Snapshot().OK
	test.WaitFor(t, stepTimeout, fmt.Sprintf("%d more answers to the load", n), func() error {
		a, b := l.ka.Snapshot(), l.pc.Snapshot()
		if a.OK < ka+n || b.OK < pc+n {
			return fmt.Errorf("keep-alive %d, per-connection %d answers", a.OK-ka, b.OK-pc)
		}
		return nil
	})
}

// stop lets the load run on for a moment (so that it spans whatever the
// test just did), ends it and fails the test on any failed request; it
// returns how many answers each master gave.
func (l *loadPair) stop(t *testing.T) (masters map[int]int) {
	t.Helper()
	defer l.cancel()
	l.more(t, 32)
	masters = map[int]int{}
	for name, r := range map[string]*load.Run{"keep-alive": l.ka, "connection per request": l.pc} {
		res := r.Stop()
		t.Logf("%s load: %v", name, res)
		if res.Failed() != 0 {
			t.Errorf("%s load: %d failed requests: %v", name, res.Failed(), res.Samples)
		}
		if res.OK == 0 {
			t.Errorf("%s load: no request answered", name)
		}
		for m, n := range res.ByMaster {
			masters[m] += n
		}
	}
	return masters
}

// waitGone waits until every process in pids has exited; what names
// them in the failure message.
func waitGone(t *testing.T, what string, pids []int) {
	t.Helper()
	test.WaitFor(t, stepTimeout, what, func() error {
		for _, pid := range pids {
			if test.Alive(pid) {
				return fmt.Errorf("pid %d still alive", pid)
			}
		}
		return nil
	})
}
