package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"github.com/molt-server/molt/test/load"
)

// stopWithin ends the load and fails the test on every failed request
// outside [from, to], the outage the test caused (what names it); it
// returns both results.
func (l *loadPair) stopWithin(t *testing.T, what string, from, to time.Time) (ka, pc load.Result) {
	t.Helper()
	defer l.cancel()
	l.more(t, 32)
	ka, pc = l.ka.Stop(), l.pc.Stop()
	for name, res := range map[string]load.Result{"keep-alive": ka, "connection per request": pc} {
		t.Logf("%s load: %v", name, res)
		for _, f := range res.Fails {
			if f.End.Before(from) || f.Start.After(to) {
				t.Errorf("%s load: a failure outside %s (%v after its start): %s %s", name, what, f.Start.Sub(from), f.Class, f.Err)
			}
		}
	}
	return ka, pc
}

// commitHolding sends USR2 to pid (a master, or the keeper, which
// forwards it) with a slow request in flight on the current generation,
// and returns that request's connection and the new master once it has
// committed, while the old generation still drains for the slow request.
func (m *master) commitHolding(addr string, pid int, hold time.Duration) (*keepAlive, int) {
	t := m.t
	t.Helper()
	held := dialKeepAlive(t, addr)
	held.get(t, "/")
	held.send(t, fmt.Sprintf("/sleep?ms=%d", hold.Milliseconds()))
	m.install(bins.molt2, byRename)
	committed := test.Event("upgrade.committed", "side", "old")
	n := len(test.Find(m.log, committed)) + 1 // this commit, after the earlier ones
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	line := test.WaitLog(t, m.log, stepTimeout, n, "the commit", committed)
	nw, err := strconv.Atoi(line[n-1].Str("new_pid"))
	if err != nil {
		t.Fatalf("commit line: %v", err)
	}
	test.Track(t, nw)
	return held, nw
}

// TestUpgrade_RepeatedUpgradesUnderLoad: USR2 is a whole deploy. Ten
// upgrades in a row (MOLT_SOAK_UPGRADES, 1,000 in make soak) alternate two versions and the two ways to deploy: a
// new file renamed over the path, and a symlink at the path re-pointed to
// a new release. Each new master takes over and serves its version, each
// old one is gone, not one request fails in either connection mode, and
// the masters' fd and goroutine counts stay flat.
func TestUpgrade_RepeatedUpgradesUnderLoad(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	pids := []int{u.Pid}
	var base baseline
	n := soakCount(t, "MOLT_SOAK_UPGRADES", 10)
	for i := 1; i <= n; i++ {
		bin, want := bins.molt2, nextVersion()
		if i%2 == 0 {
			bin, want = bins.molt, version
		}
		how := deploy(i % 2) // a symlink, then a file, then a symlink...
		u.install(bin, how)
		pid := u.upgrade()
		pids = append(pids, pid)
		// Each new master holds what the one before it held: fds and
		// goroutines stay flat across upgrades (the first master, which
		// never had a parent, is not the measure).
		if i == 1 {
			base = u.baseline(t)
		} else {
			u.backToBaseline(t, base, 2)
		}
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
	u.stop()
}

// TestUpgrade_UnixSocketSurvivesUpgrades: a unix-socket listener across
// three upgrades: its path is present at every moment (checked every few
// milliseconds), no request over it fails, and it is removed when the last
// master stops.
func TestUpgrade_UnixSocketSurvivesUpgrades(t *testing.T) {
	t.Parallel()
	path := filepath.Join(test.ShortTempDir(t), "app.sock")
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "unix:" + path, "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	missing := make(chan string, 1)
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
				select {
				case missing <- fmt.Sprintf("%v %v", fi, err):
				default:
				}
			}
		}
	}()
	for i := 0; i < 3; i++ {
		u.upgrade()
	}
	close(stop)
	<-watched
	select {
	case m := <-missing:
		t.Errorf("the socket path went missing during an upgrade: %s", m)
	default:
	}
	l.stop(t)
	u.stop()
	if _, err := os.Lstat(path); err == nil {
		t.Error("the socket path was left after the last master stopped")
	}
}

