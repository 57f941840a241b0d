package integration

import (
	"fmt"
	"io"
	"math/rand/v2"
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
	"github.com/molt-server/molt/test/load"
	"golang.org/x/sys/unix"
)

// Fault injection (issue 6): each test breaks something on purpose under
// the standard load and checks what must hold. A request may fail only if
// it was on a worker the test killed: on a keep-alive connection, the
// worker of its last answer was killed after the request began; on a new
// connection (no answer yet to say whose it is), a kill happened while it
// was in flight. Anything else is a failure molt caused.

// kills records which worker pids a test killed, and when.
type kills struct {
	mu sync.Mutex
	at map[int]time.Time
}

func newKills() *kills { return &kills{at: map[int]time.Time{}} }

// kill sends SIGKILL to pid and records it.
func (k *kills) kill(t *testing.T, pid int) {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Logf("kill %d: %v", pid, err)
		return
	}
	k.at[pid] = time.Now()
}

// record notes that pid was killed now by someone else (the watchdog).
func (k *kills) record(pid int, at time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.at[pid] = at
}

// explains reports whether a kill explains failure f.
func (k *kills) explains(f load.Failure) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	const slack = 50 * time.Millisecond // clocks read in two goroutines
	if f.LastWorker != 0 {
		at, ok := k.at[f.LastWorker]
		return ok && !at.After(f.End.Add(slack))
	}
	for _, at := range k.at {
		if !at.Before(f.Start.Add(-slack)) && !at.After(f.End.Add(slack)) {
			return true
		}
	}
	return false
}

// stopAttributed ends the load and fails the test on every failed
// request that no kill explains; it returns both results.
func (l *loadPair) stopAttributed(t *testing.T, k *kills) (ka, pc load.Result) {
	t.Helper()
	defer l.cancel()
	l.more(t, 32)
	ka, pc = l.ka.Stop(), l.pc.Stop()
	for name, res := range map[string]load.Result{"keep-alive": ka, "connection per request": pc} {
		explained := 0
		for _, f := range res.Fails {
			if k.explains(f) {
				explained++
				continue
			}
			t.Errorf("%s load: a failure no kill explains: %s after %v (last worker %d): %s",
				name, f.Class, f.End.Sub(f.Start).Round(time.Millisecond), f.LastWorker, f.Err)
		}
		if len(res.Fails) != res.Failed() {
			t.Errorf("%s load: %d failures, %d recorded", name, res.Failed(), len(res.Fails))
		}
		t.Logf("%s load: %v; %d failures, each on a killed worker", name, res, explained)
		if res.OK == 0 {
			t.Errorf("%s load: no request answered", name)
		}
	}
	return ka, pc
}

// baseline is the master's own fd and goroutine counts (molt ctl status).
type baseline struct{ fds, goroutines int }

// baseline is the master's settled counts: the least of five looks over
// a second. One look can catch something in flight (a worker being
// spawned, a control connection not yet closed, a recycling successor),
// and such things only ever add; a leak raises the settled value itself,
// so backToBaseline still sees it.
func (m *master) baseline(t *testing.T) baseline {
	t.Helper()
	var b baseline
	for i := range 5 {
		if i > 0 {
			time.Sleep(200 * time.Millisecond)
		}
		st := statusOf(t, m.pidFile)
		if i == 0 || st.FDs < b.fds {
			b.fds = st.FDs
		}
		if i == 0 || st.Goroutines < b.goroutines {
			b.goroutines = st.Goroutines
		}
	}
	return b
}

// backToBaseline waits until the master's counts equal b again, with n
// ready workers.
func (m *master) backToBaseline(t *testing.T, b baseline, n int) {
	t.Helper()
	var got baseline
	test.WaitFor(t, 60*time.Second, "the master's fds and goroutines back to their baseline", func() error {
		st := statusOf(t, m.pidFile)
		got = baseline{st.FDs, st.Goroutines}
		ready := 0
		for _, p := range st.Procs {
			if p.Ready && p.Slot >= 0 {
				ready++
			}
		}
		if len(st.Procs) != n || ready != n || got != b {
			return fmt.Errorf("%d procs, %d ready, counts %+v, baseline %+v", len(st.Procs), ready, got, b)
		}
		return nil
	})
}

