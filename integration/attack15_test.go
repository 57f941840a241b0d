package integration

import (
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Attacks on issue 15's figures, gates, health check and metrics, by an
// untrusted worker (run as nobody), a local user or a bad release: each
// test performs the attack and asserts it fails, the running generation
// serving on.

// TestAttack15_DroppedDatagramFloodIsPaced: under the standard load, a
// worker run as nobody floods its notify socket for 8 s with datagrams
// the master drops before its loop: valid MOLT_STATS= reports past the
// one a second it takes ("stats"), or malformed ones ("junk"). Such
// datagrams never reached the pacing (notify.paced), so the socket's
// reader read them as fast as the worker sent them: a core of the
// master's. Now they are paced like the messages the loop applies: over
// 4 s of the flood the master uses less than a third of a core, answers
// "ctl status" promptly and serves; no request fails.
func TestAttack15_DroppedDatagramFloodIsPaced(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the flooding worker runs as nobody (--user)")
	const python = "/usr/bin/python3" // one nobody can execute
	test.Require(t, "python3", fileExists(python), python+" is missing")
	for _, kind := range []string{"stats", "junk", "foreign"} {
		t.Run(kind, func(t *testing.T) {
			floodCost(t, python, kind, 0.33)
		})
	}
}

// floodCost runs a master whose worker 0 floods its notify socket with
// datagrams of kind (pyapp --dgram-flood) and fails the test if the
// master uses more than maxShare of a core over 4 s of it.
func floodCost(t *testing.T, python, kind string, maxShare float64) {
	app := pyApp(t)
	gate := nobodysGate(t, "flood")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
		"--", python, app, "--dgram-flood", kind + ":8:" + gate}})
	addr := m.addr()
	m.waitServing()
	l := startLoad(t, addr)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// The flood starts within the worker's 0.2 s select.
	test.WaitFor(t, stepTimeout, "the flood under way", func() error {
		st := statusOf(t, m.pidFile)
		if tr, _ := st.traffic(1, "workers"); kind == "stats" && tr.ReportsDropped < 100 {
			return fmt.Errorf("%d reports dropped", tr.ReportsDropped)
		}
		return nil
	})
	share, took := masterShareDuringFlood(t, m)
	t.Logf("%s flood: the master used %.0f%% of a core over %v", kind, 100*share, took.Round(time.Millisecond))
	if share > maxShare {
		t.Errorf("%s flood: the master used %.0f%% of a core, want under %.0f%%", kind, 100*share, 100*maxShare)
	}
	l.more(t, 64)
	l.stop(t)
	m.stop(func(ln test.Line) bool {
		return test.Event("notify.rejected")(ln) || test.Event("notify.paced")(ln)
	})
}

// TestAttack15_OldWorkerCanRollBackAnUpgrade shows a limit
// (docs/security.md, "Limits"): the workers of every generation run as
// the same --user, and the kernel lets a process signal (or trace) any
// process of its own user. One compromised worker of the old generation
// (pyapp --kill-new) SIGKILLs each worker of the new one as it starts:
// no gate, health check or figure is involved, and the upgrade of a fine
// release rolls back. The bound: the rollback is clean, the old
// generation keeps all its workers and serves on, and no request fails.
func TestAttack15_OldWorkerCanRollBackAnUpgrade(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the workers run as nobody (--user)")
	const python = "/usr/bin/python3" // one nobody can execute
	test.Require(t, "python3", fileExists(python), python+" is missing")
	app := pyApp(t)
	gate := nobodysGate(t, "kill")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
		"--ready-timeout", "10s", "--probation", "2s", "--", python, app, "--kill-new", gate}})
	m.waitServing()
	workers := m.waitWorkers(2)
	l := startLoad(t, m.addr())
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	m.Signal(syscall.SIGUSR2)
	rb := test.WaitLog(t, m.log, 60*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	t.Logf("rolled back: cause %s: %s", rb[0].Str("cause"), rb[0].Str("reason"))
	if got := m.current(); got != m.Pid {
		t.Errorf("molt.pid names %d after the rollback, want the old master %d", got, m.Pid)
	}
	if now := m.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("the old generation's workers changed from %v to %v", workers, now)
	}
	checkNewGenerationGone(t, m.log)
	l.more(t, 64)
	l.stop(t)
	m.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"),
		test.Event("worker.exited_unexpectedly"))
}
