package integration

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Upgrades never run out (issue 14): after rollbacks, a take-back
// (TestUpgrade_NewMasterDiesAfterCommit) or a resurrection, USR2 and molt
// ctl upgrade upgrade again.

// TestRenew_FiveRollbacksThenUpgrades: five failed upgrades in a row,
// each a different way (a new master that exits 0, refuses its flags,
// crashes, hangs until the old master's deadline kills it, is no
// binary at all), under load with and without the keeper: the old
// generation serves throughout, its descriptors and goroutines stay
// where the first rollback left them, and then an upgrade by USR2 and
// one by molt ctl upgrade succeed and serve their version. No request
// fails.
func TestRenew_FiveRollbacksThenUpgrades(t *testing.T) {
	t.Parallel()
	failures := []string{
		"#!/bin/sh\nexit 0\n",
		passesPreflight + "exit 2\n",
		passesPreflight + "kill -SEGV $$\n",
		passesPreflight + "exec sleep 3600\n",
		"\x7fELF garbage",
	}
	for _, keeper := range []bool{false, true} {
		t.Run(map[bool]string{false: "no_keeper", true: "keeper"}[keeper], func(t *testing.T) {
			t.Parallel()
			u := start(t, runOpts{Deploy: byRename, Keeper: keeper,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout", "2s", "--probation", "300ms"}})
			addr := u.addr()
			u.waitServing()
			old := u.current()
			l := startLoad(t, addr)
			rolledBack := test.Event("upgrade.rolled_back")
			var base baseline
			for i, script := range failures {
				u.deployFile(script, 0o755)
				if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
					t.Fatal(err)
				}
				test.WaitLog(t, u.log, stepTimeout, i+1, "the rollback", rolledBack)
				if i == 0 {
					// The first attempt made what every later one reuses
					// (the channel to new masters).
					base = u.baseline(t)
				}
			}
			u.backToBaseline(t, base, 2)
			if got := u.current(); got != old {
				t.Fatalf("pid file names %d after the rollbacks, want %d", got, old)
			}
			u.install(bins.molt2, byRename)
			nw := u.upgrade()
			if err := answersAs(addr, nw, nextVersion()); err != nil {
				t.Errorf("after the upgrade that followed the rollbacks: %v", err)
			}
			u.install(bins.molt, byRename)
			if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
				t.Fatalf("molt ctl upgrade: exit %d: %s", code, out)
			}
			last := u.waitTakeover(nw)
			if err := answersAs(addr, last, version); err != nil {
				t.Errorf("after the next upgrade: %v", err)
			}
			got := l.stop(t)
			if got[old] == 0 || got[nw] == 0 || got[last] == 0 {
				t.Errorf("answers by master %v: want some from %d, %d and %d", got, old, nw, last)
			}
			u.stop(rolledBack, test.Event("upgrade.new_gave_up"), test.Event("upgrade.deadline"),
				test.Event("upgrade.preflight_failed"))
		})
	}
}

