package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	keeperpkg "github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

// TestResurrect_MasterKilledUnderLoad: SIGKILL of the primary master
// under the keeper, under load in both connection modes. No request
// fails: connections queue on the keeper's copy of the socket while the
// dead master's workers answer what they hold and exit; the keeper
// starts a fresh master with the stored socket, whose workers serve;
// the keeper's pid never changes, and QUIT still stops it all with 0.
func TestResurrect_MasterKilledUnderLoad(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2",
		"--metrics-listen", "127.0.0.1:0"}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	old := u.masterPid()
	waitWorkerCount(t, old, 2)
	workers := workersOf(old)
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener in the keeper's store", test.Event("keeper.fdstore", "action", "stored"))
	l := startLoad(t, addr)
	nw, res := u.killForResurrection(old, 2)
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
	st := statusOf(t, u.pidFile)
	if st.PID != nw || st.Keeper != keeper || st.Resurrections != 1 || st.ResurrectedBecause != res.Str("reason") || !strings.Contains(st.ResurrectedBecause, "killed") {
		t.Errorf("status of the fresh master: pid %d keeper %d, resurrections %d (%q); want %d, %d, 1 (%q)",
			st.PID, st.Keeper, st.Resurrections, st.ResurrectedBecause, nw, keeper, res.Str("reason"))
	}
	// The fresh master binds the metrics endpoint anew (its socket is
	// not a listener the keeper stores) and counts the resurrection.
	if v, _ := sample(mustScrape(t, u.metricsAddr(2)), "molt_resurrections_total"); v != 1 {
		t.Errorf("molt_resurrections_total %v after one resurrection, want 1", v)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	if test.Alive(nw) {
		t.Errorf("master %d outlived the keeper's stop", nw)
	}
	t.Logf("keeper %d: master %d killed, %d resurrected: answers %v", keeper, old, nw, got)
}