// TestFaults_KillRandomWorkersEvery200ms: SIGKILL of a random worker
// every 200 ms for 10 s under load. Every failed request was on a killed
// worker; afterwards the pool is back to 4 ready workers and the master's
// fd and goroutine counts are back to what they were.
func TestFaults_KillRandomWorkersEvery200ms(t *testing.T) {
	t.Parallel()
	m, addr, _ := startSteady(t, 4)
	base := m.baseline(t)
	l := startLoad(t, addr)
	k := newKills()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); {
		<-tick.C
		if ws := m.workers(); len(ws) > 0 {
			k.kill(t, ws[rand.IntN(len(ws))])
		}
	}
	t.Logf("killed %d workers", len(k.at))
	m.backToBaseline(t, base, 4)
	l.stopAttributed(t, k)
	if !test.Alive(m.Pid) {
		t.Fatal("the master died")
	}
	m.stop(test.Event("worker.exited_unexpectedly"))
}

// TestFaults_WatchdogKillsAStoppedWorker: with --watchdog 1s, a worker
// frozen with SIGSTOP stops pinging; the master kills it (a log line names
// it), replaces it, and every failed request was on it.
func TestFaults_WatchdogKillsAStoppedWorker(t *testing.T) {
	t.Parallel()
	m, addr, ws := startSteady(t, 2, "--watchdog", "1s")
	base := m.baseline(t)
	l := startLoad(t, addr)
	victim := ws[0]
	if err := syscall.Kill(victim, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	line := test.WaitLog(t, m.log, stepTimeout, 1, "the watchdog kill",
		test.Event("watchdog.expired", "pid", strconv.Itoa(victim)))
	k := newKills()
	k.record(victim, line[0].Time)
	if line[0].Time.Sub(stopped) < 500*time.Millisecond {
		t.Errorf("killed %v after SIGSTOP, before a whole interval without pings could pass", line[0].Time.Sub(stopped))
	}
	exits := test.WaitLog(t, m.log, stepTimeout, 1, "the stopped worker's exit", test.Event("worker.exited_unexpectedly", "pid", strconv.Itoa(victim)))
	if got := exits[0].Str("status"); got != "killed by the watchdog (signal: killed)" {
		t.Errorf("exit status %q", got)
	}
	m.backToBaseline(t, base, 2)
	for _, w := range m.workers() {
		if w == victim {
			t.Error("the stopped worker is still there")
		}
	}
	l.stopAttributed(t, k)
	m.stop(test.Event("watchdog.expired"),
		test.Event("worker.exited_unexpectedly"))
}

// TestFaults_RecyclingUnderLoadNeverDropsCapacity: workers recycled by
// lifetime (--max-worker-lifetime) and by request count (the worker
// package's RecycleAfter, in the demo) under load: not one request fails
// in either mode, and at every look the pool has its two ready workers.
func TestFaults_RecyclingUnderLoadNeverDropsCapacity(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		args []string
	}{
		{"lifetime", []string{"--max-worker-lifetime", "1s"}},
		{"requests", []string{"--env", "MOLT_DEMO_MAX_REQUESTS=150"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, addr, _ := startSteady(t, 2, c.args...)
			base := m.baseline(t)
			l := startLoad(t, addr)
			least := 2
			var recycled []test.Line
			for end := time.Now().Add(30 * time.Second); time.Now().Before(end); {
				st := statusOf(t, m.pidFile)
				ready := 0
				for _, p := range st.Procs {
					if p.Ready && p.Slot >= 0 {
						ready++
					}
				}
				least = min(least, ready)
				if recycled = test.Find(m.log, test.Event("recycle.done")); len(recycled) >= 6 {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if len(recycled) < 6 {
				t.Fatalf("%d workers recycled in 30s, want 6", len(recycled))
			}
			l.stop(t)
			if least < 2 {
				t.Errorf("the pool once had %d ready workers, want 2 throughout", least)
			}
			for _, r := range recycled {
				want := "lifetime"
				if c.name == "requests" {
					want = "requested by the worker"
				}
				if r.Str("reason") != want {
					t.Errorf("recycled for %q, want %q", r.Str("reason"), want)
				}
			}
			if n := len(test.Find(m.log, test.Event("worker.exited_unexpectedly"))); n != 0 {
				t.Errorf("%d unexpected worker exits", n)
			}
			m.backToBaseline(t, base, 2)
			m.stop()
		})
	}
}

// TestFaults_SignalStorm: 50 signals of mixed kinds (USR2, HUP, TTIN,
// TTOU, WINCH) sent to the master in a burst leave a consistent master:
// never more than one upgrade in flight, and once things settle one
// master serves with as many ready workers as its status says it wants,
// a number the TTINs and TTOUs sent allow (repeats of a signal merge), no
// other master or worker left, and no failed request of the load.
func TestFaults_SignalStorm(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	u.waitWorkers(2)
	l := startLoad(t, addr)
	seed := time.Now().UnixNano()
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	kinds := []syscall.Signal{syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGWINCH}
	sent := map[syscall.Signal]int{}
	for range 50 {
		s := kinds[rng.IntN(len(kinds))]
		if err := syscall.Kill(u.Pid, s); err != nil {
			break // the first master retired: an upgrade committed mid-storm
		}
		sent[s]++
	}
	t.Logf("seed %d: sent %v", seed, sent)

	// Settle: whatever the storm left (a standby, an upgrade in probation),
	// it ends with one master serving.
	var st ctlStatus
	test.WaitFor(t, 90*time.Second, "one master serving, settled", func() error {
		if fileExists(u.pidFile + ".oldbin") {
			return fmt.Errorf("an upgrade is still in flight (.oldbin)")
		}
		var err error
		if st, err = tryStatus(t, u.pidFile); err != nil {
			return err
		}
		ready := 0
		for _, p := range st.Procs {
			if p.Ready && p.Slot >= 0 {
				ready++
			}
		}
		if st.State != "serving" || st.Upgrade != nil || ready != st.Workers || len(st.Procs) != st.Workers {
			return fmt.Errorf("state %s, upgrade %v, %d of %d ready, %d procs", st.State, st.Upgrade, ready, st.Workers, len(st.Procs))
		}
		return nil
	})
	if low, high := max(1, 2-sent[syscall.SIGTTOU]), 2+sent[syscall.SIGTTIN]; st.Workers < low || st.Workers > high {
		t.Errorf("%d workers wanted, outside what %d TTIN and %d TTOU allow [%d, %d]", st.Workers, sent[syscall.SIGTTIN], sent[syscall.SIGTTOU], low, high)
	}
	if st.PID != u.Pid && test.Alive(u.Pid) {
		t.Errorf("the first master %d still runs beside master %d", u.Pid, st.PID)
	}
	var kids []int
	for _, p := range test.Children(st.PID) {
		if test.Alive(p) {
			kids = append(kids, p)
		}
	}
	if len(kids) != st.Workers {
		t.Errorf("master %d has %d children %v, want its %d workers", st.PID, len(kids), kids, st.Workers)
	}
	// Never two upgrades in flight: every start is followed by its end
	// before the next start.
	inFlight := 0
	started, ended := test.Event("upgrade.started"), test.Event("upgrade.rolled_back")
	committed := test.Event("upgrade.committed", "side", "old")
	for _, line := range test.Logs(u.log) {
		switch {
		case started(line):
			if inFlight++; inFlight > 1 {
				t.Errorf("a second upgrade started while one was in flight: %s", line.Raw)
			}
		case committed(line), ended(line):
			inFlight--
		}
	}
	l.stop(t)
	u.stop(test.Event("upgrade.rolled_back"),
		test.Event("upgrade.giving_up"),
		test.Event("upgrade.new_gave_up"))
}

// notifyAddrOf reads the NOTIFY_SOCKET a worker was given.
func notifyAddrOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range strings.Split(string(b), "\x00") {
		if v, ok := strings.CutPrefix(kv, "NOTIFY_SOCKET="); ok {
			return v
		}
	}
	t.Fatalf("worker %d has no NOTIFY_SOCKET", pid)
	return ""
}

// waitRejected waits until the master's notify.rejected lines count n
// datagrams in all, the last of them from lastPid (if not empty), and
// returns the lines.
func waitRejected(t *testing.T, log string, n int, lastPid string) []test.Line {
	t.Helper()
	var lines []test.Line
	test.WaitFor(t, stepTimeout, fmt.Sprintf("%d notify datagrams rejected", n), func() error {
		lines = test.Find(log, test.Event("notify.rejected"))
		sum := 0
		for _, l := range lines {
			sum += l.Int("count")
		}
		if sum < n {
			return fmt.Errorf("%d rejected in %d lines", sum, len(lines))
		}
		if last := lines[len(lines)-1]; lastPid != "" && last.Str("last_pid") != lastPid {
			return fmt.Errorf("last rejected from %s, want %s", last.Str("last_pid"), lastPid)
		}
		return nil
	})
	return lines
}

// TestFaults_RoguePeers: a process that is no worker writes to a worker's
// notify socket (READY, STOPPING, MOLT_RECYCLE, WATCHDOG, garbage,
// an oversized datagram, one carrying a descriptor), and to its control
// socket (oversized, malformed, unknown, out-of-range, silent and
// cut-short requests; master/control_test.go has the parser's table),
// under load. Nothing changes: the same workers serve, no request fails,
// every bad control request gets an error, and the master's fd and
// goroutine counts return to their baseline.
func TestFaults_RoguePeers(t *testing.T) {
	t.Parallel()
	m, addr, before := startSteady(t, 2)
	base := m.baseline(t)
	l := startLoad(t, addr)

	sock := notifyAddrOf(t, before[0])
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	to := &unix.SockaddrUnix{Name: sock}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, d := range []struct {
		data []byte
		oob  []byte
	}{
		{data: []byte("READY=1")},
		{data: []byte("STOPPING=1")},
		{data: []byte("MOLT_RECYCLE=1")},
		{data: []byte("WATCHDOG=1\nSTATUS=owned")},
		{data: []byte("\x00\xff\xfe garbage")},
		{data: []byte(strings.Repeat("STATUS=x\n", 8000))},
		{data: []byte("READY=1"), oob: unix.UnixRights(int(r.Fd()), int(w.Fd()))},
	} {
		if err := unix.Sendmsg(fd, d.data, d.oob, to, 0); err != nil {
			t.Fatalf("send %d bytes: %v", len(d.data), err)
		}
	}
	// All seven rejected by their reader (the sender is in no worker's
	// session), counted in at most two lines (notify.RejectedLogEvery).
	waitRejected(t, m.log, 7, strconv.Itoa(os.Getpid()))

	ctlPath := filepath.Join(m.dir, "molt.sock")
	for _, c := range []struct{ send, want string }{
		{strings.Repeat("x", 10000) + "\n", "larger than"},
		{"{\"cmd\":\"status\"\n", "bad control request"},
		{"{\"cmd\":\"format-disk\"}\n", "unknown cmd"},
		{"{\"cmd\":\"scale\",\"workers\":100000}\n", "want 1 to"},
		{"{\"cmd\":\"stop\",\"extra\":1}\n", "unknown field"},
		{"{\"cmd\":\"st", "bad control request"}, // cut short
		{"", "read request"},                     // nothing at all
	} {
		conn, err := net.DialTimeout("unix", ctlPath, reqTimeout)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(stepTimeout))
		io.WriteString(conn, c.send)
		conn.(*net.UnixConn).CloseWrite()
		reply, _ := io.ReadAll(conn)
		conn.Close()
		if !strings.Contains(string(reply), c.want) || !strings.Contains(string(reply), `"done":true`) {
			t.Errorf("control request %.40q: reply %q, want an error containing %q", c.send, reply, c.want)
		}
	}

	l.stop(t)
	if after := m.workers(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("workers changed from %v to %v", before, after)
	}
	m.backToBaseline(t, base, 2) // the same two workers, ready in their slots
	m.stop()
}

