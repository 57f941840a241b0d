package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestHealthCheck_FailingWorkerRolledBack: a new release whose workers
// say they are ready but fail the active health check is rolled back
// under load (testRollback: zero failed requests, the old generation
// serves on unchanged, nothing of the new one left, and a good release
// then upgrades, its workers checked too), with a reason naming the
// check, the worker and what it got.
func TestHealthCheck_FailingWorkerRolledBack(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		script string   // the new release's app
		flags  []string // the health check
		reason []string // all in the rollback's reason
	}{
		// Only worker 1 is sick: every worker is checked on its own
		// socket, not whichever one the shared listener picks.
		{name: "http", script: `if [ "$MOLT_WORKER" = 1 ]; then exec ` + bins.fakeapp + ` serve --health-status 503; fi; exec ` + bins.fakeapp + " serve",
			flags:  []string{"--health-check", "/healthz"},
			reason: []string{"health check GET /healthz on worker 1 (pid ", "status 503"}},
		{name: "command", script: "exec " + bins.fakeapp + " serve --health-status 503",
			// The command looks at the worker it was given by pid.
			flags:  []string{"--health-check-cmd", `! grep -q health-status /proc/$MOLT_WORKER_PID/cmdline`},
			reason: []string{"health check command on worker ", "exit status 1"}},
		// The worker closes its private socket and answers 200 on sockets
		// it binds by name: the master never looks there.
		{name: "planted_socket", script: "exec " + bins.fakeapp + " serve --health-plant",
			flags:  []string{"--health-check", "/healthz"},
			reason: []string{"health check GET /healthz on worker ", "closed without an answer"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var u *master
			testRollback(t, rollbackCase{app: true, reason: c.reason[0], flags: c.flags,
				breakIt: func(t *testing.T, m *master, dir string) {
					u = m
					writeScript(t, filepath.Join(dir, "sick.sh"), c.script)
					repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "sick.sh"))
				}})
			if t.Failed() {
				return
			}
			rb := test.Find(u.log, test.Event("upgrade.rolled_back"))
			if got := rb[0].Str("cause"); got != "health" {
				t.Errorf("rollback cause %q, want health", got)
			}
			for _, want := range c.reason[1:] {
				if !strings.Contains(rb[0].Str("reason"), want) {
					t.Errorf("rollback reason %q, want one containing %q", rb[0].Str("reason"), want)
				}
			}
			if n := len(test.Find(u.log, test.Event("upgrade.health_failed", "gen", "2"))); n == 0 {
				t.Error("no upgrade.health_failed line from the new generation")
			}
		})
	}
}

// TestHealthCheck_PassesEveryNewWorker: with --health-check, each worker
// counts as ready once its check passed: at the first start, after a
// crash, and in an upgrade, which commits under load with zero failed
// requests. The worker's health socket is no listener: LISTEN_FDS counts
// the listeners alone.
func TestHealthCheck_PassesEveryNewWorker(t *testing.T) {
	t.Parallel()
	reports := t.TempDir()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2",
		"--health-check", "/healthz", "--probation", "1s", "--", bins.fakeapp, "serve", "--report", reports}})
	addr := u.addr()
	u.waitServing()
	passed := test.WaitLog(t, u.log, stepTimeout, 2, "the first workers' checks", test.Event("worker.health_passed", "gen", "1", "check", "GET /healthz"))
	// In the log's order: each worker's check passed, then it was ready.
	at := map[string]int{}
	for i, l := range test.Logs(u.log) {
		if e := l.Str("event"); (e == "worker.health_passed" || e == "worker.ready") && l.Str("gen") == "1" {
			if _, seen := at[e+l.Str("pid")]; !seen {
				at[e+l.Str("pid")] = i
			}
		}
	}
	for _, p := range passed {
		pid := p.Str("pid")
		if r, ok := at["worker.ready"+pid]; !ok || r < at["worker.health_passed"+pid] {
			t.Errorf("worker %s: ready (line %d, found %v) before its check passed (line %d)", pid, r, ok, at["worker.health_passed"+pid])
		}
	}
	// The fds: the listener at 3 and LISTEN_FDS=1; the health socket
	// after the others, under its own variable.
	workers := u.waitWorkers(2)
	b, err := os.ReadFile(filepath.Join(reports, strconv.Itoa(workers[0])+".json"))
	if err != nil {
		t.Fatal(err)
	}
	if s := string(b); !strings.Contains(s, `"LISTEN_FDS=1"`) || !strings.Contains(s, `"MOLT_HEALTH_FD=`) {
		t.Errorf("worker environment: want LISTEN_FDS=1 and MOLT_HEALTH_FD: %s", s)
	}
	// A crash: the replacement is checked before it counts as ready.
	if err := syscall.Kill(workers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	test.WaitLog(t, u.log, stepTimeout, 3, "the replacement's check", test.Event("worker.health_passed", "gen", "1"))
	l := startLoad(t, addr)
	u.install(bins.molt2, byRename)
	u.upgrade()
	test.WaitLog(t, u.log, stepTimeout, 2, "the new generation's checks", test.Event("worker.health_passed", "gen", "2"))
	test.WaitLog(t, u.log, stepTimeout, 1, "the commit", test.Event("upgrade.committed"))
	l.stop(t)
	u.stop(test.Event("worker.exited_unexpectedly"))
}

// TestHealthCheck_CommandRunsAsWorkersUser: --health-check-cmd runs as
// the user workers run as (--user), not as the root master, with the
// worker's pid in its environment.
func TestHealthCheck_CommandRunsAsWorkersUser(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "running workers as nobody needs root")
	marks := test.ShortTempDir(t)
	if err := os.Chmod(marks, 0o777); err != nil {
		t.Fatal(err)
	}
	u := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--user", "nobody",
		"--health-check-cmd", `id -u > ` + marks + `/$MOLT_WORKER_PID`, "--", bins.fakeapp, "serve"}})
	u.waitServing()
	w := u.waitWorkers(1)[0]
	test.WaitLog(t, u.log, stepTimeout, 1, "the check", test.Event("worker.health_passed", "check", "command"))
	b, err := os.ReadFile(filepath.Join(marks, strconv.Itoa(w)))
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/"+strconv.Itoa(w), &st); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != strconv.Itoa(int(st.Uid)) || got == "0" {
		t.Errorf("the check ran as uid %s, want the workers' uid %d", got, st.Uid)
	}
	u.stop()
}
