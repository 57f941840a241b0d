package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// ctl runs "molt ctl" against the master whose pid file is pidFile and
// returns its exit code and output.
func ctl(t *testing.T, pidFile string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(bins.molt, append([]string{"ctl", "--pid-file", pidFile, "--timeout", "60s"}, args...)...)
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("molt ctl %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return code, string(out)
}

// ctlStatus is "molt ctl status --json", decoded loosely.
type ctlStatus struct {
	PID     int    `json:"pid"`
	Gen     int    `json:"gen"`
	Role    string `json:"role"`
	State   string `json:"state"`
	Version string `json:"version"`
	Workers int    `json:"workers"`
	Procs   []struct {
		Slot      int    `json:"slot"`
		PID       int    `json:"pid"`
		State     string `json:"state"`
		Ready     bool   `json:"ready"`
		Failures  int    `json:"failures"`
		RestartIn string `json:"restart_in"`
		Status    string `json:"status"`
	} `json:"procs"`
	Listeners []struct {
		Name, Network, Addr string
		Activated, Blocking bool
	} `json:"listeners"`
	Upgrade *struct {
		Side      string             `json:"side"`
		NewPID    int                `json:"new_pid"`
		Serving   bool               `json:"serving"`
		Ready     int                `json:"ready"`
		Want      int                `json:"want"`
		Preflight string             `json:"preflight"`
		Phases    map[string]float64 `json:"phases"`
		Stage     string             `json:"stage"`
		Gates     string             `json:"gates"`
	} `json:"upgrade"`
	LastUpgrade *struct {
		Outcome, Reason, Cause string
		Phases                 map[string]float64 `json:"phases"`
	} `json:"last_upgrade"`
	Keeper             int             `json:"keeper_pid"`
	Resurrections      int             `json:"resurrections"`
	ResurrectedBecause string          `json:"resurrected_because"`
	Traffic            []trafficStatus `json:"traffic"`
	FDs                int             `json:"fds"`
	Goroutines         int             `json:"goroutines"`
}

// trafficStatus is one generation's figures in ctlStatus.
type trafficStatus struct {
	Gen            int               `json:"gen"`
	Source         string            `json:"source"`
	Requests       uint64            `json:"requests"`
	Classes        map[string]uint64 `json:"classes"`
	WindowRequests uint64            `json:"window_requests"`
	RPS            float64           `json:"rps"`
	ErrorShare     float64           `json:"error_share"`
	P50MS          float64           `json:"p50_ms"`
	P99MS          float64           `json:"p99_ms"`
	ReportsDropped uint64            `json:"reports_dropped"`
}

// traffic returns the figures of generation gen from source, if shown.
func (st ctlStatus) traffic(gen int, source string) (trafficStatus, bool) {
	for _, tr := range st.Traffic {
		if tr.Gen == gen && tr.Source == source {
			return tr, true
		}
	}
	return trafficStatus{}, false
}

func statusOf(t *testing.T, pidFile string, extra ...string) ctlStatus {
	t.Helper()
	st, err := tryStatus(t, pidFile, extra...)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// tryStatus is statusOf for a wait: no master answering is an error to
// retry (an upgrade moves the control socket), not the test's end.
func tryStatus(t *testing.T, pidFile string, extra ...string) (ctlStatus, error) {
	t.Helper()
	var st ctlStatus
	code, out := ctl(t, pidFile, append(extra, "status", "--json")...)
	if code != 0 {
		return st, fmt.Errorf("molt ctl status: exit %d: %s", code, out)
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st, nil
}

// TestCtl_StatusAndScale: the operator's view and an exact worker count,
// without pid files or signals.
func TestCtl_StatusAndScale(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "web=127.0.0.1:0", "--workers", "2"}})
	addr := m.addrs(1)["web"]
	m.waitServing()
	st := statusOf(t, m.pidFile)
	if st.PID != m.Pid || st.Role != "primary" || st.State != "serving" || st.Version != version || st.Workers != 2 || len(st.Procs) != 2 {
		t.Fatalf("status %+v", st)
	}
	if len(st.Listeners) != 1 || st.Listeners[0].Name != "web" || st.Listeners[0].Addr != addr {
		t.Errorf("listeners %+v, want web at %s", st.Listeners, addr)
	}
	if st.FDs <= 0 || st.Goroutines <= 0 {
		t.Errorf("fds %d goroutines %d", st.FDs, st.Goroutines)
	}
	code, out := ctl(t, m.pidFile, "status")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("pid %d", m.Pid)) || !strings.Contains(out, addr) {
		t.Errorf("human status (exit %d):\n%s", code, out)
	}
	if code, out := ctl(t, m.pidFile, "scale", "4"); code != 0 || !strings.Contains(out, "workers: 4") {
		t.Fatalf("scale 4: exit %d: %s", code, out)
	}
	m.waitWorkers(4)
	if code, _ := ctl(t, m.pidFile, "scale", "1"); code != 0 {
		t.Fatal("scale 1 failed")
	}
	m.waitWorkers(1)
	if code, out := ctl(t, m.pidFile, "scale", "0"); code != 2 || !strings.Contains(out, "at least 1") {
		t.Errorf("scale 0: exit %d: %s", code, out)
	}
	if code, out := ctl(t, m.pidFile, "frobnicate"); code != 2 || !strings.Contains(out, "unknown command") {
		t.Errorf("unknown command: exit %d: %s", code, out)
	}
	if code, out := ctl(t, filepath.Join(t.TempDir(), "none.pid"), "status"); code != 3 || !strings.Contains(out, "no master answers") {
		t.Errorf("no master: exit %d: %s", code, out)
	}
	if code, _ := ctl(t, m.pidFile, "stop"); code != 0 {
		t.Fatal("ctl stop failed")
	}
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("exit %d after ctl stop", code)
	}
	if fileExists(filepath.Join(m.dir, "molt.sock")) {
		t.Error("control socket left after the master stopped")
	}
	m.checkLogs()
}