// TestRenew_UpgradeAfterResurrection: the primary master is SIGKILLed
// under the keeper and the keeper starts a fresh master; USR2 to the
// keeper upgrades it, and molt ctl upgrade the next one. No request
// fails under load.
func TestRenew_UpgradeAfterResurrection(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	dead := u.masterPid()
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener in the keeper's store", test.Event("keeper.fdstore", "action", "stored"))
	l := startLoad(t, addr)
	if err := syscall.Kill(dead, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	res := test.WaitLog(t, u.log, stepTimeout, 1, "a fresh master", test.Event("keeper.resurrect", "count", "1"))
	fresh := res[0].Int("pid")
	test.Track(t, fresh)
	test.WaitLog(t, u.log, stepTimeout, 2, "the fresh master serving", test.Event("master.serving"))
	waitWorkerCount(t, fresh, 2)

	u.install(bins.molt2, byRename)
	if err := syscall.Kill(u.Pid, syscall.SIGUSR2); err != nil { // the keeper forwards it
		t.Fatal(err)
	}
	nw := u.waitTakeover(fresh)
	if err := answersAs(addr, nw, nextVersion()); err != nil {
		t.Errorf("after the upgrade of the resurrected master: %v", err)
	}
	u.install(bins.molt, byRename)
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("molt ctl upgrade: exit %d: %s", code, out)
	}
	last := u.waitTakeover(nw)
	if err := answersAs(addr, last, version); err != nil {
		t.Errorf("after the next upgrade: %v", err)
	}
	got := l.stop(t)
	if got[nw] == 0 || got[last] == 0 {
		t.Errorf("answers by master %v: want some from %d and %d", got, nw, last)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	u.checkLogs(test.Event("keeper.resurrect"), test.Event("keeper.master_died"))
}

// TestRenew_FailedUpgradesAfterTakeBack: the master that took the
// service back starts new masters by molt's own handover, which fail as
// tableflip's do and roll back with the same reasons: one handed a bad
// MOLT_HANDOVER_FDS refuses it (a configuration refused: exit 2, the
// variable named in its error), one that hangs is killed at the
// deadline, one exits 0; the master keeps no descriptor or goroutine per
// attempt. Then a good upgrade succeeds. No request fails under load
// outside the take-back.
func TestRenew_FailedUpgradesAfterTakeBack(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout", "2s", "--probation", "300ms", "--drain-timeout", "30s"}})
	addr := u.addr()
	u.waitServing()
	old := u.Pid
	held, nw := u.commitHolding(addr, old, 4*time.Second)
	l := startLoad(t, addr)
	killed := time.Now()
	if err := syscall.Kill(nw, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	tookBack := test.Event("upgrade.took_back")
	test.WaitLog(t, u.log, stepTimeout, 1, "the service taken back", tookBack)
	test.WaitFor(t, stepTimeout, "the old master serving again", func() error { return answersAs(addr, old, "") })
	serving := time.Now()
	if status := held.read(t); status != 200 {
		t.Errorf("the slow request on the old generation: status %d", status)
	}

	rolledBack := test.Event("upgrade.rolled_back")
	var base baseline
	for i, c := range []struct{ script, reason string }{
		{passesPreflight + "MOLT_HANDOVER_FDS=molt.bogus:0 exec " + bins.molt2 + " \"$@\"\n", "refused its flags or configuration (exit status 2)"},
		{passesPreflight + "exec sleep 3600\n", "did not serve in time and was killed"},
		{"#!/bin/sh\nexit 0\n", "exited with status 0"},
	} {
		u.deployFile(c.script, 0o755)
		if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		lines := test.WaitLog(t, u.log, 60*time.Second, i+1, "the rollback", rolledBack)
		if got := lines[i].Str("reason"); !strings.Contains(got, c.reason) {
			t.Errorf("rollback %d: reason %q, want one containing %q", i+1, got, c.reason)
		}
		if i == 0 {
			base = u.baseline(t)
		}
	}
	u.backToBaseline(t, base, 2) // no descriptor or goroutine kept per attempt
	refusal := test.Find(u.log, test.Event("master.failed"))
	if len(refusal) != 1 || !strings.Contains(refusal[0].Str("error"), "MOLT_HANDOVER_FDS") {
		t.Errorf("the new master's refusal of a bad MOLT_HANDOVER_FDS: %v", refusal)
	}
	if got := u.current(); got != old {
		t.Fatalf("pid file names %d after the rollbacks, want %d", got, old)
	}
	u.install(bins.molt2, byRename)
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("molt ctl upgrade: exit %d: %s", code, out)
	}
	last := u.waitTakeover(old)
	if err := answersAs(addr, last, nextVersion()); err != nil {
		t.Errorf("after the good upgrade: %v", err)
	}
	// Every one went by molt's own handover (tableflip's was spent).
	if n := len(test.Find(u.log, test.Event("upgrade.fresh_started"))); n != 4 {
		t.Errorf("%d new masters started by molt's own handover, want 4", n)
	}
	l.stopWithin(t, "the take-back", killed, serving)
	u.stop(tookBack, rolledBack, test.Event("master.failed"), test.Event("upgrade.deadline"),
		test.Event("worker.exited_unexpectedly"))
}