// TestFaults_WorkerRestartsLeaveTheMasterFlat: over a hundred workers
// (MOLT_SOAK_RESTARTS, 10,000 in make soak) started and stopped (scaling
// 2 → 10 → 2 under load) leave the master with the fds and goroutines it
// had, and no request fails.
func TestFaults_WorkerRestartsLeaveTheMasterFlat(t *testing.T) {
	t.Parallel()
	m, addr, _ := startSteady(t, 2)
	base := m.baseline(t)
	l := startLoad(t, addr)
	exited := func() int { return len(test.Find(m.log, test.Event("worker.exited"))) }
	want := soakCount(t, "MOLT_SOAK_RESTARTS", 100)
	for cycle := 1; exited() < want; cycle++ {
		if cycle > want/8+10 {
			t.Fatalf("only %d workers exited in %d cycles", exited(), cycle)
		}
		for _, n := range []int{10, 2} {
			if code, out := ctl(t, m.pidFile, "scale", strconv.Itoa(n)); code != 0 {
				t.Fatalf("scale %d: exit %d: %s", n, code, out)
			}
			m.waitWorkers(n)
		}
	}
	t.Logf("%d workers started and stopped", exited())
	m.backToBaseline(t, base, 2)
	l.stop(t)
	m.stop()
}

