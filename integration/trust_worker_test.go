package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// Issue 11, what a worker gets: workers are untrusted. They get a clean
// environment for their user, no_new_privs, and output files of their
// own; never molt's log file.

// secretEnv is a variable of molt's environment no worker may see.
const secretEnv = "MOLT_TEST_SECRET_TOKEN=hunter2"

// requireNobody skips unless the test runs as root and user nobody exists.
func requireNobody(t *testing.T) *user.User {
	t.Helper()
	test.Require(t, "root", os.Geteuid() == 0, "running workers as nobody needs root")
	nobody, err := user.Lookup("nobody")
	test.Require(t, "user nobody", err == nil, fmt.Sprint(err))
	return nobody
}

// noNewPrivs returns the NoNewPrivs value of every thread of pid, by tid.
func noNewPrivs(t *testing.T, pid int) map[string]string {
	t.Helper()
	out := map[string]string{}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "NoNewPrivs:"); ok {
				out[filepath.Base(filepath.Dir(p))] = strings.TrimSpace(v)
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("no thread of pid %d shows NoNewPrivs", pid)
	}
	return out
}

// checkNoNewPrivs asserts that every thread of pid has NoNewPrivs want.
func checkNoNewPrivs(t *testing.T, pid int, want string) {
	t.Helper()
	for tid, v := range noNewPrivs(t, pid) {
		if v != want {
			t.Errorf("worker %d thread %s: NoNewPrivs %s, want %s", pid, tid, v, want)
		}
	}
}

