package integration

import (
	"encoding/json"
	"strings"
	"testing"
)

// drillReport is "molt drill --json", decoded loosely.
type drillReport struct {
	Requests, OK, Failed int
	Upgrades             []struct {
		N            int
		NewServingMs float64 `json:"new_serving_ms"`
		OldGoneMs    float64 `json:"old_gone_ms"`
		Error        string
	}
	ByGeneration map[string]int `json:"by_generation"`
	ByWorker     map[string]int `json:"by_worker"`
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
