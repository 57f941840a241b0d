package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

// fakeSystemd is a NOTIFY_SOCKET the test owns, as systemd's manager: a
// unixgram socket with SO_PASSCRED that records every message with its
// sender's pid.
type fakeSystemd struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []notifyRecord
}

type notifyRecord struct {
	pid  int
	text string
}

func (r notifyRecord) String() string { return fmt.Sprintf("%d: %q", r.pid, r.text) }

func (r notifyRecord) has(kv string) bool {
	for _, l := range strings.Split(r.text, "\n") {
		if l == kv {
			return true
		}
	}
	return false
}

func (r notifyRecord) get(k string) string {
	for _, l := range strings.Split(r.text, "\n") {
		if v, ok := strings.CutPrefix(l, k+"="); ok {
			return v
		}
	}
	return ""
}

func startFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	f := &fakeSystemd{path: filepath.Join(test.ShortTempDir(t), "notify")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: f.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	rc, err := conn.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	}
	if err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	f.conn = conn
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 8192)
		oob := make([]byte, 1024)
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			rec := notifyRecord{text: strings.TrimSpace(string(buf[:n]))}
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if cred, err := unix.ParseUnixCredentials(&c); err == nil {
						rec.pid = int(cred.Pid)
					}
					// Sockets passed to the fd store (FDSTORE=1): this
					// fake keeps none open.
					if fds, err := unix.ParseUnixRights(&c); err == nil {
						for _, fd := range fds {
							unix.Close(fd)
						}
					}
				}
			}
			f.mu.Lock()
			f.msgs = append(f.msgs, rec)
			f.mu.Unlock()
		}
	}()
	return f
}

func (f *fakeSystemd) records() []notifyRecord {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]notifyRecord(nil), f.msgs...)
}

// waitFor waits until n records satisfy ok and returns them all.
func (f *fakeSystemd) waitFor(t *testing.T, what string, n int, ok func(notifyRecord) bool) []notifyRecord {
	t.Helper()
	var all []notifyRecord
	test.WaitFor(t, stepTimeout, what, func() error {
		all = f.records()
		c := 0
		for _, r := range all {
			if ok(r) {
				c++
			}
		}
		if c < n {
			return fmt.Errorf("%d of %d such messages in %v", c, n, all)
		}
		return nil
	})
	return all
}

// masterPid waits for the pid file and returns the master it names.
func (m *master) masterPid() int {
	t := m.t
	t.Helper()
	var pid int
	test.WaitFor(t, startTimeout, "the pid file", func() error {
		var err error
		pid, err = pidIn(m.pidFile)
		return err
	})
	test.Track(t, pid)
	return pid
}

// stopKeeper sends sig to the keeper and waits for its exit code.
func (m *master) stopKeeper(sig syscall.Signal) int {
	t := m.t
	t.Helper()
	if err := syscall.Kill(m.Pid, sig); err != nil {
		t.Fatal(err)
	}
	return m.Wait(stepTimeout)
}