// TestUpgrade_WorkersOfANewGenerationGetExactlyTheProtocolFDs: tableflip's
// plumbing in a new master (fds 3 and 4, its environment variable) must
// not reach its workers: they start with fds 0-2, the listeners, the
// parent pipe and the accept table, as the first generation's do.
func TestUpgrade_WorkersOfANewGenerationGetExactlyTheProtocolFDs(t *testing.T) {
	t.Parallel()
	reports := t.TempDir()
	u := start(t, runOpts{Deploy: byRename,
		// The metrics socket travels between masters, never to a worker.
		Args: []string{"--listen", "web=127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--metrics-listen", "127.0.0.1:0",
			"--", bins.fakeapp, "serve", "--report", reports}})
	u.addrs(1)
	u.waitServing()
	nw := u.upgrade()
	workers := workersOf(nw)
	if len(workers) != 2 {
		t.Fatalf("new generation's workers: %v", workers)
	}
	reps := readReports(t, reports)
	for _, w := range workers {
		r, ok := reps[w]
		if !ok {
			t.Fatalf("no report from worker %d", w)
		}
		var inheritable []string
		for _, fd := range r.FDs {
			if !fd.CloExec {
				inheritable = append(inheritable, strconv.Itoa(fd.FD))
			}
		}
		if got := strings.Join(inheritable, ","); got != "0,1,2,3,4,5" {
			t.Errorf("worker %d of the new generation started with fds %s, want exactly 0,1,2,3,4,5", w, got)
		}
		for _, kv := range r.Env {
			if strings.HasPrefix(kv, "TABLEFLIP_") || strings.HasPrefix(kv, "MOLT_ROLE") {
				t.Errorf("worker %d sees %s", w, kv)
			}
		}
		if mp, _ := r.env("MOLT_MASTER_PID"); mp != strconv.Itoa(nw) {
			t.Errorf("worker %d: MOLT_MASTER_PID=%s, want %d", w, mp, nw)
		}
	}
	checkMasterSocketsNonBlocking(t, nw)
	u.stop()
}

