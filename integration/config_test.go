package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// waitReports waits for n fakeapp reports in dir and returns them by pid.
func waitReports(t *testing.T, dir string, n int) map[int]fakeReport {
	t.Helper()
	var reps map[int]fakeReport
	test.WaitFor(t, startTimeout, fmt.Sprintf("%d worker reports", n), func() error {
		if reps = readReports(t, dir); len(reps) < n {
			return fmt.Errorf("%d reports", len(reps))
		}
		return nil
	})
	return reps
}

// TestConfig_FileSetsEverythingAndFlagsOverride: the config file sets the
// listeners, the worker settings (env, chdir, umask) and the command; a
// flag on the command line overrides the file's workers. The workers see
// exactly that.
func TestConfig_FileSetsEverythingAndFlagsOverride(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	reports := filepath.Join(dir, "reports")
	workDir := filepath.Join(dir, "work")
	for _, d := range []string{reports, workDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(dir, "molt.hcl")
	writeConfig(t, conf, fmt.Sprintf(`
# a comment
listen  = ["web=127.0.0.1:0"]
workers = 1
env     = { APP_ENV = "production", EMPTY = "" }
chdir   = %q
umask   = "0027"
command = [%q, "serve", "--report", %q]
`, workDir, bins.fakeapp, reports))
	m := start(t, runOpts{Dir: dir, Args: []string{"--config", conf, "--workers", "2"}})
	addr := m.addrs(1)["web"]
	if addr == "" {
		t.Fatal("no listener called web")
	}
	m.waitServing()
	m.waitWorkers(2)
	for pid, r := range waitReports(t, reports, 2) {
		if v, _ := r.env("APP_ENV"); v != "production" {
			t.Errorf("worker %d: APP_ENV=%q", pid, v)
		}
		if v, ok := r.env("EMPTY"); !ok || v != "" {
			t.Errorf("worker %d: EMPTY=%q (set: %v)", pid, v, ok)
		}
		if r.Cwd != workDir {
			t.Errorf("worker %d: working directory %q, want %q", pid, r.Cwd, workDir)
		}
		if r.Umask != "0027" {
			t.Errorf("worker %d: umask %q, want 0027", pid, r.Umask)
		}
	}
	if wd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", m.Pid)); err != nil || wd != dir {
		t.Errorf("the master's working directory is %q (%v), want its own %q", wd, err, dir)
	}
	if r := get(t, addr, "/"); r.Status != 200 {
		t.Errorf("GET: %d", r.Status)
	}
	m.stop()
}

// TestConfig_HUPWithABrokenFileKeepsServing: a reload of a config file
// with errors is refused with every error at its file:line; the workers,
// listeners and settings stay as they were, under load, and a fixed file
// then reloads.
func TestConfig_HUPWithABrokenFileKeepsServing(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Config: "listen = [\"127.0.0.1:0\"]\nworkers = 2\n"})
	conf := m.config
	addr := m.addr()
	m.waitServing()
	before := m.waitWorkers(2)
	l := startLoad(t, addr)
	writeConfig(t, conf, "listen = [\"127.0.0.1:0\"]\nworkers = \"three\"\nfrobnicate = 1\n")
	m.Signal(syscall.SIGHUP)
	lines := test.WaitLog(t, m.log, stepTimeout, 1, "the refused reload",
		test.Event("reload.refused", "reason", "invalid configuration"))
	e := lines[0].Str("error")
	for _, want := range []string{conf + ":2:11: workers: want a number", conf + ":3:1:", "frobnicate"} {
		if !strings.Contains(e, want) {
			t.Errorf("reload error %q lacks %q", e, want)
		}
	}
	code, out := ctl(t, m.pidFile, "reload", "--wait")
	if code == 0 || !strings.Contains(out, conf+":2:11") {
		t.Errorf("ctl reload of a broken file: exit %d:\n%s", code, out)
	}
	if now := m.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(before) {
		t.Errorf("workers changed from %v to %v after a refused reload", before, now)
	}
	writeConfig(t, conf, "listen = [\"127.0.0.1:0\"]\nworkers = 3\n")
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 || !strings.Contains(out, "reloaded: 3 new workers serve") {
		t.Fatalf("reload of the fixed file: exit %d:\n%s", code, out)
	}
	m.waitWorkers(3)
	l.stop(t)
	m.stop(test.Event("reload.refused", "reason", "invalid configuration"))
}

// TestConfig_ReloadAddsAndDropsListenersUnderLoad: a reload whose file
// adds a listener and drops another binds the new one before any worker
// changes, serves it, stops the dropped one listening everywhere (its
// unix path removed), and the kept listener never fails a request.
func TestConfig_ReloadAddsAndDropsListenersUnderLoad(t *testing.T) {
	t.Parallel()
	dir := test.ShortTempDir(t)
	oldSock := filepath.Join(dir, "old.sock")
	m := start(t, runOpts{Dir: dir, Config: fmt.Sprintf("listen = [\"web=127.0.0.1:0\", \"old=unix:%s\", \"oldtcp=127.0.0.1:0\"]\nworkers = 2\n", oldSock)})
	conf := m.config
	addrs := m.addrs(3)
	m.waitServing()
	m.waitWorkers(2)
	l := startLoad(t, addrs["web"])
	writeConfig(t, conf, "listen = [\"web=127.0.0.1:0\", \"admin=127.0.0.1:0\"]\nworkers = 2\n")
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	admin := m.addrs(4)["admin"]
	if admin == "" {
		t.Fatal("no listener admin after the reload")
	}
	if r := get(t, admin, "/"); r.Status != 200 {
		t.Errorf("GET on the added listener: %d", r.Status)
	}
	if fileExists(oldSock) {
		t.Errorf("the dropped listener's path %s is still there", oldSock)
	}
	// Stopped listening in every process: a connect is refused, not
	// queued behind a listener nobody accepts on.
	refused(t, "tcp", addrs["oldtcp"])
	st := statusOf(t, m.pidFile)
	var names []string
	for _, ln := range st.Listeners {
		names = append(names, ln.Name)
	}
	if strings.Join(names, ",") != "web,admin" {
		t.Errorf("listeners after the reload: %v, want web,admin", names)
	}
	l.stop(t)
	m.stop()
}

