package integration

import (
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestResurrect_MasterKilledUnderLoad: SIGKILL of the primary master
// under the keeper, under load in both connection modes. No request
// fails: connections queue on the keeper's copy of the socket while the
// dead master's workers answer what they hold and exit; the keeper
// starts a fresh master with the stored socket, whose workers serve;
// the keeper's pid never changes, and QUIT still stops it all with 0.
func TestResurrect_MasterKilledUnderLoad(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2"}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	old := u.masterPid()
	waitWorkerCount(t, old, 2)
	workers := workersOf(old)
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener in the keeper's store", test.Event("keeper.fdstore", "action", "stored"))
	l := startLoad(t, addr)
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	res := test.WaitLog(t, u.log, stepTimeout, 1, "a fresh master", test.Event("keeper.resurrect", "count", "1"))
	nw := res[0].Int("pid")
	if nw <= 0 || nw == old {
		t.Fatalf("fresh master pid %d (the dead one %d)", nw, old)
	}
	test.Track(t, nw)
	test.WaitLog(t, u.log, stepTimeout, 2, "the fresh master serving", test.Event("master.serving"))
	waitWorkerCount(t, nw, 2)
	got := l.stop(t)
	if got[nw] == 0 {
		t.Errorf("the fresh master %d answered nothing: %v", nw, got)
	}
	waitGone(t, "the dead master's workers", workers)
	if !test.Alive(keeper) || u.Pid != keeper {
		t.Fatalf("the keeper %d is gone", keeper)
	}
	if ppid, _, _ := test.ProcStat(nw); ppid != keeper {
		t.Errorf("the fresh master's parent is %d, want the keeper %d", ppid, keeper)
	}
	if n := len(test.Find(u.log, test.Event("keeper.resurrect"))); n != 1 {
		t.Errorf("%d resurrections, want 1", n)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	if test.Alive(nw) {
		t.Errorf("master %d outlived the keeper's stop", nw)
	}
	t.Logf("keeper %d: master %d killed, %d resurrected: answers %v", keeper, old, nw, got)
}