// TestCtl_UpgradeWaitIsTheDeployStep: "molt ctl upgrade --wait" prints each
// step and exits 0 on commit, 1 on rollback, under load, losing nothing.
func TestCtl_UpgradeWaitIsTheDeployStep(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	u.install(bins.molt2, byRename)
	code, out := ctl(t, u.pidFile, "upgrade", "--wait")
	if code != 0 {
		t.Fatalf("upgrade --wait of a good binary: exit %d:\n%s", code, out)
	}
	for _, step := range []string{"upgrade started", "new master started: pid", "new generation: 2 of 2 workers ready", "new generation serving; probation", "committed: the new master"} {
		if !strings.Contains(out, step) {
			t.Errorf("upgrade --wait output lacks %q:\n%s", step, out)
		}
	}
	nw := u.waitTakeover(u.Pid)
	u.deployFile("#!/bin/sh\nexit 0\n", 0o755)
	code, out = ctl(t, u.pidFile, "upgrade", "--wait")
	if code != 1 || !strings.Contains(out, "rolled back: the new master exited with status 0") {
		t.Fatalf("upgrade --wait of a bad binary: exit %d:\n%s", code, out)
	}
	st := statusOf(t, u.pidFile)
	if st.PID != nw || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "rolled back" {
		t.Errorf("status after the rollback: %+v", st)
	}
	l.stop(t)
	u.stop(rollbackLines...)
}