// TestConfig_CheckValidatesWithoutStarting: molt check (nginx -t) accepts
// a good file with exit 0 and a summary, and rejects a bad one with exit
// 2 and every problem at its file:line; it starts nothing either way.
func TestConfig_CheckValidatesWithoutStarting(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	conf := filepath.Join(dir, "molt.hcl")
	check := func(args ...string) (int, string) {
		return runToEnd(t, dir, bins.molt, append([]string{"check"}, args...)...)
	}
	writeConfig(t, conf, fmt.Sprintf("listen = [\"web=127.0.0.1:0\"]\nworkers = 3\ncommand = [%q, \"serve\"]\n", bins.fakeapp))
	if code, out := check("--config", conf); code != 0 || !strings.Contains(out, "configuration OK") || !strings.Contains(out, "web=127.0.0.1:0") || !strings.Contains(out, "workers:   3") {
		t.Errorf("check of a good file: exit %d:\n%s", code, out)
	}
	writeConfig(t, conf, "listen = [\"127.0.0.1\"]\nwokers = 3\n")
	code, out := check("--config", conf)
	if code != 2 {
		t.Errorf("check of a bad file: exit %d, want 2:\n%s", code, out)
	}
	for _, want := range []string{conf + ":1:10: listen:", conf + ":2:1:", "wokers", "Did you mean \"workers\"?"} {
		if !strings.Contains(out, want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}
	writeConfig(t, conf, "listen = [\"127.0.0.1:0\"]\ncommand = [\"/no/such/app\"]\n")
	if code, out := check("--config", conf); code != 2 || !strings.Contains(out, "/no/such/app") {
		t.Errorf("check of a missing command: exit %d:\n%s", code, out)
	}
	if fileExists(filepath.Join(dir, "molt.pid")) || fileExists(filepath.Join(dir, "molt.sock")) {
		t.Error("molt check started something")
	}
}

// TestConfig_UpgradeReadsTheFileAnew: a new master reads the config file
// at start, so an upgrade adds and drops listeners too: the kept one is
// inherited and never fails a request, the added one serves once the new
// generation does, and after the commit the dropped listeners (TCP and
// unix) no longer listen and the unix path is gone.
func TestConfig_UpgradeReadsTheFileAnew(t *testing.T) {
	t.Parallel()
	dir := test.ShortTempDir(t)
	oldSock := filepath.Join(dir, "old.sock")
	u := start(t, runOpts{Dir: dir, Deploy: byRename,
		Config: fmt.Sprintf("listen = [\"web=127.0.0.1:0\", \"old=unix:%s\", \"oldtcp=127.0.0.1:0\"]\nworkers = 2\nprobation = \"300ms\"\n", oldSock)})
	conf := u.config
	before := u.addrs(3)
	u.waitServing()
	l := startLoad(t, before["web"])
	writeConfig(t, conf, "listen = [\"web=127.0.0.1:0\", \"admin=127.0.0.1:0\"]\nworkers = 2\nprobation = \"300ms\"\n")
	u.install(bins.molt2, byRename)
	nw := u.upgrade()
	// gen 1: web, old, oldtcp; gen 2: web (inherited), admin.
	admin := u.addrs(5)["admin"]
	if admin == "" {
		t.Fatal("the new master did not listen on admin")
	}
	if r := get(t, admin, "/"); r.Status != 200 || r.Header.Get("X-Molt-Master-Pid") != fmt.Sprint(nw) {
		t.Errorf("GET on the added listener: %d from master %s, want %d", r.Status, r.Header.Get("X-Molt-Master-Pid"), nw)
	}
	test.WaitFor(t, stepTimeout, "the dropped unix listener's path to go", func() error {
		if fileExists(oldSock) {
			return fmt.Errorf("%s still there", oldSock)
		}
		return nil
	})
	refused(t, "unix", oldSock)
	refused(t, "tcp", before["oldtcp"])
	l.stop(t)
	u.stop()
}

// TestConfig_UpgradeMovesAListener: a name whose address the config file
// changes is bound anew by the new master (not inherited with the old
// address); after the commit the old address no longer listens.
func TestConfig_UpgradeMovesAListener(t *testing.T) {
	t.Parallel()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := free.Addr().String()
	free.Close()
	u := start(t, runOpts{Deploy: byRename, Config: "listen = [\"web=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n"})
	before := u.addrs(1)["web"]
	u.waitServing()
	writeConfig(t, u.config, fmt.Sprintf("listen = [\"web=%s\"]\nworkers = 1\nprobation = \"300ms\"\n", target))
	u.install(bins.molt2, byRename)
	nw := u.upgrade()
	if r := get(t, target, "/"); r.Status != 200 || r.Header.Get("X-Molt-Master-Pid") != fmt.Sprint(nw) {
		t.Errorf("GET on the moved listener %s: %d from %s, want master %d", target, r.Status, r.Header.Get("X-Molt-Master-Pid"), nw)
	}
	refused(t, "tcp", before) // after the commit
	test.WaitLog(t, u.log, stepTimeout, 1, "the move", test.Event("listener.moved"))
	u.stop()
}
