package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// writeScript writes an executable shell script.
func writeScript(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}

// repoint makes link point at target, atomically.
func repoint(t *testing.T, link, target string) {
	t.Helper()
	tmp := link + ".tmp"
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// passesPreflight begins a shell script that answers the master's
// pre-flight run ("version") as a good binary does; what follows runs
// when it is started for real.
const passesPreflight = "#!/bin/sh\nif [ \"$1\" = version ]; then echo molt test; exit 0; fi\n"

// rollbackCase is one way an upgrade fails.
type rollbackCase struct {
	name string
	// app: the worker app of both generations is dir/app, a symlink the
	// case re-points (a generation resolves it when it starts).
	app bool
	// breakIt deploys the failure; it runs after the first generation serves.
	breakIt func(t *testing.T, u *master, appDir string)
	// during runs after USR2, before the rollback is awaited.
	during func(t *testing.T, u *master)
	// reason must appear in the rollback's log line.
	reason string
	// extra flags.
	flags []string
}

// TestRollback_EveryFailureBeforeCommit: each way a new version can fail
// before its commit rolls back by itself, under load: zero failed
// requests, the old master still serving and named in molt.pid, no
// .oldbin, the reason in the log, nothing of the new generation left; and
// then a good USR2 upgrades normally.
func TestRollback_EveryFailureBeforeCommit(t *testing.T) {
	t.Parallel()
	cases := []rollbackCase{
		// The first three fail their pre-flight run ("version") as they
		// fail to start: whichever the old master learns first gives the
		// reason (the pre-flight runs alongside the start). The others
		// answer the pre-flight and fail only when started as a master.
		{name: "binary missing", reason: "no such file or directory",
			breakIt: func(t *testing.T, u *master, _ string) {
				if err := os.Remove(u.path); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "binary not executable", reason: "permission denied",
			breakIt: func(t *testing.T, u *master, _ string) { u.deployFile(passesPreflight, 0o644) }},
		{name: "not an ELF for this machine", reason: "exec format error",
			breakIt: func(t *testing.T, u *master, _ string) { u.deployFile("\x7fELF garbage", 0o755) }},
		{name: "crashes at start", reason: "killed by signal: segmentation fault",
			breakIt: func(t *testing.T, u *master, _ string) { u.deployFile(passesPreflight+"kill -SEGV $$\n", 0o755) }},
		{name: "exits 0 at start", reason: "exited with status 0",
			breakIt: func(t *testing.T, u *master, _ string) { u.deployFile("#!/bin/sh\nexit 0\n", 0o755) }},
		{name: "refuses its flags", reason: "refused its flags or configuration (exit status 2)",
			breakIt: func(t *testing.T, u *master, _ string) { u.deployFile(passesPreflight+"exit 2\n", 0o755) }},
		{name: "hangs before serving", reason: "did not serve in time and was killed",
			breakIt: func(t *testing.T, u *master, _ string) {
				u.deployFile(passesPreflight+"exec sleep 3600\n", 0o755)
			}},
		{name: "workers never ready", app: true, reason: "ready within the ready timeout",
			breakIt: func(t *testing.T, u *master, dir string) {
				repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "hang.sh"))
			}},
		{name: "worker exits during probation", app: true, reason: "exited before the commit", flags: []string{"--probation", "3s"},
			breakIt: func(t *testing.T, u *master, dir string) {
				repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "dies.sh"))
			}},
		{name: "new master hangs with its workers", app: true, reason: "did not serve in time and was killed",
			breakIt: func(t *testing.T, u *master, dir string) {
				repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "hang.sh"))
			},
			during: stopNewMasterOnceItsWorkersRun},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			testRollback(t, c)
		})
	}
}

