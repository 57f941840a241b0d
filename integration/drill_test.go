package integration

import (
	"encoding/json"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// drillReport is "molt drill --json", decoded loosely.
type drillReport struct {
	Requests, OK, Failed int
	Upgrades             []struct {
		N            int
		NewServingMs float64 `json:"new_serving_ms"`
		OldGoneMs    float64 `json:"old_gone_ms"`
		Error        string
		Split        map[string]struct {
			Answers int
			Errors  int `json:"5xx"`
		} `json:"by_generation"`
		Fault *struct {
			Name          string
			KilledPID     int    `json:"killed_master_pid"`
			KilledVersion string `json:"killed_version"`
			BackPID       int    `json:"new_master_pid"`
			BackVersion   string `json:"new_version"`
			UpgradedFrom  int    `json:"upgraded_from_pid"`
			KeeperPID     int    `json:"keeper_pid"`
			KeeperKept    bool   `json:"keeper_kept"`
			Resurrections int
			BackMs        float64 `json:"back_ms"`
		}
	}
	ByMode       map[string]struct{ Requests, OK, Failed int } `json:"by_mode"`
	ByGeneration map[string]int                                `json:"by_generation"`
	ByWorker     map[string]int                                `json:"by_worker"`
	Generations  []struct {
		Served []string
	}
	LatencyInUpgrades struct{ N int } `json:"latency_in_upgrades"`
}

// TestDrill_UpgradesMoltUnderItsLoad: molt drill against molt: two
// upgrades through molt ctl under the drill's load (both modes); it
// reports every request answered, each upgrade's new generation serving
// and old one gone, three generations, and exits 0. The tests' own load
// runs alongside and agrees: the drill is not its own judge.
func TestDrill_UpgradesMoltUnderItsLoad(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	code, out := runToEnd(t, u.dir, bins.molt, "drill", "--json", "--clients", "4", "--rate", "200",
		"--upgrades", "2", "--interval", "3s", "--ctl", u.pidFile, "--idle-conns", "10", "http://"+addr+"/")
	l.stop(t)
	if code != 0 {
		t.Fatalf("molt drill: exit %d:\n%s", code, out)
	}
	var rep drillReport
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &rep); err != nil {
		t.Fatalf("drill --json: %v\n%s", err, out)
	}
	if rep.Failed != 0 || rep.OK != rep.Requests || rep.OK < 100 {
		t.Errorf("drill saw %d requests, %d answered, %d failed", rep.Requests, rep.OK, rep.Failed)
	}
	if len(rep.Upgrades) != 2 {
		t.Fatalf("upgrades %+v", rep.Upgrades)
	}
	for _, up := range rep.Upgrades {
		if up.Error != "" || up.NewServingMs < 0 || up.OldGoneMs < 0 {
			t.Errorf("upgrade %+v", up)
		}
		// Each upgrade's window: the generation before it and the new one
		// answered, neither with a 5xx.
		answered := 0
		for g, sp := range up.Split {
			if sp.Errors != 0 {
				t.Errorf("upgrade %d: generation %s answered %d 5xx", up.N, g, sp.Errors)
			}
			if sp.Answers > 0 {
				answered++
			}
		}
		if answered < 2 {
			t.Errorf("upgrade %d: split by generation %+v, want two generations answering", up.N, up.Split)
		}
	}
	if len(rep.ByGeneration) != 3 || len(rep.ByWorker) < 6 || rep.LatencyInUpgrades.N == 0 {
		t.Errorf("generations %v, workers %v, requests in upgrade windows %d", rep.ByGeneration, rep.ByWorker, rep.LatencyInUpgrades.N)
	}
	u.stop()
}

// TestDrill_BadUsage: bad flags are refused with exit 2 and a reason.
func TestDrill_BadUsage(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"drill"}, "want one TARGET"},
		{[]string{"drill", "--upgrades", "2", "http://127.0.0.1:1/"}, "--upgrades needs"},
		{[]string{"drill", "--ctl", "a", "--signal", "b", "http://127.0.0.1:1/"}, "give one of"},
		{[]string{"drill", "--mode", "pipelined", "http://127.0.0.1:1/"}, "--mode"},
		{[]string{"drill", "--clients", "0", "http://127.0.0.1:1/"}, "--clients must be"},
		{[]string{"drill", "--fault", "kill-master", "http://127.0.0.1:1/"}, "--fault needs --ctl"},
		{[]string{"drill", "--fault", "kill-keeper", "--ctl", "x", "http://127.0.0.1:1/"}, "want one of kill-master, kill-new-master"},
		{[]string{"drill", "--fault", "kill-master", "--ctl", "x", "--upgrades", "2", "http://127.0.0.1:1/"}, "drop --upgrades"},
	} {
		code, out := runToEnd(t, dir, bins.molt, c.args...)
		if code != 2 || !strings.Contains(out, c.want) {
			t.Errorf("%v: exit %d, want 2 with %q:\n%s", c.args, code, c.want, out)
		}
	}
	code, out := runToEnd(t, dir, bins.molt, "drill", "--duration", "1s", "https://127.0.0.1:1/")
	if code != 1 || !strings.Contains(out, "https is not supported") {
		t.Errorf("https target: exit %d:\n%s", code, out)
	}
}

