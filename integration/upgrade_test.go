package integration

import (
	"context"
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

// loadPair runs the integration tests' standard load: keep-alive and
// connection-per-request clients, 32 in all, paced (STYLE.md §5).
type loadPair struct {
	ka, pc *load.Run
	cancel context.CancelFunc
}

// startLoad starts the load and returns once both kinds of client have
// been answered, so that what the test does next happens under load.
func startLoad(t *testing.T, addr string) *loadPair {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	network := "tcp"
	if len(addr) > 5 && addr[:5] == "unix:" {
		network, addr = "unix", addr[5:]
	}
	l := &loadPair{
		ka:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: 16, Rate: 160, KeepAlive: true}),
		pc:     load.Start(ctx, load.Config{Network: network, Addr: addr, Clients: 16, Rate: 160}),
		cancel: cancel,
	}
	l.more(t, 32)
	return l
}

// more waits until each kind of client has had n more answers.
func (l *loadPair) more(t *testing.T, n int) {
	t.Helper()
	ka, pc := l.ka.Snapshot().OK, l.pc.Snapshot().OK
	test.WaitFor(t, stepTimeout, fmt.Sprintf("%d more answers to the load", n), func() error {
		a, b := l.ka.Snapshot(), l.pc.Snapshot()
		if a.OK < ka+n || b.OK < pc+n {
			return fmt.Errorf("keep-alive %d, per-connection %d answers", a.OK-ka, b.OK-pc)
		}
		return nil
	})
}

// stop lets the load run on for a moment (so that it spans whatever the
// test just did), ends it and fails the test on any failed request; it
// returns how many answers each master gave.
func (l *loadPair) stop(t *testing.T) (masters map[int]int) {
	t.Helper()
	defer l.cancel()
	l.more(t, 32)
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

// TestUpgrade_RepeatedUpgradesUnderLoad: USR2 is a whole deploy. Ten
// upgrades in a row (MOLT_SOAK_UPGRADES, 1,000 in make soak) alternate two versions and the two ways to deploy: a
// new file renamed over the path, and a symlink at the path re-pointed to
// a new release. Each new master takes over and serves its version, each
// old one is gone, not one request fails in either connection mode, and
// the masters' fd and goroutine counts stay flat.
func TestUpgrade_RepeatedUpgradesUnderLoad(t *testing.T) {
	t.Parallel()
	u := startUpgradable(t, byRename, "--listen", "127.0.0.1:0", "--workers", "2", "--probation", "500ms")
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
		u.install(t, bin, how)
		pid := u.upgrade(t)
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
	u.stop(t)
}

// TestUpgrade_UnixSocketSurvivesUpgrades: a unix-socket listener across
// three upgrades: its path is present at every moment (checked every few
// milliseconds), no request over it fails, and it is removed when the last
// master stops.
func TestUpgrade_UnixSocketSurvivesUpgrades(t *testing.T) {
	t.Parallel()
	path := filepath.Join(test.ShortTempDir(t), "app.sock")
	u := startUpgradable(t, byRename, "--listen", "unix:"+path, "--workers", "2", "--probation", "300ms")
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
		u.upgrade(t)
	}
	close(stop)
	<-watched
	select {
	case m := <-missing:
		t.Errorf("the socket path went missing during an upgrade: %s", m)
	default:
	}
	l.stop(t)
	u.stop(t)
	if _, err := os.Lstat(path); err == nil {
		t.Error("the socket path was left after the last master stopped")
	}
}

// TestUpgrade_WorkersOfANewGenerationGetExactlyTheProtocolFDs: tableflip's
// plumbing in a new master (fds 3 and 4, its environment variable) must
// not reach its workers: they start with fds 0-2, the listeners and the
// parent pipe, as the first generation's do.
func TestUpgrade_WorkersOfANewGenerationGetExactlyTheProtocolFDs(t *testing.T) {
	t.Parallel()
	reports := t.TempDir()
	u := startUpgradable(t, byRename, "--listen", "web=127.0.0.1:0", "--workers", "2", "--probation", "300ms",
		"--", bins.fakeapp, "serve", "--report", reports)
	u.addrs(1)
	u.waitServing()
	nw := u.upgrade(t)
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
		if got := strings.Join(inheritable, ","); got != "0,1,2,3,4" {
			t.Errorf("worker %d of the new generation started with fds %s, want exactly 0,1,2,3,4", w, got)
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
	u.stop(t)
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
	addr := test.WaitLog(t, log, startTimeout, 1, "listening", test.Msg("listening"))[0].Str("addr")
	test.WaitLog(t, log, startTimeout, 1, "serving", test.Msg("serving"))
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
