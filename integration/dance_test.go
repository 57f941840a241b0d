package integration

import (
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// servedOnlyBy asserts that n fresh connections are all answered by
// master pid.
func servedOnlyBy(t *testing.T, addr string, pid, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if r := get(t, addr, "/"); r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(pid) {
			t.Fatalf("answered by master %s, want only %d", r.Header.Get("X-Molt-Master-Pid"), pid)
		}
	}
}

// TestDance_ManualCommit is nginx's flow: USR2, both generations serve;
// WINCH to the old master stops its workers (standby); QUIT to the old
// master commits. The pid files are right at every step, and no request
// fails.
func TestDance_ManualCommit(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	old := u.Pid
	l := startLoad(t, addr)
	u.install(bins.molt2, byRename)
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	test.WaitLog(t, u.log, stepTimeout, 1, "probation over", test.Event("upgrade.probation_over", "manual", "true"))
	if len(workersOf(old, nw)) != 2 {
		t.Fatalf("old master's workers: %v, want 2 still serving before WINCH", workersOf(old, nw))
	}
	u.Signal(syscall.SIGWINCH)
	waitWorkerCount(t, old, 0, nw)
	servedOnlyBy(t, addr, nw, 20)
	if p, _ := pidIn(u.pidFile + ".oldbin"); p != old {
		t.Errorf("in standby, molt.pid.oldbin names %d, want %d", p, old)
	}
	u.Signal(quit)
	if got := u.waitTakeover(old); got != nw {
		t.Fatalf("took over: %d, want %d", got, nw)
	}
	l.stop(t)
	u.stop()
}

// TestDance_ManualRollback: USR2, WINCH (old), HUP (old: its workers come
// back), QUIT (new: it rolls back). molt.pid names the old master again,
// nothing of the new generation is left, and no request fails.
func TestDance_ManualRollback(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	old := u.Pid
	l := startLoad(t, addr)
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	u.Signal(syscall.SIGWINCH)
	waitWorkerCount(t, old, 0, nw)
	u.Signal(syscall.SIGHUP)
	waitWorkerCount(t, old, 2, nw)
	test.WaitLog(t, u.log, stepTimeout, 1, "the old generation serving again", test.Event("master.serving", "gen", "1"))
	if err := syscall.Kill(nw, quit); err != nil {
		t.Fatal(err)
	}
	test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))
	test.WaitFor(t, stepTimeout, "the new master to exit", func() error {
		if test.Alive(nw) {
			return fmt.Errorf("still running")
		}
		return nil
	})
	if p, _ := pidIn(u.pidFile); p != old || fileExists(u.pidFile+".oldbin") {
		t.Errorf("after the rollback molt.pid names %d (want %d), .oldbin exists: %v", p, old, fileExists(u.pidFile+".oldbin"))
	}
	servedOnlyBy(t, addr, old, 20)
	l.stop(t)
	u.stop(rollbackLines...)
}

// rollbackLines are the error lines a rollback logs by design.
var rollbackLines = []func(test.Line) bool{
	test.Event("upgrade.rolled_back"),
	test.Event("upgrade.new_gave_up"),
	test.Event("upgrade.giving_up"),
}

// TestDance_RefusalsDuringAnUpgrade: a second USR2 to the old master, a
// USR2 to the new master before its commit, and TTIN to the new master
// are refused with a log line; the upgrade then commits on QUIT.
func TestDance_RefusalsDuringAnUpgrade(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	u.addr()
	u.waitServing()
	old := u.Pid
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	u.Signal(syscall.SIGUSR2)
	test.WaitLog(t, u.log, stepTimeout, 1, "the second USR2 refused", test.Event("upgrade.usr2_refused", "cause", "in_flight"))
	syscall.Kill(nw, syscall.SIGUSR2)
	test.WaitLog(t, u.log, stepTimeout, 1, "USR2 to the new master refused", test.Event("upgrade.usr2_refused", "cause", "uncommitted"))
	syscall.Kill(nw, syscall.SIGTTIN)
	test.WaitLog(t, u.log, stepTimeout, 1, "TTIN to the new master refused", test.Event("pool.scale_refused", "reason", "upgrade", "delta", "1"))
	u.Signal(quit)
	u.waitTakeover(old)
	u.stop()
}

// TestDance_TTINToTheOldMasterReachesTheNewGeneration: the new generation
// runs as many workers as the old one runs, TTIN included.
func TestDance_TTINToTheOldMasterReachesTheNewGeneration(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--probation", "300ms"}})
	u.addr()
	u.waitServing()
	u.Signal(syscall.SIGTTIN)
	u.waitWorkers(2)
	nw := u.upgrade()
	waitWorkerCount(t, nw, 2)
	u.stop()
}

