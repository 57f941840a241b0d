package integration

import (
	"context"
	"strconv"
	"testing"

	"github.com/molt-server/molt/test/load"
)

// loadPair runs the integration tests' standard load: keep-alive and
// connection-per-request clients, 32 in all, paced (STYLE.md §5).
type loadPair struct {
	ka, pc *load.Run
	cancel context.CancelFunc
}

func startLoad(addr string) *loadPair {
	ctx, cancel := context.WithCancel(context.Background())
	network := "tcp"
	if len(addr) > 5 && addr[:5] == "unix:" {
		network, addr = "unix", addr[5:]
	}
	return &loadPair{
		ka:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: 16, Rate: 160, KeepAlive: true}),
		pc:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: 16, Rate: 160}),
		cancel: cancel,
	}
}

// stop ends the load and fails the test on any failed request; it returns
// the number of distinct masters that answered.
func (l *loadPair) stop(t *testing.T) (masters map[int]int) {
	t.Helper()
	defer l.cancel()
	masters = map[int]int{}
	for name, r := range map[string]*load.Run{"keep-alive": l.ka, "connection per request": l.pc} {
		res := r.Stop()
		t.Logf("%s load: %v", name, res)
		if res.Failed() != 0 {
			t.Errorf("%s load: %d failed requests: %v", name, res.Failed(), res.Samples)
		}
		if res.OK == 0 {
			t.Errorf("%s load: no request answered", name)
		}
		for m, n := range res.ByMaster {
			masters[m] += n
		}
	}
	return masters
}

// TestUpgrade_TenAutomaticUpgradesUnderLoad: USR2 is a whole deploy. Ten
// upgrades in a row alternate two versions and the two ways to deploy: a
// new file renamed over the path, and a symlink at the path re-pointed to
// a new release. Each new master takes over and serves its version, each
// old one is gone, and not one request fails in either connection mode.
func TestUpgrade_TenAutomaticUpgradesUnderLoad(t *testing.T) {
	t.Parallel()
	u := startUpgradable(t, byRename, "--listen", "127.0.0.1:0", "--workers", "2", "--probation", "500ms")
	addr := u.addr()
	u.waitServing()
	l := startLoad(addr)
	pids := []int{u.Pid}
	for i := 1; i <= 10; i++ {
		bin, want := bins.molt2, nextVersion()
		if i%2 == 0 {
			bin, want = bins.molt, version
		}
		how := deploy(i % 2) // a symlink, then a file, then a symlink...
		u.install(t, bin, how)
		pid := u.upgrade(t)
		pids = append(pids, pid)
		r := get(t, addr, "/")
		if r.Header.Get("X-Molt-Version") != want || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(pid) {
			t.Fatalf("upgrade %d (%v): answered by master %s version %s, want master %d version %s",
				i, how, r.Header.Get("X-Molt-Master-Pid"), r.Header.Get("X-Molt-Version"), pid, want)
		}
	}
	masters := l.stop(t)
	for _, p := range pids {
		if masters[p] == 0 {
			t.Errorf("master %d answered no request of the load: %v", p, masters)
		}
	}
	if fileExists(u.pidFile + ".oldbin") {
		t.Error("molt.pid.oldbin left behind")
	}
	u.stop(t)
}