// drillFault runs molt drill --fault name against u (under load of its
// own and the tests' load alongside) and returns the decoded report and
// the fault's line.
func drillFault(t *testing.T, u *master, addr, name string) drillReport {
	t.Helper()
	l := startLoad(t, addr)
	code, out := runToEnd(t, u.dir, bins.molt, "drill", "--json", "--clients", "4", "--rate", "200",
		"--fault", name, "--interval", "2s", "--duration", "5s", "--ctl", u.pidFile, "http://"+addr+"/")
	l.stop(t)
	if code != 0 {
		t.Fatalf("molt drill --fault %s: exit %d:\n%s", name, code, out)
	}
	var rep drillReport
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &rep); err != nil {
		t.Fatalf("drill --json: %v\n%s", err, out)
	}
	if rep.Failed != 0 || rep.OK != rep.Requests || rep.OK < 100 {
		t.Errorf("drill saw %d requests, %d answered, %d failed", rep.Requests, rep.OK, rep.Failed)
	}
	for _, mode := range []string{"keep-alive", "close"} {
		if m := rep.ByMode[mode]; m.Failed != 0 || m.OK == 0 {
			t.Errorf("drill, %s: %+v", mode, m)
		}
	}
	if len(rep.Upgrades) != 1 || rep.Upgrades[0].Fault == nil {
		t.Fatalf("faults %+v\n%s", rep.Upgrades, out)
	}
	f := rep.Upgrades[0].Fault
	if f.Name != name || f.KeeperPID != u.Pid || !f.KeeperKept || f.BackPID == f.KilledPID || f.BackPID <= 0 || f.Resurrections != 1 || f.BackMs <= 0 {
		t.Errorf("fault %+v (keeper %d)", *f, u.Pid)
	}
	if up := rep.Upgrades[0]; up.Error != "" || up.NewServingMs < 0 || rep.ByGeneration[strconv.Itoa(f.BackPID)] == 0 {
		t.Errorf("fault %+v: the new master answered %d (%v)", up, rep.ByGeneration[strconv.Itoa(f.BackPID)], rep.ByGeneration)
	}
	test.Track(t, f.BackPID)
	return rep
}

// TestDrill_KillMaster: molt drill --fault kill-master against molt
// under its keeper: the primary master is killed under the drill's load
// (both modes) and the tests' load alongside; the drill reports no
// request failed, the killed and the fresh master, the time until the
// fresh master's workers answered, and the keeper unchanged, and exits 0.
func TestDrill_KillMaster(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2"}})
	addr := u.addr()
	u.waitServing()
	first := u.masterPid()
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener in the keeper's store", test.Event("keeper.fdstore", "action", "stored"))
	rep := drillFault(t, u, addr, "kill-master")
	if f := rep.Upgrades[0].Fault; f.KilledPID != first || f.KilledVersion != version || f.BackVersion != version {
		t.Errorf("killed %d (%s), back %d (%s); want %d killed", f.KilledPID, f.KilledVersion, f.BackPID, f.BackVersion, first)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestDrill_KillNewMaster: molt drill --fault kill-new-master: an
// upgrade to the next release, whose master is killed once the old one
// has exited, before --stable-after: the release before comes back, and
// no request failed.
func TestDrill_KillNewMaster(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--stable-after", "1h"}})
	addr := u.addr()
	u.waitServing()
	first := u.masterPid()
	u.install(bins.molt2, byRename)
	rep := drillFault(t, u, addr, "kill-new-master")
	f := rep.Upgrades[0].Fault
	if f.UpgradedFrom != first || f.KilledVersion != nextVersion() || f.BackVersion != version {
		t.Errorf("upgraded from %d to %d (%s), back %d (%s); want from %d, back %s", f.UpgradedFrom, f.KilledPID, f.KilledVersion, f.BackPID, f.BackVersion, first, version)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestDrill_FaultNeedsTheKeeper: without the keeper (--no-keeper) molt
// drill refuses a fault before any load, with the reason, and the master
// serves on untouched.
func TestDrill_FaultNeedsTheKeeper(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	addr := u.addr()
	u.waitServing()
	code, out := runToEnd(t, u.dir, bins.molt, "drill", "--fault", "kill-master", "--interval", "1s", "--ctl", u.pidFile, "http://"+addr+"/")
	if code != 1 || !strings.Contains(out, "without molt's keeper") {
		t.Errorf("drill --fault without a keeper: exit %d, want 1 with the reason:\n%s", code, out)
	}
	if !test.Alive(u.Pid) || u.current() != u.Pid {
		t.Errorf("the master %d did not survive the refused drill", u.Pid)
	}
	u.stop()
}