// TestDance_QuitToTheNewMasterRollsBack: QUIT to a new master during its
// probation aborts the upgrade; the old generation serves throughout.
func TestDance_QuitToTheNewMasterRollsBack(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "60s"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(u.Pid)
	syscall.Kill(nw, quit)
	lines := test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))
	if !strings.Contains(lines[0].Str("reason"), "QUIT to the new master") {
		t.Errorf("rollback reason %q", lines[0].Str("reason"))
	}
	test.WaitFor(t, stepTimeout, "the new master to exit", func() error {
		if test.Alive(nw) {
			return fmt.Errorf("still running")
		}
		return nil
	})
	if p, _ := pidIn(u.pidFile); p != u.Pid {
		t.Errorf("molt.pid names %d, want %d", p, u.Pid)
	}
	l.stop(t)
	u.stop(rollbackLines...)
}

// TestDance_USR2AndQUITBackToBack: "kill -USR2; kill -QUIT" to the old
// master (a total outage with nginx) upgrades and then retires the old
// generation, in either order, whether the signals arrive as one batch
// or as two deliveries.
func TestDance_USR2AndQUITBackToBack(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		send func(t *testing.T, u *master)
	}{
		{"USR2_then_QUIT_together", func(t *testing.T, u *master) {
			syscall.Kill(u.Pid, syscall.SIGUSR2)
			syscall.Kill(u.Pid, quit)
		}},
		{"QUIT_then_USR2_together", func(t *testing.T, u *master) {
			syscall.Kill(u.Pid, quit)
			syscall.Kill(u.Pid, syscall.SIGUSR2)
		}},
		{"QUIT_then_USR2_apart", func(t *testing.T, u *master) {
			syscall.Kill(u.Pid, quit)
			test.WaitLog(t, u.log, stepTimeout, 1, "the QUIT settle window", test.Event("upgrade.quit_settling"))
			syscall.Kill(u.Pid, syscall.SIGUSR2)
		}},
		{"USR2_then_QUIT_apart", func(t *testing.T, u *master) {
			syscall.Kill(u.Pid, syscall.SIGUSR2)
			test.WaitLog(t, u.log, stepTimeout, 1, "the upgrade to start", test.Event("upgrade.started"))
			syscall.Kill(u.Pid, quit)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			u := start(t, runOpts{Deploy: byRename,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "30s"}})
			addr := u.addr()
			u.waitServing()
			l := startLoad(t, addr)
			c.send(t, u)
			// The probation is long: only the pending QUIT can make the
			// new generation commit in time.
			nw := u.waitTakeover(u.Pid)
			servedOnlyBy(t, addr, nw, 10)
			l.stop(t)
			u.stop()
		})
	}
}

// TestDance_TERMDuringAnUpgradeStopsBothGenerations, sent to either.
func TestDance_TERMDuringAnUpgradeStopsBothGenerations(t *testing.T) {
	t.Parallel()
	for _, to := range []string{"old", "new"} {
		t.Run("to_"+to, func(t *testing.T) {
			t.Parallel()
			u := start(t, runOpts{Deploy: byRename,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "60s"}})
			u.addr()
			u.waitServing()
			old := u.Pid
			u.Signal(syscall.SIGUSR2)
			nw := u.waitNewServing(old)
			for _, w := range append(workersOf(old, nw), workersOf(nw)...) {
				test.Track(t, w)
			}
			target := old
			if to == "new" {
				target = nw
			}
			syscall.Kill(target, syscall.SIGTERM)
			if code := u.Wait(stepTimeout); code != 0 {
				t.Errorf("old master exit %d", code)
			}
			test.WaitFor(t, stepTimeout, "the new master to exit", func() error {
				if test.Alive(nw) {
					return fmt.Errorf("still running")
				}
				return nil
			})
			u.checkLogs()
		})
	}
}

// TestDance_QUITWaitingForAFailedUpgradeIsCancelled: USR2 and QUIT with a
// broken new binary: the upgrade fails, the old master says so loudly and
// keeps serving; it does not drain into an outage.
func TestDance_QUITWaitingForAFailedUpgradeIsCancelled(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	u.deployFile(passesPreflight+"exit 1\n", 0o755)
	syscall.Kill(u.Pid, syscall.SIGUSR2)
	syscall.Kill(u.Pid, quit)
	test.WaitLog(t, u.log, stepTimeout, 1, "the cancelled QUIT", test.Event("upgrade.quit_cancelled"))
	// Observation window: a QUIT that was not cancelled would drain now.
	time.Sleep(2 * time.Second)
	if len(test.Find(u.log, test.Event("master.shutdown", "mode", "graceful"))) != 0 || !test.Alive(u.Pid) {
		t.Fatal("the old master drained after its upgrade failed")
	}
	servedOnlyBy(t, addr, u.Pid, 10)
	l.stop(t)
	u.stop(append(rollbackLines, test.Event("upgrade.quit_cancelled"))...)
}