func testRollback(t *testing.T, c rollbackCase) {
	args := append([]string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout", "2s", "--probation", "500ms"}, c.flags...)
	appDir := t.TempDir()
	if c.app {
		writeScript(t, filepath.Join(appDir, "good.sh"), "exec "+bins.fakeapp+" serve")
		writeScript(t, filepath.Join(appDir, "hang.sh"), "exec "+bins.fakeapp+" hang")
		writeScript(t, filepath.Join(appDir, "dies.sh"), "exec "+bins.fakeapp+" serve --exit-after 1s")
		repoint(t, filepath.Join(appDir, "app"), filepath.Join(appDir, "good.sh"))
		args = append(args, "--", filepath.Join(appDir, "app"))
	}
	u := start(t, runOpts{Deploy: byRename, Args: args})
	addr := u.addr()
	u.waitServing()
	workers := u.waitWorkers(2)
	l := startLoad(t, addr)
	c.breakIt(t, u, appDir)
	u.Signal(syscall.SIGUSR2)
	if c.during != nil {
		c.during(t, u)
	}
	lines := test.WaitLog(t, u.log, 60*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	if !strings.Contains(lines[0].Str("reason"), c.reason) {
		t.Errorf("rollback reason %q, want one containing %q", lines[0].Str("reason"), c.reason)
	}
	if got := u.current(); got != u.Pid {
		t.Errorf("molt.pid names %d after the rollback, want the old master %d", got, u.Pid)
	}
	if fileExists(u.pidFile + ".oldbin") {
		t.Error("molt.pid.oldbin left after the rollback")
	}
	if now := u.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("the old generation's workers changed from %v to %v", workers, now)
	}
	checkNewGenerationGone(t, u.log)
	// The old master is fully usable: the next USR2 upgrades.
	if c.app {
		repoint(t, filepath.Join(appDir, "app"), filepath.Join(appDir, "good.sh"))
	}
	u.install(bins.molt2, byRename)
	pid := u.upgrade()
	r := get(t, addr, "/")
	if !c.app && r.Header.Get("X-Molt-Version") != nextVersion() {
		t.Errorf("after the good upgrade: version %q", r.Header.Get("X-Molt-Version"))
	}
	if got := r.Header.Get("X-Molt-Master-Pid"); got != strconv.Itoa(pid) {
		t.Errorf("after the good upgrade: answered by master %s, want %d", got, pid)
	}
	l.stop(t)
	u.stop(test.Event("upgrade.rolled_back"),
		test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"),
		test.Event("upgrade.deadline"), test.Event("upgrade.preflight_failed"),
		test.Event("worker.exited_unexpectedly"), test.Event("worker.not_ready"),
		test.Event("worker.health_failed"), test.Event("upgrade.health_failed"))
}

// checkNewGenerationGone asserts that every worker the failed generation
// (gen 2) started is gone, and so is every master but the old one.
func checkNewGenerationGone(t *testing.T, log string) {
	t.Helper()
	for _, l := range test.Find(log, test.Event("worker.started", "gen", "2")) {
		pid := l.Int("pid")
		test.WaitFor(t, stepTimeout, fmt.Sprintf("worker %d of the failed generation to exit", pid), func() error {
			if test.Alive(pid) {
				return fmt.Errorf("still running")
			}
			return nil
		})
	}
}

// stopNewMasterOnceItsWorkersRun freezes the new master (SIGSTOP) once its
// workers have started, so that it can neither serve nor give up: the old
// master's deadline must kill it and its workers.
func stopNewMasterOnceItsWorkersRun(t *testing.T, u *master) {
	t.Helper()
	l := test.WaitLog(t, u.log, stepTimeout, 2, "the new generation's workers", test.Event("worker.started", "gen", "2"))
	started := test.WaitLog(t, u.log, stepTimeout, 1, "the new master", test.Event("upgrade.new_master"))
	newPid := started[0].Int("new_pid")
	if err := syscall.Kill(newPid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for _, w := range l {
		test.Track(t, w.Int("pid"))
	}
	test.Track(t, newPid)
}
