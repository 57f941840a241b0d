package integration

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

const quit = syscall.SIGQUIT

// TestRun_DemoServesThroughSeveralWorkers: the quickstart. Requests on new
// connections reach more than one worker; each answer names its worker,
// its master and the version; the pid file names the master; QUIT removes
// the pid file and leaves no process.
func TestRun_DemoServesThroughSeveralWorkers(t *testing.T) {
	t.Parallel()
	m, addr, workers := startSteady(t, 3)
	if got := m.current(); got != m.Pid {
		t.Fatalf("pid file says %d, master is %d", got, m.Pid)
	}
	seen := map[int]bool{}
	for i := 0; i < 500 && len(seen) < 2; i++ {
		r := get(t, addr, "/")
		if r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(m.Pid) || r.Header.Get("X-Molt-Version") != version {
			t.Fatalf("headers %v, want master %d and version %s", r.Header, m.Pid, version)
		}
		seen[r.WorkerPid()] = true
	}
	if len(seen) < 2 {
		t.Fatalf("500 connections all reached one worker: %v", seen)
	}
	for pid := range seen {
		if !slices.Contains(workers, pid) {
			t.Errorf("answered by pid %d, not one of the workers %v", pid, workers)
		}
	}
	r := get(t, addr, "/sleep?ms=10")
	if !strings.Contains(r.Body, "slept 10ms") {
		t.Errorf("/sleep answered %q", r.Body)
	}
	m.stop()
	if _, err := os.Stat(m.pidFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left after a clean stop: %v", err)
	}
	if _, err := os.Stat(m.pidFile + ".lock"); err != nil {
		t.Errorf("lock file removed (it must stay: unlinking a lock file is racy): %v", err)
	}
}

// TestRun_VersionFromTheBuild: "molt version" and the startup log line
// report the version the binary was built with.
func TestRun_VersionFromTheBuild(t *testing.T) {
	t.Parallel()
	out, err := exec.Command(bins.molt, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "molt "+version {
		t.Errorf("molt version: %q, %v; want %q", out, err, "molt "+version)
	}
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	l := test.WaitLog(t, m.log, startTimeout, 1, "the startup line", test.Event("master.starting"))
	if l[0].Str("version") != version || l[0].Int("pid") != m.Pid {
		t.Errorf("startup line %s: want version %s and pid %d", l[0].Raw, version, m.Pid)
	}
	m.waitServing()
	m.stop()
}
