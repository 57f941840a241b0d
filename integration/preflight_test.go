package integration

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// failsPreflight is a new binary that fails its pre-flight run
// ("version") after running body, and otherwise is the good next version:
// the new master it starts works, and only the pre-flight says no.
func failsPreflight(body string) string {
	return fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = version ]; then\n%s\necho 'molt: this build is broken' >&2; exit 1\nfi\nexec %s \"$@\"\n", body, bins.molt2)
}

// TestPreflight_ABrokenBinaryRollsBack: the master runs "NEW-BINARY
// version" alongside the new master's start; a binary that fails it
// (exits non-zero, is not executable, hangs) rolls back like any failure
// before the commit, under load with no failed request: molt.pid and the
// control socket come back, ctl upgrade --wait exits 1 with the reason,
// status says "rolled back" with the phases reached, and the next good
// binary upgrades.
func TestPreflight_ABrokenBinaryRollsBack(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	steps := []struct {
		name    string
		content string
		mode    uint32
		reason  string
	}{
		{"exits 1", failsPreflight(""), 0o755, "exit status 1: molt: this build is broken"},
		// The new master cannot start either: its failure or the
		// pre-flight's gives the reason, the same words.
		{"not executable", "#!/bin/sh\nexit 0\n", 0o644, "permission denied"},
		// A child left behind holds the output pipe: the whole process
		// group is killed at the timeout. Meanwhile the new generation
		// serves, and its commit waits.
		{"hangs", failsPreflight("sleep 3600"), 0o755, "did not finish within 10s"},
	}
	for i, s := range steps {
		u.deployFile(s.content, os.FileMode(s.mode))
		code, out := ctl(t, u.pidFile, "upgrade", "--wait")
		if code != 1 || !strings.Contains(out, "rolled back: ") || !strings.Contains(out, s.reason) {
			t.Errorf("%s: ctl upgrade --wait: exit %d:\n%s", s.name, code, out)
		}
		lines := test.WaitLog(t, u.log, stepTimeout, i+1, "the rollback", test.Event("upgrade.rolled_back"))
		if r := lines[i].Str("reason"); !strings.Contains(r, s.reason) {
			t.Errorf("%s: rollback reason %q lacks %q", s.name, r, s.reason)
		}
		if _, ok := lines[i].Fields["rolled_back_ms"].(float64); !ok {
			t.Errorf("%s: the rollback's line has no rolled_back_ms: %v", s.name, lines[i])
		}
		if got := u.current(); got != u.Pid {
			t.Errorf("%s: molt.pid names %d, want %d", s.name, got, u.Pid)
		}
		if fileExists(u.pidFile + ".oldbin") {
			t.Errorf("%s: molt.pid.oldbin left after the rollback", s.name)
		}
		st := statusOf(t, u.pidFile)
		if st.PID != u.Pid || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "rolled back" || st.LastUpgrade.Phases["rolled_back_ms"] <= 0 {
			t.Errorf("%s: status %+v", s.name, st.LastUpgrade)
		}
		servedOnlyBy(t, addr, u.Pid, 5)
	}
	if n := len(test.Find(u.log, test.Event("upgrade.committed"))); n != 0 {
		t.Errorf("%d commits; each pre-flight failed", n)
	}
	if n := len(test.Find(u.log, test.Event("upgrade.preflight_failed"))); n != len(steps) && n != len(steps)-1 {
		// "not executable" may end by the new master's failure first.
		t.Errorf("%d pre-flight failures logged", n)
	}
	// The hanging pre-flight held the commit of a new generation that
	// served past its probation.
	if len(test.Find(u.log, test.Event("upgrade.commit_held"))) == 0 {
		t.Error("no commit held while the pre-flight ran")
	}
	// A USR2 rolls back the same way, and a QUIT waiting for it is cancelled.
	u.deployFile(steps[0].content, 0o755)
	u.Signal(syscall.SIGUSR2)
	u.Signal(quit)
	test.WaitLog(t, u.log, stepTimeout, 1, "the cancelled QUIT", test.Event("upgrade.quit_cancelled"))
	servedOnlyBy(t, addr, u.Pid, 10)
	u.install(bins.molt2, byRename)
	pid := u.upgrade()
	if r := get(t, addr, "/"); r.Header.Get("X-Molt-Version") != nextVersion() {
		t.Errorf("after the good upgrade: version %q from master %d", r.Header.Get("X-Molt-Version"), pid)
	}
	l.stop(t)
	u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.preflight_failed"),
		test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"), test.Event("master.gave_up"),
		test.Event("upgrade.quit_cancelled"))
}

// TestPreflight_FailsWhileTheNewGenerationServes: the pre-flight runs
// alongside the new master's start, so it may fail after the new
// generation serves and its probation is over: the commit waits for the
// pre-flight, which fails, and the upgrade rolls back under load with no
// failed request; the rollback's line carries the phases reached.
func TestPreflight_FailsWhileTheNewGenerationServes(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "100ms"}})
	addr := u.addr()
	u.waitServing()
	workers := u.waitWorkers(2)
	l := startLoad(t, addr)
	// The pre-flight fails once the new generation serves (it writes
	// molt.pid then) and its probation is over (the sleep outlasts it);
	// the wait is bounded.
	u.deployFile(failsPreflight(fmt.Sprintf(
		"i=0; until [ -e %[1]s.oldbin ] && [ -e %[1]s ]; do i=$((i+1)); [ $i -gt 400 ] && break; sleep 0.05; done; sleep 0.5",
		u.pidFile)), 0o755)
	u.Signal(syscall.SIGUSR2)
	test.WaitLog(t, u.log, stepTimeout, 2, "the new generation serving (both sides)", test.Event("upgrade.serving"))
	test.WaitLog(t, u.log, stepTimeout, 1, "the commit held", test.Event("upgrade.commit_held"))
	failed := test.WaitLog(t, u.log, stepTimeout, 1, "the pre-flight's failure", test.Event("upgrade.preflight_failed"))
	if r := failed[0].Str("reason"); !strings.Contains(r, "the new binary failed its pre-flight check") {
		t.Errorf("pre-flight failure reason %q", r)
	}
	lines := test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))
	rb := lines[0].Fields
	if r := lines[0].Str("reason"); !strings.Contains(r, "exit status 1: molt: this build is broken") {
		t.Errorf("rollback reason %q", r)
	}
	for _, k := range []string{"start_ms", "hello_ms", "config_ms", "serving_ms", "preflight_ms", "rolled_back_ms", "total_ms"} {
		if v, ok := rb[k].(float64); !ok || v < 0 {
			t.Errorf("the rollback's line: %s = %v", k, rb[k])
		}
	}
	if _, ok := rb["committed_ms"]; ok {
		t.Errorf("the rollback's line has committed_ms: %v", rb)
	}
	if rb["serving_ms"].(float64) > rb["preflight_ms"].(float64) {
		t.Errorf("the pre-flight ended (%v ms) before the new generation served (%v ms)", rb["preflight_ms"], rb["serving_ms"])
	}
	if n := len(test.Find(u.log, test.Event("upgrade.committed"))); n != 0 {
		t.Errorf("%d commits; the pre-flight failed", n)
	}
	if got := u.current(); got != u.Pid {
		t.Errorf("molt.pid names %d, want the old master %d", got, u.Pid)
	}
	checkNewGenerationGone(t, u.log)
	if now := u.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("the old generation's workers changed from %v to %v", workers, now)
	}
	masters := l.stop(t)
	t.Logf("answers by master: %v", masters)
	u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.preflight_failed"),
		test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"), test.Event("master.gave_up"))
}
