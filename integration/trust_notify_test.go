package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// attackPy is a worker (or, in mode stranger, a process of another
// user) that attacks molt's notify sockets as issue 11 describes, writes
// what happened to REPORT/<pid>.json, and (as a worker) then becomes
// "fakeapp serve" in the same process, so that the service keeps
// serving. Its children are bounded in time and write their own report.
//
//	attack.py keeper      REPORT FAKEAPP   MAINPID=<own pid> (and MOLT_SPEC=1) to the keeper's socket
//	attack.py flood       REPORT FAKEAPP GO   worker 0's child floods every other worker's socket and its own
//	attack.py impersonate REPORT FAKEAPP GO   worker 1's child speaks for worker 0
//	attack.py stranger    REPORT DIR        floods every socket under DIR (from /proc/net/unix)
const attackPy = `
import array, errno, json, os, socket, sys, time

mode, report = sys.argv[1], sys.argv[2]

def write(name, data):
    tmp = os.path.join(report, ".%s.tmp" % name)
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, os.path.join(report, "%s.json" % name))

def listed():
    """inode -> path of every bound unix socket (as any user can see)."""
    out = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            p = line.split()
            if len(p) >= 8:
                out[p[6]] = p[7]
    return out

def held_by(pid, socks):
    paths = []
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            l = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if l.startswith("socket:[") and l[8:-1] in socks:
                paths.append(socks[l[8:-1]])
    except OSError:
        pass
    return paths

def parent(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

def send(path, data, fds=None, flags=0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        # "@name" is the abstract namespace, as /proc/net/unix and
        # NOTIFY_SOCKET spell it (molt used it before issue 11).
        s.sendmsg([data], anc, flags, "\0" + path[1:] if path.startswith("@") else path)
        return "sent"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()

def become_app():
    fakeapp = sys.argv[3]
    os.execv(fakeapp, [fakeapp, "serve"])

def wait_for(path, limit):
    end = time.time() + limit
    while not os.path.exists(path):
        if time.time() > end:
            return False
        time.sleep(0.02)
    return True

def flood(targets, own, stop, want):
    """Datagrams of 253 fds each at every target (and the own socket)
    until each target took want of them and stop exists; bounded."""
    fds = [os.open("/dev/null", os.O_RDONLY)] * 253
    counts = {}
    end = time.time() + 30
    i = 0
    while time.time() < end:
        for t in targets():
            c = counts.setdefault(t, {})
            r = send(t, b"STATUS=flood", fds, socket.MSG_DONTWAIT)
            c[r] = c.get(r, 0) + 1
        if own:
            c = counts.setdefault(own, {})
            r = send(own, b"STATUS=flood", fds, socket.MSG_DONTWAIT)
            c[r] = c.get(r, 0) + 1
        i += 1
        if i % 50 == 0:
            # What reached the socket's permission check and queue: not
            # EAGAIN (queue full) nor ENOENT (gone).
            done = all(sum(v for k, v in c.items() if k not in ("EAGAIN", "ENOENT")) >= want
                       for t, c in counts.items() if t != own)
            if done and len(counts) > (1 if own else 0) and (stop is None or os.path.exists(stop)):
                break
    return counts

if mode == "keeper":
    molt = {i: p for i, p in listed().items() if "/molt-keeper-" in p or p.startswith("@molt/")}
    # The keeper is this worker's highest ancestor holding such a socket
    # (above the masters); a worker that cannot look (--user) tries them
    # all.
    mine, pid = [], os.getppid()
    for _ in range(5):
        if pid <= 1:
            break
        mine = held_by(pid, molt) or mine
        pid = parent(pid)
    targets = mine or list(molt.values())
    results = {t: send(t, ("MAINPID=%d\nREADY=1\nMOLT_SPEC=1\nSTATUS=owned by a worker" % os.getpid()).encode()) for t in targets}
    write(str(os.getpid()), {"pid": os.getpid(), "uid": os.getuid(), "results": results})
    become_app()

if mode in ("flood", "impersonate"):
    go = sys.argv[4]
    me = os.getpid()
    slot = os.environ.get("MOLT_WORKER")
    own = os.environ["NOTIFY_SOCKET"]
    def first():
        """True in the first worker to get here: one attack per test."""
        try:
            os.close(os.open(os.path.join(report, "attacker"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
    if ((mode == "flood" and slot == "0") or (mode == "impersonate" and slot == "1")) and first():
        if os.fork() == 0:
            # The worker's child: in the worker's session.
            child = os.getpid()
            if not wait_for(go, 30):
                os._exit(1)
            if mode == "flood":
                d = os.path.dirname(own)
                def others():
                    try:
                        return [os.path.join(d, n) for n in os.listdir(d) if os.path.join(d, n) != own]
                    except OSError:
                        return []
                counts = flood(others, own, go + ".stop", 2000)
                write("flood-%d" % child, {"pid": child, "worker": me, "counts": counts})
                os._exit(0)
            # impersonate: worker 0 is the master's other child.
            master = parent(me)
            sib = 0
            for p in os.listdir("/proc"):
                if p.isdigit() and int(p) not in (me, child):
                    try:
                        if parent(int(p)) == master:
                            sib = int(p)
                    except (OSError, ValueError, IndexError):
                        pass
            res = {"pid": child, "worker": me, "sibling": sib}
            try:
                os.setpgid(0, sib)
                res["setpgid"] = "ok"
            except OSError as e:
                res["setpgid"] = errno.errorcode.get(e.errno, str(e.errno))
            with open("/proc/%d/environ" % sib, "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            target = env[b"NOTIFY_SOCKET"].decode()
            res["target"] = target
            res["sent"] = [send(target, m) for m in (b"STATUS=owned by worker 1", b"READY=1", b"WATCHDOG=1",
                                                     b"MOLT_RECYCLE=1", b"STOPPING=1")]
            write("impersonate-%d" % child, res)
            os._exit(0)
    become_app()

if mode == "stranger":
    d = sys.argv[3]
    counts = flood(lambda: [p for p in listed().values() if p.startswith(d + "/")], None, None, 2000)
    write("stranger-%d" % os.getpid(), {"pid": os.getpid(), "uid": os.getuid(), "counts": counts})
`