// TestFaults_AWorkerMisusesTheListener: a worker shuts the shared
// listening socket down (shutdown(2) stops it for every process), or
// switches it to blocking mode (no Close could interrupt an accept). The
// master notices within a second: it listens again on the same socket and
// recycles the workers, whose servers ended, or switches non-blocking
// mode back. Requests are answered again without a restart.
func TestFaults_AWorkerMisusesTheListener(t *testing.T) {
	t.Parallel()
	for kind, repaired := range map[string]func(test.Line) bool{
		"shutdown": test.Event("listener.healed", "fault", "shutdown", "how", "relistened"),
		"blocking": test.Event("listener.healed", "fault", "blocking"),
	} {
		t.Run(kind, func(t *testing.T) {
			once := filepath.Join(t.TempDir(), "done")
			// A worker thread that entered accept(2) while the socket was
			// blocking stays in it until a connection comes: its drain may
			// need the drain timeout.
			m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--drain-timeout", "2s", "--", bins.fakeapp, "serve", "--misuse", kind + ":" + once}})
			addr := m.addr()
			m.waitServing()
			test.WaitLog(t, m.log, stepTimeout, 1, "the repair", repaired)
			test.WaitFor(t, stepTimeout, "the misuse to end", func() error {
				if b, _ := os.ReadFile(once); string(b) != "done" {
					return fmt.Errorf("%s: %q", once, b)
				}
				return nil
			})
			test.WaitFor(t, stepTimeout, "requests answered again", func() error {
				_, err := test.Get(addr, "/", reqTimeout)
				return err
			})
			l := startLoad(t, addr)
			l.stop(t)
			// The last misuse is repaired by the check after it, within a
			// second.
			test.WaitFor(t, stepTimeout, "the last repair to be a while ago", func() error {
				repairs := test.Find(m.log, repaired)
				if last := repairs[len(repairs)-1].Time; time.Since(last) < 1500*time.Millisecond {
					return fmt.Errorf("repaired at %v", last)
				}
				return nil
			})
			checkMasterSocketsNonBlocking(t, m.Pid)
			m.stop(test.Event("worker.exited_unexpectedly"))
		})
	}
}