// TestTrustWorker_NobodyGetsACleanEnvironmentAndCannotTouchMoltsLog: molt
// under its keeper (so MOLT_KEEPER_PID is in the master's environment),
// with a secret, HOME=/root and Go runtime settings in its environment,
// runs workers as nobody that attack every file they hold or can open for
// writing (a forged molt line, then ftruncate), at start and again after a
// reload, under load. Each worker's environment has nobody's HOME, USER,
// LOGNAME and SHELL, the kept variables (GORACE, GOMAXPROCS, TZ, LC_ALL,
// PATH), the variable passed by name with --env NAME and the --env value,
// and neither the secret, nor MOLT_KEEPER_PID, nor HOME=/root; every
// thread has NoNewPrivs 1. The attacks reach only the workers' own
// --worker-log: molt's log keeps every byte it had and gets no worker
// text; no request fails.
func TestTrustWorker_NobodyGetsACleanEnvironmentAndCannotTouchMoltsLog(t *testing.T) {
	t.Parallel()
	nobody := requireNobody(t)
	reports := test.ShortTempDir(t)
	os.Chmod(reports, 0o777)
	env := []string{secretEnv, "HOME=/root", "USER=root", "LOGNAME=root", "MOLT_TEST_BY_NAME=passed",
		"GOMAXPROCS=3", "TZ=UTC", "LC_ALL=C"}
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Env: env,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody", "--env", "MOLT_TEST_BY_NAME", "--env", "APP_ENV=prod", "--", bins.fakeapp, "serve", "--report", reports, "--tamper"}})
	addr := u.addr()
	u.waitServing()
	if u.workerLog == "" {
		t.Fatal("the harness gave no --worker-log")
	}
	l := startLoad(t, addr)
	first := waitReports(t, reports, 2)
	// What molt's log holds now must still be there, byte for byte, after
	// more workers attacked it.
	before, err := os.ReadFile(u.log)
	if err != nil {
		t.Fatal(err)
	}
	if code, out := ctl(t, u.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	reps := waitReports(t, reports, 4)
	l.more(t, 32)

	for pid, r := range reps {
		if _, ok := first[pid]; !ok {
			test.Track(t, pid)
		}
		want := map[string]string{
			"HOME": nobody.HomeDir, "USER": "nobody", "LOGNAME": "nobody",
			"MOLT_TEST_BY_NAME": "passed", "APP_ENV": "prod",
			"GORACE": "halt_on_error=1 atexit_sleep_ms=0", "GOMAXPROCS": "3", "TZ": "UTC", "LC_ALL": "C",
			"LISTEN_PID": strconv.Itoa(pid), "LISTEN_FDS": "1",
		}
		for k, v := range want {
			if got, _ := r.env(k); got != v {
				t.Errorf("worker %d: %s=%q, want %q", pid, k, got, v)
			}
		}
		for _, k := range []string{"SHELL", "PATH"} {
			if v, ok := r.env(k); !ok || v == "" {
				t.Errorf("worker %d: no %s", pid, k)
			}
		}
		secret, _, _ := strings.Cut(secretEnv, "=")
		for _, k := range []string{secret, "MOLT_KEEPER_PID", "MOLT_ROLE", "MOLT_NEW_PRIVS"} {
			if v, ok := r.env(k); ok {
				t.Errorf("worker %d sees %s=%s", pid, k, v)
			}
		}
		if r.NoNewPrivs != "1" {
			t.Errorf("worker %d: NoNewPrivs %q, want 1", pid, r.NoNewPrivs)
		}
		// The attack was made, and reached the worker log only.
		hitOwn := false
		for _, what := range r.Tampered {
			if strings.Contains(what, u.log) && strings.Contains(what, " ok") {
				t.Errorf("worker %d reached molt's log: %s", pid, what)
			}
			if strings.HasPrefix(what, "fd 1 "+u.workerLog+":") && strings.Contains(what, "truncate ok") {
				hitOwn = true
			}
		}
		if !hitOwn {
			t.Errorf("worker %d did not truncate its own stdout, the worker log %s: %q", pid, u.workerLog, r.Tampered)
		}
	}
	for pid := range reps {
		if test.Alive(pid) {
			checkNoNewPrivs(t, pid, "1")
		}
	}

	after, err := os.ReadFile(u.log)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(after, before) {
		t.Errorf("molt's log was rewritten: %d bytes before the reload, now %d, and not the same start", len(before), len(after))
	}
	for _, bad := range []string{"fakeapp.forged", "by a worker"} {
		if bytes.Contains(after, []byte(bad)) {
			t.Errorf("molt's log has the workers' %q", bad)
		}
	}
	for i, line := range strings.Split(strings.TrimSpace(string(after)), "\n") {
		if !strings.HasPrefix(line, "{") {
			t.Errorf("molt's log line %d is not molt's: %q", i+1, line)
		}
	}
	l.stop(t)
	if code := u.stopKeeper(quit); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	u.checkLogs()
}

// TestTrustWorker_SameUserEnvironmentAndNoNewPrivs: without --user the
// workers get the master's own HOME, USER, LOGNAME and SHELL, the kept
// variables and no secret; both kinds of worker (an exec'd COMMAND and
// molt's own Go demo, self-executed) run with NoNewPrivs 1 on every
// thread; with --allow-new-privs (flag or config key) they run with 0.
func TestTrustWorker_SameUserEnvironmentAndNoNewPrivs(t *testing.T) {
	t.Parallel()
	ident := []string{"HOME=/home/molt-test", "USER=molt-test", "LOGNAME=molt-test", "SHELL=/bin/molt-test-sh"}
	for _, tc := range []struct {
		name string
		args []string
		nnp  string
	}{
		{"default", nil, "1"},
		{"allow-new-privs", []string{"--allow-new-privs"}, "0"},
		{"allow_new_privs in the config", []string{"--config", "CONF"}, "0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			reports := filepath.Join(dir, "reports")
			os.Mkdir(reports, 0o755)
			conf := filepath.Join(dir, "molt.hcl")
			writeConfig(t, conf, "allow_new_privs = true\n")
			args := []string{"--listen", "127.0.0.1:0", "--workers", "1"}
			for _, a := range tc.args {
				args = append(args, strings.ReplaceAll(a, "CONF", conf))
			}
			// An exec'd app.
			m := start(t, runOpts{Dir: dir, Env: append([]string{secretEnv}, ident...),
				Args: append(args, "--", bins.fakeapp, "serve", "--report", reports)})
			addr := m.addr()
			m.waitServing()
			w := m.waitWorkers(1)[0]
			r := waitReports(t, reports, 1)[w]
			for _, kv := range ident {
				k, v, _ := strings.Cut(kv, "=")
				if got, _ := r.env(k); got != v {
					t.Errorf("worker %d: %s=%q, want the master's %q", w, k, got, v)
				}
			}
			secret, _, _ := strings.Cut(secretEnv, "=")
			if _, ok := r.env(secret); ok {
				t.Errorf("worker %d sees %s", w, secret)
			}
			if r.NoNewPrivs != tc.nnp {
				t.Errorf("worker %d: NoNewPrivs %q, want %s", w, r.NoNewPrivs, tc.nnp)
			}
			checkNoNewPrivs(t, w, tc.nnp)
			get(t, addr, "/")
			m.stop()

			// molt's own Go app, self-executed (RunChild's worker role).
			d := start(t, runOpts{Dir: dir, Env: []string{secretEnv}, Args: args})
			addr = d.addr()
			d.waitServing()
			w = d.waitWorkers(1)[0]
			get(t, addr, "/")
			checkNoNewPrivs(t, w, tc.nnp)
			// The workers have the flag from the master's spawner thread,
			// the only thread of the master that has it: the master's own
			// exec (an upgrade) runs from another one.
			flagged := 0
			for tid, v := range noNewPrivs(t, d.Pid) {
				if v == "1" {
					flagged++
					if tid == fmt.Sprint(d.Pid) {
						t.Errorf("the master's main thread has NoNewPrivs 1")
					}
				}
			}
			if want := map[string]int{"1": 1, "0": 0}[tc.nnp]; flagged != want {
				t.Errorf("%d threads of the master have NoNewPrivs 1, want %d", flagged, want)
			}
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", w)); err != nil || bytes.Contains(b, []byte(secret)) {
				t.Errorf("the Go worker's environment (%v) has %s", err, secret)
			}
			d.stop()
		})
	}
}

