package integration

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestPreflight_ABrokenBinaryIsRefusedBeforeAnythingChanges: before an
// upgrade the master runs "NEW-BINARY version"; a binary that fails it
// (exits non-zero, is not executable, hangs) is refused: the pid file and
// the control socket stay where they are, no new master starts, ctl
// upgrade --wait exits 1 with the reason, status says "refused", and the
// next good binary upgrades.
func TestPreflight_ABrokenBinaryIsRefusedBeforeAnythingChanges(t *testing.T) {
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
		{"exits 1", "#!/bin/sh\necho 'molt: this build is broken' >&2\nexit 1\n", 0o755, "exit status 1: molt: this build is broken"},
		{"not executable", "#!/bin/sh\nexit 0\n", 0o644, "permission denied"},
		// A child left behind holds the output pipe: the whole process
		// group is killed at the timeout.
		{"hangs", "#!/bin/sh\nsleep 3600\n", 0o755, "did not finish within 10s"},
	}
	for i, s := range steps {
		u.deployFile(s.content, os.FileMode(s.mode))
		code, out := ctl(t, u.pidFile, "upgrade", "--wait")
		if code != 1 || !strings.Contains(out, "upgrade refused: the new binary failed its pre-flight check") || !strings.Contains(out, s.reason) {
			t.Errorf("%s: ctl upgrade --wait: exit %d:\n%s", s.name, code, out)
		}
		lines := test.WaitLog(t, u.log, stepTimeout, i+1, "the refusal", test.Event("upgrade.refused"))
		if r := lines[i].Str("reason"); !strings.Contains(r, s.reason) {
			t.Errorf("%s: refusal reason %q lacks %q", s.name, r, s.reason)
		}
		if got := u.current(); got != u.Pid {
			t.Errorf("%s: molt.pid names %d, want %d", s.name, got, u.Pid)
		}
		if fileExists(u.pidFile+".oldbin") || fileExists(filepath.Join(u.dir, "molt.sock.oldbin")) {
			t.Errorf("%s: something was moved aside", s.name)
		}
		st := statusOf(t, u.pidFile)
		if st.PID != u.Pid || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "refused" {
			t.Errorf("%s: status %+v", s.name, st)
		}
	}
	if n := len(test.Find(u.log, test.Event("upgrade.started"))); n != 0 {
		t.Errorf("%d upgrades started; the pre-flight should have stopped each", n)
	}
	// A USR2 is refused the same way, and a QUIT waiting for it is cancelled.
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
	u.stop(test.Event("upgrade.refused"),
		test.Event("upgrade.quit_cancelled"))
}