// attackScript writes attack.py and a report directory anyone may write
// to, in a directory any user can read, and returns both; python is a
// python3 any user can run.
func attackScript(t *testing.T) (python, script, reports string) {
	t.Helper()
	python = "/usr/bin/python3"
	_, err := os.Stat(python)
	test.Require(t, "python3", err == nil, "a python3 outside /root that workers run as nobody can execute: "+fmt.Sprint(err))
	dir := test.ShortTempDir(t)
	os.Chmod(dir, 0o755)
	script = filepath.Join(dir, "attack.py")
	if err := os.WriteFile(script, []byte(attackPy), 0o644); err != nil {
		t.Fatal(err)
	}
	reports = filepath.Join(dir, "reports")
	if err := os.Mkdir(reports, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(reports, 0o777)
	return python, script, reports
}

// attackReport is what attack.py writes.
type attackReport struct {
	Pid, Uid, Worker, Sibling int
	Results                   map[string]string
	Counts                    map[string]map[string]int
	Setpgid, Target           string
	Sent                      []string
}

// waitAttackReports waits for n reports whose name starts with prefix.
func waitAttackReports(t *testing.T, dir, prefix string, n int) []attackReport {
	t.Helper()
	var out []attackReport
	test.WaitFor(t, 60*time.Second, fmt.Sprintf("%d %q reports of attack.py", n, prefix), func() error {
		out = out[:0]
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), prefix) || !strings.HasSuffix(e.Name(), ".json") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				return err
			}
			var r attackReport
			if err := json.Unmarshal(b, &r); err != nil {
				return fmt.Errorf("%s: %v", e.Name(), err)
			}
			out = append(out, r)
		}
		if len(out) < n {
			return fmt.Errorf("%d reports", len(out))
		}
		return nil
	})
	return out
}