// TestCtl_BothMastersDuringAnUpgrade: while both generations serve, the
// new master answers on molt.sock and the old one on molt.sock.oldbin
// (--old); each tells its side; the control socket is never passed on.
func TestCtl_BothMastersDuringAnUpgrade(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	u.addr()
	u.waitServing()
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 || !strings.Contains(out, "manual commit") {
		t.Fatalf("upgrade --wait in manual mode: exit %d:\n%s", code, out)
	}
	nw := u.waitNewServing(u.Pid)
	old := statusOf(t, u.pidFile, "--old")
	if old.PID != u.Pid || old.State != "upgrading" || old.Upgrade == nil || old.Upgrade.NewPID != nw || !old.Upgrade.Serving {
		t.Errorf("old master's status: %+v (upgrade %+v)", old, old.Upgrade)
	}
	nst := statusOf(t, u.pidFile)
	if nst.PID != nw || nst.Role != "new" || nst.State != "probation" || nst.Gen != 2 {
		t.Errorf("new master's status: %+v", nst)
	}
	// Both time the upgrade's phases so far, from the signal.
	if up := old.Upgrade; up == nil || up.Side != "old" || up.Preflight == "" {
		t.Errorf("old master's upgrade: %+v", up)
	} else {
		for _, k := range []string{"start_ms", "hello_ms", "config_ms", "serving_ms"} {
			if _, ok := up.Phases[k]; !ok {
				t.Errorf("old master's upgrade phases lack %s: %v", k, up.Phases)
			}
		}
		if !(up.Phases["hello_ms"] <= up.Phases["config_ms"] && up.Phases["config_ms"] <= up.Phases["serving_ms"]) {
			t.Errorf("old master's upgrade phases out of order: %v", up.Phases)
		}
	}
	if up := nst.Upgrade; up == nil || up.Side != "new" || up.NewPID != nw || up.Phases["serving_ms"] <= 0 {
		t.Errorf("new master's upgrade: %+v", up)
	}
	if _, out := ctl(t, u.pidFile, "--old", "status"); !strings.Contains(out, "phases (ms since the signal): ") || !strings.Contains(out, "serving ") {
		t.Errorf("ctl --old status shows no phases:\n%s", out)
	}
	if code, out := ctl(t, u.pidFile, "scale", "3"); code != 1 || !strings.Contains(out, "--old") {
		t.Errorf("scale on the new master: exit %d: %s", code, out)
	}
	// "stop" to the old master during an upgrade is its QUIT: commit.
	if code, _ := ctl(t, u.pidFile, "--old", "stop"); code != 0 {
		t.Fatal("ctl --old stop failed")
	}
	u.waitTakeover(u.Pid)
	if fileExists(filepath.Join(u.dir, "molt.sock.oldbin")) {
		t.Error("molt.sock.oldbin left after the commit")
	}
	// The new master's last upgrade is its own, with the phases to its
	// commit.
	if st := statusOf(t, u.pidFile); st.LastUpgrade == nil || st.LastUpgrade.Outcome != "committed" || st.LastUpgrade.Phases["committed_ms"] <= 0 {
		t.Errorf("new master's last upgrade: %+v", st.LastUpgrade)
	}
	u.stop()
}

// TestCtl_AnotherUserIsRefused: the control socket is mode 0600, and even
// when an operator loosens it, a peer of another uid (not root) gets a
// refusal from the master's credential check.
func TestCtl_AnotherUserIsRefused(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Getuid() == 0, "running as another user needs root")
	setpriv := test.RequireCommand(t, "setpriv")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	m.waitServing()
	sock := filepath.Join(m.dir, "molt.sock")
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	// Give nobody a way to the socket and to a copy of molt it may run.
	pub := test.ShortTempDir(t)
	os.Chmod(pub, 0o755)
	bin := filepath.Join(pub, "molt")
	if b, err := os.ReadFile(bins.molt); err != nil || os.WriteFile(bin, b, 0o755) != nil {
		t.Fatal("copy molt")
	}
	for d := m.dir; d != "/tmp" && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	os.Chmod(sock, 0o666)
	out, err := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", bin, "ctl", "--socket", sock, "status").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "permission denied: uid 65534") {
		t.Errorf("ctl as nobody: %v\n%s", err, out)
	}
	if st := statusOf(t, m.pidFile); st.PID != m.Pid {
		t.Errorf("the master after a refused peer: %+v", st)
	}
	m.stop()
}
