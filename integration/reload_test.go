package integration

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestReload_HUPReplacesTheWorkersUnderLoad: HUP starts new workers and
// drains the old ones once the new ones are ready; no request fails in
// either connection mode.
func TestReload_HUPReplacesTheWorkersUnderLoad(t *testing.T) {
	t.Parallel()
	m, addr, before := startSteady(t, 2)
	l := startLoad(t, addr)
	m.Signal(syscall.SIGHUP)
	test.WaitLog(t, m.log, stepTimeout, 1, "the reload", test.Event("reload.done"))
	var after []int
	test.WaitFor(t, stepTimeout, "only new workers", func() error {
		after = m.waitWorkers(2)
		for _, p := range after {
			if slices.Contains(before, p) {
				return fmt.Errorf("old worker %d still there", p)
			}
		}
		return nil
	})
	l.stop(t)
	m.stop()
}

// TestReload_ANewAppVersionOrAFailedOne: workers run dir/app, a symlink a
// deploy re-points. A reload resolves it afresh: a version whose workers
// never get ready fails the reload and the old workers stay (same pids,
// still serving, no failed request); a good version replaces them.
func TestReload_ANewAppVersionOrAFailedOne(t *testing.T) {
	t.Parallel()
	appDir := t.TempDir()
	app := filepath.Join(appDir, "app")
	writeScript(t, filepath.Join(appDir, "good.sh"), "exec "+bins.fakeapp+" serve")
	writeScript(t, filepath.Join(appDir, "hang.sh"), "exec "+bins.fakeapp+" hang")
	repoint(t, app, filepath.Join(appDir, "good.sh"))
	m, addr, before := startSteady(t, 2, "--ready-timeout", "2s", "--", app)
	l := startLoad(t, addr)
	repoint(t, app, filepath.Join(appDir, "hang.sh"))
	code, out := ctl(t, m.pidFile, "reload", "--wait")
	if code != 1 || !strings.Contains(out, "reload failed") {
		t.Fatalf("reload to a never-ready version: exit %d:\n%s", code, out)
	}
	if now := m.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(before) {
		t.Errorf("after a failed reload the workers are %v, want the old %v", now, before)
	}
	repoint(t, app, filepath.Join(appDir, "good.sh"))
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 || !strings.Contains(out, "reloaded: 2 new workers serve") {
		t.Fatalf("reload to a good version: exit %d:\n%s", code, out)
	}
	l.stop(t)
	m.stop(test.Event("reload.failed"), test.Event("worker.not_ready"))
}