// TestKeeper_StablePidAcrossFiveUpgradesUnderLoad: USR2 to the keeper
// upgrades the primary master; after five upgrades the keeper (the
// process started) is the same, every master was a new pid and every old
// one is gone, no request failed, and QUIT to the keeper stops it all
// with exit 0.
func TestKeeper_StablePidAcrossFiveUpgradesUnderLoad(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	keeper := u.Pid
	masters := []int{u.masterPid()}
	if masters[0] == keeper {
		t.Fatal("the keeper is the master")
	}
	if ppid, _, _ := test.ProcStat(masters[0]); ppid != keeper {
		t.Errorf("the first master's parent is %d, want the keeper %d", ppid, keeper)
	}
	l := startLoad(t, addr)
	for i := range 5 {
		bin := bins.molt2
		if i%2 == 1 {
			bin = bins.molt
		}
		u.install(bin, byRename)
		old := masters[len(masters)-1]
		if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		nw := u.waitTakeover(old)
		masters = append(masters, nw)
		// Re-parented once the old master's last thread has exited.
		test.WaitFor(t, stepTimeout, "the new master re-parented to the keeper", func() error {
			if ppid, _, _ := test.ProcStat(nw); ppid != keeper {
				return fmt.Errorf("upgrade %d: master %d's parent is %d, want the keeper %d (subreaper)", i+1, nw, ppid, keeper)
			}
			return nil
		})
		if !test.Alive(keeper) {
			t.Fatalf("the keeper died at upgrade %d", i+1)
		}
	}
	got := l.stop(t)
	if len(got) < 2 {
		t.Errorf("requests answered by %d masters, want several: %v", len(got), got)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	for _, m := range masters {
		if test.Alive(m) {
			t.Errorf("master %d outlived the keeper's stop", m)
		}
	}
	// The QUIT reached the last master as a request on its control
	// socket, which it named with its MAINPID.
	last := strconv.Itoa(masters[len(masters)-1])
	if got := test.Find(u.log, test.Event("keeper.stop_requested", "pid", last, "path", filepath.Join(u.dir, "molt.sock"))); len(got) != 1 {
		t.Errorf("%d stop requests to master %s on its control socket, want 1: %v", len(got), last, test.Find(u.log, test.Event("keeper.stop_fallback")))
	}
	t.Logf("keeper %d kept masters %v", keeper, masters)
}

// TestKeeper_UnderFakeSystemd: with NOTIFY_SOCKET set, the keeper is the
// one process that speaks to "systemd": READY=1 once the first generation
// serves, RELOADING=1 (with MONOTONIC_USEC) then READY=1 around each of
// three upgrades and a reload, STOPPING=1 at the stop; never a MAINPID
// (the keeper stays the main pid). No worker sees systemd's socket.
func TestKeeper_UnderFakeSystemd(t *testing.T) {
	t.Parallel()
	sd := startFakeSystemd(t)
	reports := test.ShortTempDir(t)
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Env: []string{"NOTIFY_SOCKET=" + sd.path},
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--probation", "300ms", "--", bins.fakeapp, "serve", "--report", reports}})
	u.addr()
	u.waitServing()
	sd.waitFor(t, "READY=1", 1, func(r notifyRecord) bool { return r.has("READY=1") })
	for i := range 3 {
		old := u.masterPid()
		if err := syscall.Kill(u.Pid, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		u.waitTakeover(old)
		sd.waitFor(t, "READY=1 after the upgrade", i+2, func(r notifyRecord) bool { return r.has("READY=1") })
	}
	if err := syscall.Kill(u.Pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	sd.waitFor(t, "READY=1 after the reload", 5, func(r notifyRecord) bool { return r.has("READY=1") })
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d", code)
	}
	recs := sd.waitFor(t, "STOPPING=1", 1, func(r notifyRecord) bool { return r.has("STOPPING=1") })
	// The story, from the keeper only: READY, then 4 x (RELOADING, READY), STOPPING.
	var story []string
	for _, r := range recs {
		if r.pid != u.Pid {
			t.Errorf("message from pid %d, want only the keeper %d: %v", r.pid, u.Pid, r)
		}
		if r.get("MAINPID") != "" {
			t.Errorf("the keeper sent MAINPID: %v", r)
		}
		switch {
		case r.has("RELOADING=1"):
			if _, err := strconv.ParseUint(r.get("MONOTONIC_USEC"), 10, 64); err != nil {
				t.Errorf("RELOADING=1 without a MONOTONIC_USEC: %v", r)
			}
			story = append(story, "RELOADING")
		case r.has("READY=1"):
			story = append(story, "READY")
		case r.has("STOPPING=1"):
			story = append(story, "STOPPING")
		}
	}
	want := "READY RELOADING READY RELOADING READY RELOADING READY RELOADING READY STOPPING"
	if got := strings.Join(story, " "); got != want {
		t.Errorf("notify story:\n got %s\nwant %s\n%v", got, want, recs)
	}
	for pid, r := range readReports(t, reports) {
		if v, ok := r.env("NOTIFY_SOCKET"); ok && v == sd.path {
			t.Errorf("worker %d sees systemd's NOTIFY_SOCKET", pid)
		}
	}
}

// TestKeeper_NoKeeperSendsMAINPID: with --no-keeper under "systemd"
// (NotifyAccess=all), each master that becomes primary says MAINPID= with
// its own pid and READY=1; the old one says RELOADING=1 first.
func TestKeeper_NoKeeperSendsMAINPID(t *testing.T) {
	t.Parallel()
	sd := startFakeSystemd(t)
	u := start(t, runOpts{Deploy: byRename, Env: []string{"NOTIFY_SOCKET=" + sd.path},
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--probation", "300ms"}})
	u.addr()
	u.waitServing()
	first := u.Pid
	sd.waitFor(t, "MAINPID of the first master", 1, func(r notifyRecord) bool { return r.get("MAINPID") == strconv.Itoa(first) && r.has("READY=1") })
	second := u.upgrade()
	recs := sd.waitFor(t, "MAINPID of the new master", 1, func(r notifyRecord) bool { return r.get("MAINPID") == strconv.Itoa(second) && r.has("READY=1") })
	var reloading bool
	for _, r := range recs {
		if r.has("RELOADING=1") && r.pid == first {
			reloading = true
		}
		if m := r.get("MAINPID"); m != "" && m != strconv.Itoa(r.pid) {
			t.Errorf("MAINPID %s sent by %d", m, r.pid)
		}
	}
	if !reloading {
		t.Errorf("no RELOADING=1 from the old master: %v", recs)
	}
	u.stop()
}

// TestKeeper_ForwardsSignalsToThePrimary: TTIN, TTOU and HUP sent to the
// keeper reach the primary master (worker count, reload); INT stops
// everything, as Ctrl-C in a terminal does.
func TestKeeper_ForwardsSignalsToThePrimary(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	u.addr()
	u.waitServing()
	m := u.masterPid()
	syscall.Kill(u.Pid, syscall.SIGTTIN)
	waitWorkerCount(t, m, 2)
	syscall.Kill(u.Pid, syscall.SIGTTOU)
	waitWorkerCount(t, m, 1)
	syscall.Kill(u.Pid, syscall.SIGHUP)
	test.WaitLog(t, u.log, stepTimeout, 1, "the reload", test.Event("reload.done"))
	if code := u.stopKeeper(syscall.SIGINT); code != 0 {
		t.Errorf("keeper exit %d after INT", code)
	}
	if test.Alive(m) {
		t.Error("the master outlived the keeper's INT")
	}
}

// TestKeeper_GracefulStopDuringAnUpgrade: QUIT to the keeper while an
// upgrade waits for its manual commit is a stop request to the primary
// (the old master, on its control socket, now PATH.oldbin); the masters
// abort the new generation first (QUIT to the old master would commit
// it) and then stop the old one: every master exits and the keeper
// exits 0.
func TestKeeper_GracefulStopDuringAnUpgrade(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--commit", "manual", "--probation", "200ms"}})
	u.addr()
	u.waitServing()
	old := u.masterPid()
	syscall.Kill(u.Pid, syscall.SIGUSR2)
	nw := u.waitNewServing(old)
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d", code)
	}
	for _, p := range []int{old, nw} {
		if test.Alive(p) {
			t.Errorf("master %d outlived the stop", p)
		}
	}
	if n := len(test.Find(u.log, test.Event("upgrade.committed"))); n != 0 {
		t.Error("the stop committed the upgrade instead of aborting it")
	}
	if got := test.Find(u.log, test.Event("keeper.stop_requested", "pid", strconv.Itoa(old), "path", filepath.Join(u.dir, "molt.sock.oldbin"))); len(got) != 1 {
		t.Errorf("%d stop requests to the old master on its control socket, want 1", len(got))
	}
}

// TestKeeper_QuitFallsBackToSIGQUIT: when the primary's control socket
// is gone (deleted), QUIT to the keeper still stops the service
// gracefully: the keeper says why and sends QUIT to the primary, which
// exits 0; so does the keeper.
func TestKeeper_QuitFallsBackToSIGQUIT(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Keeper: true, Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	u.addr()
	u.waitServing()
	m := u.masterPid()
	sock := filepath.Join(u.dir, "molt.sock")
	// The primary named its control socket (with its READY=1) before the
	// pid file was written, so the keeper knows it by now.
	test.WaitLog(t, u.log, stepTimeout, 1, "the master's READY=1", test.Event("keeper.ready"))
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	if test.Alive(m) {
		t.Errorf("master %d outlived the stop", m)
	}
	if got := test.Find(u.log, test.Event("keeper.stop_fallback", "pid", strconv.Itoa(m))); len(got) != 1 {
		t.Errorf("%d fallbacks to QUIT logged, want 1", len(got))
	} else if !strings.Contains(got[0].Str("reason"), sock) {
		t.Errorf("the fallback's reason does not name the socket %s: %q", sock, got[0].Str("reason"))
	}
	if got := test.Find(u.log, test.Event("keeper.master_exited", "pid", strconv.Itoa(m), "status", "exit status 0")); len(got) != 1 {
		t.Errorf("master %d did not exit 0: %v", m, test.Find(u.log, test.Event("keeper.master_exited")))
	}
}

// TestKeeper_PID1OfAPidNamespace: molt as PID 1 of a new pid namespace (a
// container's entrypoint) upgrades three times under load with no failed
// request, the namespace survives every upgrade (its PID 1 is the keeper),
// and no zombie is left in it.
func TestKeeper_PID1OfAPidNamespace(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Getuid() == 0, "a new pid namespace needs root")
	unshare := test.RequireCommand(t, "unshare")
	if code, out := runToEnd(t, t.TempDir(), unshare, "--pid", "--fork", "--mount-proc", "true"); code != 0 {
		test.Require(t, "pid namespaces", false, fmt.Sprintf("unshare --pid: exit %d: %s", code, out))
	}
	dir := test.ShortTempDir(t)
	m := &master{t: t, dir: dir, pidFile: filepath.Join(dir, "molt.pid"), log: filepath.Join(dir, "molt.log"), workerLog: filepath.Join(dir, "workers.log")}
	m.Proc = test.Start(t, test.Opts{Path: unshare, Dir: dir, Log: filepath.Join(dir, "molt.out"), Args: []string{
		"--pid", "--fork", "--mount-proc", bins.molt, "run", "--pid-file", m.pidFile, "--log-file", m.log, "--worker-log", m.workerLog, "--log-json",
		"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := m.addr()
	m.waitServing()
	l := startLoad(t, addr)
	for i := range 3 {
		if code, out := ctl(t, m.pidFile, "upgrade", "--wait"); code != 0 {
			t.Fatalf("upgrade %d in the namespace: exit %d:\n%s", i+1, code, out)
		}
	}
	l.stop(t)
	// The keeper is the child of unshare; everything else descends from it.
	var keeper int
	test.WaitFor(t, stepTimeout, "the namespace's PID 1", func() error {
		kids := test.Children(m.Pid)
		if len(kids) != 1 {
			return fmt.Errorf("unshare has children %v, want one", kids)
		}
		keeper = kids[0]
		return nil
	})
	if z := zombiesUnder(keeper); len(z) > 0 {
		t.Errorf("zombies in the namespace after three upgrades: %v", z)
	}
	if code, _ := ctl(t, m.pidFile, "stop"); code != 0 {
		t.Error("ctl stop failed")
	}
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("unshare (the keeper's status) exited %d", code)
	}
	if n := len(test.Find(m.log, test.Event("upgrade.committed", "side", "old"))); n != 3 {
		t.Errorf("%d upgrades committed, want 3", n)
	}
}

// zombiesUnder lists zombie processes in root's tree, after a moment for
// the reaper (a zombie that lasts is a bug; one being reaped is not).
func zombiesUnder(root int) []int {
	var zs []int
	for range 20 {
		zs = zs[:0]
		parents := map[int]int{}
		states := map[int]string{}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			p, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if ppid, st, ok := test.ProcStat(p); ok {
				parents[p], states[p] = ppid, st
			}
		}
		for p, st := range states {
			if st != "Z" {
				continue
			}
			for q, i := p, 0; q > 1 && i < 64; q, i = parents[q], i+1 {
				if q == root {
					zs = append(zs, p)
					break
				}
			}
		}
		if len(zs) == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return zs
}