// TestTrustNotify_WorkerCannotBecomeTheKeepersPrimary (issue 11, 1): a
// worker, as nobody and as the masters' own uid, sends
// MAINPID=<its pid> and READY=1 to the keeper's notify socket it finds in
// /proc/net/unix, under load. As nobody it cannot even send (the socket
// is 0600 in a 0700 directory); as root the keeper drops it
// (notify.rejected: not in the keeper's session). No keeper.primary event
// ever names a worker; HUP and USR2 to the keeper reach the real master
// (a reload, an upgrade whose new workers attack again), and QUIT to the
// keeper stops every generation and the keeper exits 0.
func TestTrustNotify_WorkerCannotBecomeTheKeepersPrimary(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "workers run as nobody (--user), and as root to be the masters' own uid")
	python, script, reports := attackScript(t)
	for _, as := range []string{"nobody", "root"} {
		t.Run(as, func(t *testing.T) {
			rep := filepath.Join(reports, as)
			os.Mkdir(rep, 0o777)
			os.Chmod(rep, 0o777)
			args := []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}
			if as == "nobody" {
				args = append(args, "--user", "nobody")
			}
			u := start(t, runOpts{Deploy: byRename, Keeper: true,
				Args: append(args, "--", python, script, "keeper", rep, bins.fakeapp)})
			addr := u.addr()
			u.waitServing()
			first := u.masterPid()
			keeperSock := notifyAddrOf(t, first)
			if !strings.Contains(keeperSock, "/molt-keeper-") {
				t.Errorf("the master's NOTIFY_SOCKET is %q, want the keeper's socket path", keeperSock)
			}
			l := startLoad(t, addr)

			attackers := waitAttackReports(t, rep, "", 2)
			for _, r := range attackers {
				got, ok := r.Results[keeperSock]
				switch {
				case !ok:
					t.Errorf("worker %d did not find the keeper's socket %s among %v", r.Pid, keeperSock, r.Results)
				case as == "nobody" && got != "EACCES":
					t.Errorf("worker %d (uid %d) sending to the keeper's socket: %s, want EACCES", r.Pid, r.Uid, got)
				case as == "root" && got != "sent":
					t.Errorf("worker %d (root) sending to the keeper's socket: %s, want sent (and then dropped)", r.Pid, got)
				}
			}
			if as == "root" {
				// Workers no longer see the keeper's pid either.
				if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", attackers[0].Pid)); err != nil || strings.Contains(string(env), "MOLT_KEEPER_PID=") {
					t.Errorf("worker %d's environment has MOLT_KEEPER_PID (or is unreadable: %v)", attackers[0].Pid, err)
				}
				lines := waitRejected(t, u.log, len(attackers), "")
				byWorker := false
				for _, ln := range lines {
					for _, r := range attackers {
						byWorker = byWorker || ln.Str("last_pid") == strconv.Itoa(r.Pid)
					}
					if ln.Module != "molt.keeper" && !strings.HasSuffix(ln.Module, "keeper") {
						t.Errorf("a rejection not by the keeper: %s", ln.Raw)
					}
				}
				if !byWorker {
					t.Errorf("no rejection names an attacking worker: %v", lines)
				}
				// Nor may a worker register itself as the release the
				// keeper starts afresh (MOLT_SPEC=1).
				for _, r := range attackers {
					if got := test.Find(u.log, test.Event("keeper.spec", "pid", strconv.Itoa(r.Pid))); len(got) != 0 {
						t.Errorf("worker %d registered its exec spec: %v", r.Pid, got)
					}
				}
			}

			// HUP: a reload of the real master (its new workers attack too).
			if err := syscall.Kill(u.Pid, syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			test.WaitLog(t, u.log, stepTimeout, 1, "HUP forwarded to the master",
				test.Event("keeper.signal_forwarded", "signal", "SIGHUP", "pid", strconv.Itoa(first)))
			test.WaitFor(t, 60*time.Second, "the reload done", func() error {
				st := statusOf(t, u.pidFile)
				if st.State != "serving" || len(st.Procs) != 2 {
					return fmt.Errorf("%s with %d workers", st.State, len(st.Procs))
				}
				for _, p := range st.Procs {
					for _, a := range attackers {
						if p.PID == a.Pid {
							return fmt.Errorf("worker %d of before the reload still there", p.PID)
						}
					}
				}
				return nil
			})
			waitAttackReports(t, rep, "", 4)
			// USR2: an upgrade of the real master.
			if err := syscall.Kill(u.Pid, syscall.SIGUSR2); err != nil {
				t.Fatal(err)
			}
			test.WaitLog(t, u.log, stepTimeout, 1, "USR2 forwarded to the master",
				test.Event("keeper.signal_forwarded", "signal", "SIGUSR2", "pid", strconv.Itoa(first)))
			second := u.waitTakeover(first)
			test.WaitLog(t, u.log, stepTimeout, 1, "the new master primary", test.Event("keeper.primary", "pid", strconv.Itoa(second)))
			attackers = waitAttackReports(t, rep, "", 6)
			l.stop(t)

			for _, ln := range test.Find(u.log, test.Event("keeper.primary")) {
				if p := ln.Str("pid"); p != strconv.Itoa(first) && p != strconv.Itoa(second) {
					t.Errorf("the keeper took pid %s as primary, not a master: %s", p, ln.Raw)
				}
			}
			if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
				t.Errorf("keeper exit %d after QUIT, want 0", code)
			}
			for _, p := range []int{first, second} {
				if test.Alive(p) {
					t.Errorf("master %d outlived the keeper's stop", p)
				}
			}
			if fileExists(filepath.Dir(keeperSock)) {
				t.Errorf("the keeper's socket directory %s outlived it", filepath.Dir(keeperSock))
			}
			test.CheckLogs(t, u.log)
		})
	}
}