// TestTrustWorker_GroupWithoutUserIsRefused: --group alone would leave the
// workers root with every capability: as root, molt run and molt check
// refuse it (exit 2, a message that says so) and start nothing; a reload
// whose config file adds it is refused, and the running workers serve on
// under load, unchanged.
func TestTrustWorker_GroupWithoutUserIsRefused(t *testing.T) {
	t.Parallel()
	nobody := requireNobody(t)
	dir := t.TempDir()
	want := "--group " + nobody.Gid + " without --user: the workers would still run as root"
	for _, cmd := range []string{"run", "check"} {
		code, out := runToEnd(t, dir, bins.molt, cmd, "--no-keeper", "--listen", "127.0.0.1:0", "--group", nobody.Gid,
			"--pid-file", filepath.Join(dir, "molt.pid"))
		if code != 2 || !strings.Contains(out, want) {
			t.Errorf("molt %s --group alone: exit %d, want 2 and %q:\n%s", cmd, code, want, out)
		}
	}
	if fileExists(filepath.Join(dir, "molt.pid")) {
		t.Error("a refused master wrote a pid file")
	}

	m := start(t, runOpts{Dir: dir, Config: "listen = [\"127.0.0.1:0\"]\nworkers = 2\n"})
	addr := m.addr()
	m.waitServing()
	before := m.waitWorkers(2)
	l := startLoad(t, addr)
	writeConfig(t, m.config, fmt.Sprintf("listen = [\"127.0.0.1:0\"]\nworkers = 2\ngroup = %q\n", nobody.Gid))
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code == 0 || !strings.Contains(out, want) {
		t.Errorf("reload with group alone: exit %d, want an error with %q:\n%s", code, want, out)
	}
	if now := m.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(before) {
		t.Errorf("workers changed from %v to %v after a refused reload", before, now)
	}
	for _, w := range before {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w)); err != nil || !strings.Contains(string(b), "\nGid:\t0\t") {
			t.Errorf("worker %d's group changed (%v)", w, err)
		}
	}
	l.stop(t)
	m.stop(test.Event("reload.refused"))
}

// TestTrustWorker_USR1ReopensTheWorkerLog: after a rotation (rename) of
// the --worker-log, USR1 makes the master open a new file at its path;
// a worker started then gets the new file as stdout and stderr, the
// running ones keep the rotated one, and molt's log is neither.
func TestTrustWorker_USR1ReopensTheWorkerLog(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	m := start(t, runOpts{Dir: dir, Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--", bins.fakeapp, "serve"}})
	addr := m.addr()
	m.waitServing()
	old := m.waitWorkers(1)[0]
	rotated := m.workerLog + ".1"
	if err := os.Rename(m.workerLog, rotated); err != nil {
		t.Fatal(err)
	}
	m.Signal(syscall.SIGUSR1)
	test.WaitFor(t, stepTimeout, "a new worker log at "+m.workerLog, func() error {
		if !fileExists(m.workerLog) {
			return fmt.Errorf("none yet")
		}
		return nil
	})
	m.Signal(syscall.SIGTTIN)
	var nw int
	for _, p := range m.waitWorkers(2) {
		if p != old {
			nw = p
		}
	}
	for pid, want := range map[int]string{old: rotated, nw: m.workerLog} {
		for _, fd := range []int{1, 2} {
			if got, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd)); got != want {
				t.Errorf("worker %d: fd %d is %s (%v), want %s", pid, fd, got, err, want)
			}
		}
	}
	get(t, addr, "/")
	m.stop()
}