// TestUpgrade_EmbeddedProgramUpgradesItself: a Go program embedding the
// master is re-executed by USR2 and its new generation takes over.
func TestUpgrade_EmbeddedProgramUpgradesItself(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "embedapp")
	if err := os.Link(bins.embedapp, path); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "embed.log")
	pidFile := filepath.Join(dir, "embed.pid")
	p := test.Start(t, test.Opts{Path: path, Dir: dir, Log: log,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--pid-file", pidFile, "--probation", "300ms"}})
	addr := test.WaitLog(t, log, startTimeout, 1, "listening", test.Event("listener.listening"))[0].Str("addr")
	test.WaitLog(t, log, startTimeout, 1, "serving", test.Event("master.serving"))
	p.Signal(syscall.SIGUSR2)
	var nw int
	test.WaitFor(t, 60*time.Second, "the new embedded master to take over", func() error {
		pid, err := pidIn(pidFile)
		if err != nil || pid == p.Pid || test.Alive(p.Pid) {
			return fmt.Errorf("pid file %d %v, old alive %v", pid, err, test.Alive(p.Pid))
		}
		nw = pid
		return nil
	})
	test.Track(t, nw)
	r := get(t, addr, "/")
	if r.Header.Get("X-Embedded") != "yes" || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(nw) {
		t.Errorf("answer %v: want the embedded worker of the new master %d", r.Header, nw)
	}
	if sig := test.StopPID(nw, 20*time.Second); sig != syscall.SIGQUIT {
		t.Errorf("new embedded master needed %v", sig)
	}
	test.CheckLogs(t, log)
}

// TestUpgrade_NewMasterDiesAfterCommit: DESIGN §4's residual hole. The new
// master is SIGKILLed after its commit while the old generation still
// drains (a slow request keeps it): the old master takes the service back
// with new workers of its own, on the same sockets; the pid file and the
// control socket name it again; the slow request is answered; under load
// no request fails outside the moment between the kill and the old master
// serving again. Then upgrades never run out: the master that took the
// service back (its tableflip upgrade spent) upgrades again, by molt ctl
// upgrade, and the new master serves the new version; twice over (the
// second take-back is by a master that molt's own handover started), and
// a last upgrade by USR2 after that. Under the keeper, the keeper's USR2
// reaches the old master again.
func TestUpgrade_NewMasterDiesAfterCommit(t *testing.T) {
	t.Parallel()
	for _, keeper := range []bool{false, true} {
		t.Run(map[bool]string{false: "no_keeper", true: "keeper"}[keeper], func(t *testing.T) {
			u := start(t, runOpts{Deploy: byRename, Keeper: keeper,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--drain-timeout", "30s"}})
			addr := u.addr()
			u.waitServing()
			tookBack := test.Event("upgrade.took_back")
			for round := 1; round <= 2; round++ {
				old := u.current()
				l := startLoad(t, addr)
				// Under the keeper, the old master's READY made it the
				// primary again: the keeper's USR2 goes to it.
				held, nw := u.commitHolding(addr, map[bool]int{false: old, true: u.Pid}[keeper], 4*time.Second)
				killed := time.Now()
				if err := syscall.Kill(nw, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				test.WaitLog(t, u.log, stepTimeout, round, "the service taken back", tookBack)
				test.WaitFor(t, stepTimeout, "the old master serving again", func() error {
					return answersAs(addr, old, "")
				})
				serving := time.Now()
				t.Logf("round %d: the old master served again %v after the kill", round, serving.Sub(killed).Round(time.Millisecond))
				if status := held.read(t); status != 200 {
					t.Errorf("the slow request on the old generation: status %d", status)
				}
				if got := u.current(); got != old {
					t.Errorf("pid file names %d, want the old master %d", got, old)
				}
				st := statusOf(t, u.pidFile)
				if st.PID != old || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "taken back" {
					t.Errorf("status after the take-back: %+v", st)
				}
				// The master that took the service back upgrades again.
				if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
					t.Fatalf("round %d: molt ctl upgrade after the take-back: exit %d: %s", round, code, out)
				}
				nw = u.waitTakeover(old)
				if err := answersAs(addr, nw, nextVersion()); err != nil {
					t.Errorf("round %d: after the upgrade that followed the take-back: %v", round, err)
				}
				ka, pc := l.stopWithin(t, "the take-back", killed, serving)
				for name, res := range map[string]load.Result{"keep-alive": ka, "connection per request": pc} {
					if res.ByMaster[old] == 0 || res.ByMaster[nw] == 0 {
						t.Errorf("%s load: round %d: the old master %d or the new one %d answered nothing: %v", name, round, old, nw, res.ByMaster)
					}
				}
			}
			// And by USR2 once more, back to the first version.
			l := startLoad(t, addr)
			u.install(bins.molt, byRename)
			nw := u.upgrade()
			if err := answersAs(addr, nw, version); err != nil {
				t.Errorf("after the last upgrade: %v", err)
			}
			l.stop(t)
			u.stop(tookBack, test.Event("worker.exited_unexpectedly"),
				// the keeper's USR2s sent while the dead master was still its primary
				test.Event("keeper.signal_not_forwarded"))
		})
	}
}

// answersAs returns nil if a request to addr is answered by master pid
// (and, unless want is "", as version want).
func answersAs(addr string, pid int, want string) error {
	r, err := test.Get(addr, "/", reqTimeout)
	if err != nil {
		return err
	}
	if got := r.Header.Get("X-Molt-Master-Pid"); got != strconv.Itoa(pid) {
		return fmt.Errorf("answered under master %s, want %d", got, pid)
	}
	if got := r.Header.Get("X-Molt-Version"); want != "" && got != want {
		return fmt.Errorf("answered as version %q, want %q", got, want)
	}
	return nil
}

// TestUpgrade_NewMasterStoppedAfterCommit: the other side of the take-back.
// A committed new master stopped on purpose (QUIT or TERM to it) while
// the old generation still drains says so first: the old master finishes
// its drain and exits, and nothing serves again, as the operator asked.
func TestUpgrade_NewMasterStoppedAfterCommit(t *testing.T) {
	t.Parallel()
	for _, sig := range []syscall.Signal{syscall.SIGQUIT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			u := start(t, runOpts{Deploy: byRename,
				Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--probation", "300ms", "--drain-timeout", "30s"}})
			addr := u.addr()
			u.waitServing()
			held, nw := u.commitHolding(addr, u.Pid, 4*time.Second)
			if err := syscall.Kill(nw, sig); err != nil {
				t.Fatal(err)
			}
			test.WaitLog(t, u.log, stepTimeout, 1, "the old master told",
				test.Event("upgrade.successor_stopping"))
			if status := held.read(t); status != 200 {
				t.Errorf("the slow request on the old generation: status %d", status)
			}
			if code := u.Wait(stepTimeout); code != 0 {
				t.Errorf("old master exited %d, want 0", code)
			}
			if test.Alive(nw) {
				t.Errorf("the new master %d still runs", nw)
			}
			if n := len(test.Find(u.log, test.Event("upgrade.took_back"))); n != 0 {
				t.Error("the old master took the service back from a new master stopped on purpose")
			}
			refused(t, "tcp", addr)
			u.checkLogs()
		})
	}
}