// readyElapsed is how long the worker pid took to be ready, as the
// master logged it.
func readyElapsed(t *testing.T, log string, pid int) time.Duration {
	t.Helper()
	ln := test.WaitLog(t, log, stepTimeout, 1, fmt.Sprintf("worker %d ready", pid), test.Event("worker.ready", "pid", strconv.Itoa(pid)))[0]
	d, err := time.ParseDuration(ln.Str("elapsed"))
	if err != nil {
		t.Fatalf("worker.ready elapsed: %s", ln.Raw)
	}
	return d
}

// startedByTTIN sends TTIN and returns the pid of the worker it started.
func startedByTTIN(t *testing.T, m *master, slot int) int {
	t.Helper()
	m.Signal(syscall.SIGTTIN)
	ln := test.WaitLog(t, m.log, stepTimeout, 1, fmt.Sprintf("worker %d started", slot), test.Event("worker.started", "worker", strconv.Itoa(slot)))
	return ln[0].Int("pid")
}

// TestTrustNotify_FloodDelaysNoSibling (issue 11, 4): while a new worker
// starts (TTIN) under load, worker 0's child sends at least 2,000
// datagrams of 253 fds each to the new worker's socket (and its own), and
// a process of another uid does the same at every worker socket. The
// stranger cannot send at all (EACCES: the sockets are 0600); the
// sibling's reader drops the worker's flood. The new worker is ready in
// about the time the one before the flood took (bounded: 2 s more),
// none is killed by the watchdog, the master's fd count stays flat, the
// log has a few notify.rejected lines whose counts add up, and no
// request fails.
func TestTrustNotify_FloodDelaysNoSibling(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the stranger runs as another uid")
	python, script, reports := attackScript(t)
	gate := filepath.Join(reports, "go")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--watchdog", "1s", "--", python, script, "flood", reports, bins.fakeapp, gate}})
	addr := m.addr()
	m.waitServing()
	w0 := m.waitWorkers(1)[0]
	dir := filepath.Dir(notifyAddrOf(t, w0))
	base := readyElapsed(t, m.log, startedByTTIN(t, m, 1))
	m.waitWorkers(2)
	fdsBefore := fdCount(t, m.Pid)
	l := startLoad(t, addr)

	// The stranger: uid 65533, no group of root's.
	stranger := exec.Command(python, script, "stranger", reports, dir)
	stranger.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65533, Gid: 65533}}
	out, err := os.Create(filepath.Join(reports, "stranger.out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	stranger.Stdout, stranger.Stderr = out, out
	// The master's fd count, sampled all through the floods.
	maxFDs, sampled := 0, make(chan struct{})
	stopSampling := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			// Not fdCount: t.Fatal must not run outside the test's goroutine.
			ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", m.Pid))
			if n := len(ents); n > maxFDs {
				maxFDs = n
			}
			select {
			case <-stopSampling:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	if err := os.WriteFile(gate, nil, 0o644); err != nil { // worker 0's child starts its flood
		t.Fatal(err)
	}
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	test.Track(t, stranger.Process.Pid)
	strangerDone := make(chan error, 1)
	go func() { strangerDone <- stranger.Wait() }()

	sibling := startedByTTIN(t, m, 2)
	flooded := readyElapsed(t, m.log, sibling)
	os.WriteFile(gate+".stop", nil, 0o644)
	test.WaitFor(t, 60*time.Second, "the floods over", func() error {
		select {
		case err := <-strangerDone:
			if err != nil {
				t.Errorf("the stranger: %v", err)
			}
			strangerDone <- nil
		default:
			return fmt.Errorf("the stranger still floods")
		}
		if fl, _ := filepath.Glob(filepath.Join(reports, "flood-*.json")); len(fl) == 0 {
			return fmt.Errorf("the worker's child still floods")
		}
		return nil
	})
	close(stopSampling)
	<-sampled
	t.Logf("ready in %v before the flood, %v under it; master fds %d before, %d at most during", base, flooded, fdsBefore, maxFDs)
	if flooded > base+2*time.Second {
		t.Errorf("the new worker took %v to be ready under the flood, %v without", flooded, base)
	}
	// Each new worker adds a notify socket and a pidfd; 253 fds per
	// datagram would add hundreds.
	if maxFDs > fdsBefore+8 {
		t.Errorf("master fds rose from %d to %d during the flood", fdsBefore, maxFDs)
	}

	fl := waitAttackReports(t, reports, "flood-", 1)[0]
	st := waitAttackReports(t, reports, "stranger-", 1)[0]
	t.Logf("worker 0's child sent %v; the stranger %v", fl.Counts, st.Counts)
	sibSock := notifyAddrOf(t, sibling)
	if n := fl.Counts[sibSock]["sent"]; n < 2000 {
		t.Errorf("worker 0's child sent %d datagrams to the new worker's socket, want 2000 or more: %v", n, fl.Counts)
	}
	if len(st.Counts) < 3 {
		t.Errorf("the stranger found %d sockets, want the 3 workers': %v", len(st.Counts), st.Counts)
	}
	for sock, c := range st.Counts {
		if c["sent"] != 0 || c["EACCES"] < 2000 {
			t.Errorf("the stranger (uid %d) at %s: %v, want only EACCES", st.Uid, sock, c)
		}
	}

	l.stop(t)
	lines := waitRejected(t, m.log, fl.Counts[sibSock]["sent"], "")
	t.Logf("%d notify.rejected lines", len(lines))
	if len(lines) > 8 {
		t.Errorf("%d notify.rejected lines for one flood, want a few", len(lines))
	}
	if ws := test.Find(m.log, test.Event("watchdog.expired")); len(ws) > 0 {
		t.Errorf("the watchdog killed a worker during the flood: %v", ws[0].Raw)
	}
	if got := statusOf(t, m.pidFile); len(got.Procs) != 3 {
		t.Errorf("%d workers after the flood, want 3: %+v", len(got.Procs), got.Procs)
	}
	m.stop()
}

// TestTrustNotify_SiblingCannotSpeakForAnother (issue 11, 5): under load,
// worker 1's child tries to join worker 0's process group (EPERM: another
// session) and sends STATUS=, READY=1, WATCHDOG=1, MOLT_RECYCLE=1 and
// STOPPING=1 to worker 0's socket. Worker 0's reader drops all five
// (notify.rejected, from the child's pid): worker 0 keeps its pid, its
// state and its (empty) status, nothing is recycled or replaced.
func TestTrustNotify_SiblingCannotSpeakForAnother(t *testing.T) {
	t.Parallel()
	python, script, reports := attackScript(t)
	gate := filepath.Join(reports, "go")
	m, addr, workers := startSteady(t, 2, "--", python, script, "impersonate", reports, bins.fakeapp, gate)
	before := statusOf(t, m.pidFile)
	l := startLoad(t, addr)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r := waitAttackReports(t, reports, "impersonate-", 1)[0]
	if !slices.Contains(workers, r.Sibling) || r.Sibling == r.Worker {
		t.Fatalf("the child of worker %d attacked %d, want the other of %v", r.Worker, r.Sibling, workers)
	}
	if r.Setpgid != "EPERM" {
		t.Errorf("setpgid into worker %d's group: %s, want EPERM", r.Sibling, r.Setpgid)
	}
	for i, s := range r.Sent {
		if s != "sent" {
			t.Errorf("message %d to %s: %s, want sent (and dropped by its reader)", i, r.Target, s)
		}
	}
	waitRejected(t, m.log, len(r.Sent), strconv.Itoa(r.Pid))
	l.stop(t)

	after := statusOf(t, m.pidFile)
	if fmt.Sprint(after.Procs) != fmt.Sprint(before.Procs) {
		t.Errorf("workers changed from %+v to %+v", before.Procs, after.Procs)
	}
	for _, p := range after.Procs {
		if p.PID == r.Sibling && (p.State != "ready" || p.Status != "") {
			t.Errorf("worker %d: state %s, status %q: the sibling spoke for it", p.PID, p.State, p.Status)
		}
	}
	if got := m.workers(); fmt.Sprint(got) != fmt.Sprint(workers) {
		t.Errorf("workers %v, want still %v", got, workers)
	}
	for _, ev := range []string{"worker.stopping", "recycle.started"} {
		if len(test.Find(m.log, test.Event(ev))) > 0 {
			t.Errorf("the log shows %s", ev)
		}
	}
	m.stop()
}