// TestFaults_AWorkerShutsAUnixListenerDown: a unix listener shut down
// refuses every connect while it still says it listens, and no listen(2)
// undoes that. The master puts a new socket at the path in its place and
// recycles the workers: the path answers again, and the next master
// inherits the new socket.
func TestFaults_AWorkerShutsAUnixListenerDown(t *testing.T) {
	t.Parallel()
	var sock string
	dir := test.ShortTempDir(t)
	sock = filepath.Join(dir, "w.sock")
	u := start(t, runOpts{Dir: dir, Deploy: byRename,
		Args: []string{"--listen", "web=127.0.0.1:0", "--listen", "adm=unix:" + sock, "--workers", "2", "--drain-timeout", "2s", "--probation", "300ms",
			"--", bins.fakeapp, "serve", "--misuse", "shutdown:" + filepath.Join(dir, "done")}})
	addr := u.addrs(2)["web"]
	u.waitServing()
	replaced := test.Event("listener.healed", "fault", "shutdown", "how", "replaced")
	line := test.WaitLog(t, u.log, stepTimeout, 1, "the unix listener replaced", replaced)
	if got := line[0].Str("listener"); got != "adm" {
		t.Errorf("replaced listener %q, want adm", got)
	}
	test.WaitLog(t, u.log, stepTimeout, 1, "the TCP listener's repair",
		test.Event("listener.healed", "fault", "shutdown", "how", "relistened"))
	for _, a := range []string{addr, "unix:" + sock} {
		test.WaitFor(t, stepTimeout, "requests answered again on "+a, func() error {
			_, err := test.Get(a, "/", reqTimeout)
			return err
		})
	}
	l := startLoad(t, addr)
	pid := u.upgrade()
	l.stop(t)
	if r := get(t, "unix:"+sock, "/"); r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(pid) {
		t.Errorf("the unix listener after the upgrade: answered under master %s, want %d", r.Header.Get("X-Molt-Master-Pid"), pid)
	}
	u.stop(test.Event("worker.exited_unexpectedly"))
}