// TestDance_OldMasterKilledDuringProbation: the old master dies (SIGKILL)
// while the new generation is in probation: the new master commits by
// itself, cleans up the dead one's .oldbin, its old workers drain away,
// no request fails, and the new master can be upgraded in turn.
func TestDance_OldMasterKilledDuringProbation(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "60s", "--drain-timeout", "5s"}})
	addr := u.addr()
	u.waitServing()
	old := u.Pid
	l := startLoad(t, addr)
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	oldWorkers := workersOf(old, nw)
	u.Signal(syscall.SIGKILL)
	u.Wait(stepTimeout)
	test.WaitLog(t, u.log, stepTimeout, 1, "the new master to commit alone", test.Event("upgrade.parent_gone", "then", "commit"))
	test.WaitFor(t, stepTimeout, "the dead master's workers to drain away and its .oldbin to go", func() error {
		for _, w := range oldWorkers {
			if test.Alive(w) {
				return fmt.Errorf("old worker %d alive", w)
			}
		}
		if fileExists(u.pidFile + ".oldbin") {
			return fmt.Errorf(".oldbin still there")
		}
		return nil
	})
	if p, _ := pidIn(u.pidFile); p != nw {
		t.Errorf("molt.pid names %d, want %d", p, nw)
	}
	l.stop(t)
	// It is primary: it can be upgraded (QUIT with the USR2 skips the
	// long probation).
	syscall.Kill(nw, syscall.SIGUSR2)
	syscall.Kill(nw, quit)
	u.waitTakeover(nw)
	u.stop()
}

// TestDance_RollbackFromStandbyOpensNoGap: the old master is in standby
// (WINCH) when the new generation gives up (QUIT to it): the old master
// respawns its workers by itself, and the new generation keeps serving
// until they are ready. No request fails.
func TestDance_RollbackFromStandbyOpensNoGap(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	old := u.Pid
	l := startLoad(t, addr)
	u.Signal(syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	u.Signal(syscall.SIGWINCH)
	waitWorkerCount(t, old, 0, nw)
	l.more(t, 32) // the new generation alone serves the load
	syscall.Kill(nw, quit)
	test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))
	respawned := test.Find(u.log, test.Event("upgrade.standby_ended"))
	if len(respawned) != 1 {
		t.Fatalf("the old master did not respawn its workers by itself: %v", respawned)
	}
	test.WaitFor(t, stepTimeout, "the new master to exit", func() error {
		if test.Alive(nw) {
			return fmt.Errorf("still running")
		}
		return nil
	})
	// The new generation stopped only once the old one served again.
	var servingAgain, released = -1, -1
	for i, line := range test.Logs(u.log) {
		switch {
		case test.Event("master.serving", "gen", "1")(line):
			servingAgain = i // the last one: after the respawn
		case test.Event("upgrade.released")(line):
			released = i
		}
	}
	if released < 0 || servingAgain < 0 || released < servingAgain {
		t.Errorf("the new generation stopped (line %d) before the old one served again (line %d)", released, servingAgain)
	}
	servedOnlyBy(t, addr, old, 10)
	l.stop(t)
	u.stop(rollbackLines...)
}

// TestDance_StopAllEndsEveryGeneration: {"cmd":"stop","all":true} (molt
// ctl stop --all) during an upgrade's probation, to either master, ends
// both generations gracefully: no commit, the new master aborts (exit 12,
// reported to the old one) and the old one drains and exits 0.
func TestDance_StopAllEndsEveryGeneration(t *testing.T) {
	t.Parallel()
	for _, to := range []string{"new", "old"} {
		t.Run("to the "+to+" master", func(t *testing.T) {
			t.Parallel()
			u := start(t, runOpts{Deploy: byRename,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "60s"}})
			u.addr()
			u.waitServing()
			u.Signal(syscall.SIGUSR2)
			nw := u.waitNewServing(u.Pid)
			args := []string{"stop", "--all"}
			if to == "old" {
				args = append([]string{"--old"}, args...)
			}
			if code, out := ctl(t, u.pidFile, args...); code != 0 || !strings.Contains(out, "every generation") {
				t.Fatalf("molt ctl %v: exit %d: %s", args, code, out)
			}
			if code := u.Wait(stepTimeout); code != 0 {
				t.Errorf("old master exited %d, want 0", code)
			}
			test.WaitFor(t, stepTimeout, "the new master to exit", func() error {
				if test.Alive(nw) {
					return fmt.Errorf("still running")
				}
				return nil
			})
			if n := len(test.Find(u.log, test.Event("upgrade.committed"))); n != 0 {
				t.Error("stop --all committed the upgrade")
			}
			if l := test.Find(u.log, test.Event("upgrade.new_gave_up")); len(l) != 1 || l[0].Str("code") != "12" {
				t.Errorf("the new master's report: %v", l)
			}
			u.checkLogs(rollbackLines...)
		})
	}
}