// TestResurrect_CrashLoopGivesUp: once the service served, its master is
// killed and every fresh master fails at start (another process holds
// the pid file's lock: exit 4). The keeper backs off between them, gives
// up after ResurrectMax+1 deaths within the window, and exits with the
// master's status, for systemd's Restart=; no busy loop, no descriptor
// kept per attempt.
func TestResurrect_CrashLoopGivesUp(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	u.addr()
	u.waitServing()
	keeper := u.Pid
	master := u.masterPid()
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener in the keeper's store", test.Event("keeper.fdstore", "action", "stored"))
	fdsBefore := fdCount(t, keeper)
	// A new lock file (a new inode) that the test holds: every fresh
	// master finds the pid file locked.
	lock := u.pidFile + ".lock"
	if err := os.Rename(lock, lock+".old"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(lock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(master, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Sample the keeper's descriptors until it exits: a descriptor kept
	// per attempt would show as growth.
	// Its CPU time too: a busy loop between attempts would show as
	// ticks.
	fdsMax := fdsBefore
	ticksBefore, _ := test.CPUTicks(keeper)
	ticksLast := ticksBefore
	deadline := time.Now().Add(stepTimeout)
	for test.Alive(keeper) && time.Now().Before(deadline) {
		if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", keeper)); err == nil {
			fdsMax = max(fdsMax, len(ents))
		}
		if n, ok := test.CPUTicks(keeper); ok {
			ticksLast = n
		}
		time.Sleep(10 * time.Millisecond) // a sampling interval, not a synchronization
	}
	// One pidfd and StartProcess's pipe may be open during an attempt.
	if fdsMax > fdsBefore+2 {
		t.Errorf("the keeper's descriptors grew from %d to %d during the crash loop", fdsBefore, fdsMax)
	}
	if code := u.Wait(stepTimeout); code != 4 {
		t.Errorf("keeper exit %d, want 4 (the fresh masters' status)", code)
	}
	tries := test.Find(u.log, test.Event("keeper.resurrect"))
	if len(tries) != keeperpkg.ResurrectMax {
		t.Errorf("%d fresh masters, want %d", len(tries), keeperpkg.ResurrectMax)
	}
	if n := len(test.Find(u.log, test.Event("keeper.resurrect_gave_up"))); n != 1 {
		t.Errorf("%d give-ups logged, want 1", n)
	}
	// The backoff: the attempts spread over at least its sum (the first
	// at once, then 100ms doubling, -20% jitter).
	if len(tries) == keeperpkg.ResurrectMax {
		// 100+200+400+800ms, -20% jitter.
		if took, want := tries[len(tries)-1].Time.Sub(tries[0].Time), 1200*time.Millisecond; took < want {
			t.Errorf("%d attempts within %v: no backoff (want >= %v)", len(tries), took, want)
		}
	}
	// The loop spans at least the backoff's 1.2 s (120 ticks at 100 Hz,
	// spinning); starting six masters and reaping them takes a few.
	if ticks := ticksLast - ticksBefore; ticks > crashLoopTicks {
		t.Errorf("the keeper used %d CPU ticks during the crash loop (at most %d): a busy loop", ticks, crashLoopTicks)
	}
	t.Logf("keeper %d: %d descriptors before, %d at most; %d attempts; %d CPU ticks", keeper, fdsBefore, fdsMax, len(tries), ticksLast-ticksBefore)
}

// crashLoopTicks bounds the keeper's CPU ticks during a crash loop.
const crashLoopTicks = 40

// freshMaster waits for the n-th fresh master and returns its pid and
// the version it started as.
func freshMaster(t *testing.T, u *master, n int) (int, string) {
	t.Helper()
	res := test.WaitLog(t, u.log, stepTimeout, n, "a fresh master", test.Event("keeper.resurrect"))
	pid := res[n-1].Int("pid")
	test.Track(t, pid)
	start := test.WaitLog(t, u.log, stepTimeout, 1, "the fresh master starting", test.Event("master.starting", "pid", strconv.Itoa(pid)))
	return pid, start[0].Str("version")
}

// TestResurrect_TheStableReleaseComesBack: a fresh master runs the
// release of the last master that served --stable-after past its commit.
// A new release killed sooner, once the old master has exited, is
// replaced by the release before it (whose binary the path no longer
// holds); a good upgrade then succeeds from the fresh master; once that
// release has served long enough it is the one to come back, even with
// the old binary put back at the path.
func TestResurrect_TheStableReleaseComesBack(t *testing.T) {
	t.Parallel()
	const stable = 5 * time.Second
	u := start(t, runOpts{Deploy: byRename, Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--stable-after", stable.String()}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	first := u.masterPid()
	test.WaitLog(t, u.log, stable+stepTimeout, 1, "the first master's spec", test.Event("keeper.spec", "pid", strconv.Itoa(first)))

	// molt2, killed before it served stable: the first release comes back.
	l := startLoad(t, addr)
	u.install(bins.molt2, byRename)
	if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	bad := u.waitTakeover(first)
	if len(test.Find(u.log, test.Event("keeper.spec", "pid", strconv.Itoa(bad)))) != 0 {
		t.Fatalf("master %d registered its spec before the test killed it: the machine is too slow for --stable-after %v", bad, stable)
	}
	if err := syscall.Kill(bad, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	back, v := freshMaster(t, u, 1)
	if v != version {
		t.Errorf("the fresh master %d runs version %q, want the release before, %q", back, v, version)
	}
	waitWorkerCount(t, back, 2)
	l.stop(t)

	// A good upgrade from the fresh master, to the molt2 at the path.
	if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	good := u.waitTakeover(back)
	test.WaitLog(t, u.log, stable+stepTimeout, 1, "the new release's spec", test.Event("keeper.spec", "pid", strconv.Itoa(good)))

	// The old binary back at the path changes nothing: the spec holds
	// molt2's executable.
	u.install(bins.molt, byRename)
	l = startLoad(t, addr)
	if err := syscall.Kill(good, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	again, v := freshMaster(t, u, 2)
	if v != nextVersion() {
		t.Errorf("the fresh master %d runs version %q, want the stable release, %q", again, v, nextVersion())
	}
	waitWorkerCount(t, again, 2)
	l.stop(t)
	if !test.Alive(keeper) {
		t.Fatal("the keeper is gone")
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestResurrect_OldMasterKilledDuringProbation: the old master is
// killed while the new generation serves on probation, before the new
// master has told the keeper MAINPID=. The new master commits by
// itself, and the keeper holds it (by its MAINPID=, or finding it among
// its children) instead of starting a fresh master. No request fails.
func TestResurrect_OldMasterKilledDuringProbation(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "1h"}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	old := u.masterPid()
	l := startLoad(t, addr)
	u.install(bins.molt2, byRename)
	if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	nw := u.waitNewServing(old)
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The new master commits at once; its MAINPID= may reach the keeper
	// before the old master's death (then it is held already) or after
	// (then the keeper finds it among its children: keeper.master_adopted).
	test.WaitLog(t, u.log, stepTimeout, 1, "the new master primary", test.Event("keeper.primary", "pid", strconv.Itoa(nw)))
	test.WaitLog(t, u.log, stepTimeout, 1, "the old master reaped", test.Event("keeper.master_exited", "pid", strconv.Itoa(old)))
	l.stop(t)
	t.Logf("the keeper adopted the new master: %v", len(test.Find(u.log, test.Event("keeper.master_adopted"))) == 1)
	if n := len(test.Find(u.log, test.Event("keeper.resurrect_scheduled"))); n != 0 {
		t.Errorf("%d fresh masters scheduled beside the new master", n)
	}
	if !test.Alive(nw) {
		t.Fatalf("the new master %d is gone", nw)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestResurrect_CurrentListenerSet: after a reload that adds a listener
// and drops one, SIGKILL of the master: the fresh master serves exactly
// the current set, on the very sockets the keeper stored (the same
// inodes), and holds none of the dropped one.
func TestResurrect_CurrentListenerSet(t *testing.T) {
	t.Parallel()
	u, addrs, sock := startWebAndAdm(t)
	keeper := u.Pid
	old := u.masterPid()
	first := listenerInodes(t, []string{addrs["web"]}, []string{sock})
	added, current, gone := reloadAdmToNew(t, u, keeper, addrs["web"], sock, first)
	l := startLoad(t, addrs["web"])
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	fresh, _ := freshMaster(t, u, 1)
	test.WaitLog(t, u.log, stepTimeout, 2, "the fresh master serving", test.Event("master.serving"))
	l.stop(t)
	held, _ := socketsHeld(t, fresh)
	for ino, a := range current {
		if held[ino] == 0 {
			t.Errorf("the fresh master does not hold the stored socket of %s (%d)", a, ino)
		}
	}
	for ino := range gone {
		if held[ino] != 0 {
			t.Errorf("the fresh master holds the dropped socket adm (%d)", ino)
		}
	}
	for _, a := range []string{addrs["web"], added} {
		if r := get(t, a, "/"); r.Status != 200 || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(fresh) {
			t.Errorf("GET %s: %d from master %s, want the fresh master %d", a, r.Status, r.Header.Get("X-Molt-Master-Pid"), fresh)
		}
	}
	waitStore(t, keeper, current, gone)
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestResurrect_NewMasterExitsAfterCommit: a new release whose master
// exits 1 two seconds after its commit, once the old master has exited
// (a fault built into bins.moltFault, MOLT_FAULT), under load in both
// modes and --stable-after longer than that: no request fails, the
// keeper starts the release before it afresh (its spec), which serves
// and shows the resurrection in molt ctl status; a good upgrade then
// succeeds from it, and its master still shows the resurrection.
func TestResurrect_NewMasterExitsAfterCommit(t *testing.T) {
	t.Parallel()
	const stable = 4 * time.Second
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Env: []string{"MOLT_FAULT=exit-after-commit:2s"},
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--stable-after", (stable + 4*time.Second).String()}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	first := u.masterPid()
	test.WaitLog(t, u.log, stable+4*time.Second+stepTimeout, 1, "the first master's spec", test.Event("keeper.spec", "pid", strconv.Itoa(first)))

	l := startLoad(t, addr)
	u.install(bins.moltFault, byRename)
	if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	bad := u.waitTakeover(first)
	exit := test.WaitLog(t, u.log, stepTimeout, 1, "the new master's injected exit", test.Event("fault.exit", "pid", strconv.Itoa(bad)))
	if exit[0].Str("old_master_exited") != "true" {
		t.Errorf("the new master %d exited before the old one: %v", bad, exit[0])
	}
	if len(test.Find(u.log, test.Event("keeper.spec", "pid", strconv.Itoa(bad)))) != 0 {
		t.Fatalf("master %d registered its spec before its fault: the machine is too slow for the test's --stable-after", bad)
	}
	back, v := freshMaster(t, u, 1)
	if v != version {
		t.Errorf("the fresh master %d runs version %q, want the release before, %q", back, v, version)
	}
	res := test.Find(u.log, test.Event("keeper.resurrect"))
	if len(res) != 1 || !strings.Contains(res[0].Str("reason"), "exit status 1") || res[0].Int("spec_pid") != first {
		t.Errorf("resurrections %v: want one, for exit status 1, from the first master's spec (%d)", res, first)
	}
	waitWorkerCount(t, back, 2)
	got := l.stop(t)
	if got[back] == 0 {
		t.Errorf("the fresh master %d answered nothing: %v", back, got)
	}
	st := statusOf(t, u.pidFile)
	if st.PID != back || st.Version != version || st.Resurrections != 1 || !strings.Contains(st.ResurrectedBecause, "exit status 1") {
		t.Errorf("status of the fresh master: %+v", st)
	}

	// A good upgrade from the fresh master, under load.
	l = startLoad(t, addr)
	u.install(bins.molt2, byRename)
	if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	good := u.waitTakeover(back)
	waitWorkerCount(t, good, 2)
	got = l.stop(t)
	if got[good] == 0 {
		t.Errorf("the upgraded master %d answered nothing: %v", good, got)
	}
	st = statusOf(t, u.pidFile)
	if st.PID != good || st.Version != nextVersion() || st.Resurrections != 1 || !strings.Contains(st.ResurrectedBecause, "exit status 1") {
		t.Errorf("status after the good upgrade: %+v", st)
	}
	if !test.Alive(keeper) || u.Pid != keeper {
		t.Fatalf("the keeper %d is gone", keeper)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
}

// TestResurrect_StatusTakesOnlyStrictValues: the resurrection variables
// in a master's environment are shown only in their strict form: a
// forged count with a line break in its reason is ignored and logged,
// and the master serves on; valid ones (as the operator may set them)
// are shown.
func TestResurrect_StatusTakesOnlyStrictValues(t *testing.T) {
	t.Parallel()
	bad := start(t, runOpts{Env: []string{keeperpkg.EnvResurrections + "=07", keeperpkg.EnvResurrectedBecause + "=ok\nforged line"},
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	bad.waitServing()
	test.WaitLog(t, bad.log, stepTimeout, 1, "the variables refused", test.Event("master.env_rejected"))
	if st := statusOf(t, bad.pidFile); st.Resurrections != 0 || st.ResurrectedBecause != "" {
		t.Errorf("status shows forged resurrections: %d %q", st.Resurrections, st.ResurrectedBecause)
	}
	bad.stop(func(l test.Line) bool { return l.Str("event") == "master.env_rejected" })

	good := start(t, runOpts{Env: []string{keeperpkg.EnvResurrections + "=3", keeperpkg.EnvResurrectedBecause + "=the master failed: exit status 1"},
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	good.waitServing()
	if st := statusOf(t, good.pidFile); st.Resurrections != 3 || st.ResurrectedBecause != "the master failed: exit status 1" || st.Keeper != 0 {
		t.Errorf("status: resurrections %d %q, keeper %d", st.Resurrections, st.ResurrectedBecause, st.Keeper)
	}
	code, out := ctl(t, good.pidFile, "status")
	if code != 0 || !strings.Contains(out, "resurrections  3 (fresh masters the keeper started); last: the master failed: exit status 1\n") {
		t.Errorf("molt ctl status: exit %d:\n%s", code, out)
	}
	good.stop()
}
