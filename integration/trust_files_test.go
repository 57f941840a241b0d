package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Issue 11 "Trust boundaries", the files molt opens as root and its
// control socket: nothing another local user plants steers them, and the
// control socket outlives what a local process can do to it.

const nobodyID = 65534

// sharedDir makes a directory every user can write, with the sticky bit
// (as /tmp), inside a private temp dir; the private dir also holds a
// target file an attacker would aim at.
func sharedDir(t *testing.T) (shared, target string) {
	t.Helper()
	test.Require(t, "root", os.Geteuid() == 0, "the attacker's files are given to nobody (lchown)")
	dir := test.ShortTempDir(t)
	shared = filepath.Join(dir, "pub")
	if err := os.Mkdir(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	target = filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("precious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return shared, target
}

// plantSymlink makes path a symlink to target owned by nobody, as nobody
// would plant it.
func plantSymlink(t *testing.T, target, path string) {
	t.Helper()
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(path, nobodyID, nobodyID); err != nil {
		t.Fatal(err)
	}
}

func checkUntouched(t *testing.T, target string) {
	t.Helper()
	b, err := os.ReadFile(target)
	if err != nil || string(b) != "precious\n" {
		t.Errorf("the attacker's target %s: %q, %v: want it untouched", target, b, err)
	}
	if fi, err := os.Stat(target); err == nil && fi.Mode().Perm() != 0o600 {
		t.Errorf("the attacker's target's mode changed to %v", fi.Mode())
	}
}

// TestTrustFiles_PlantedFilesAreRefused: in a world-writable sticky
// directory, nobody plants molt.pid.lock and --log-file as symlinks to a
// file of root's, and molt.sock as a regular file and as a stale socket of
// its own: molt refuses to start, naming the file and why, and the target
// is untouched. A stale socket of root's is replaced (a crash's leftover).
func TestTrustFiles_PlantedFilesAreRefused(t *testing.T) {
	t.Parallel()
	shared, target := sharedDir(t)
	private := test.ShortTempDir(t)
	run := func(args ...string) (int, string) {
		t.Helper()
		return runToEnd(t, private, bins.molt, append([]string{"run", "--no-keeper", "--listen", "127.0.0.1:0", "--workers", "1"}, args...)...)
	}
	for _, c := range []struct {
		name, plant string
		args        []string
		want        []string
	}{
		{"lock file", "molt.pid.lock", []string{"--pid-file", filepath.Join(shared, "molt.pid")}, []string{"is a symlink in a directory others can write"}},
		{"log file", "molt.log", []string{"--pid-file", filepath.Join(private, "molt.pid"), "--log-file", filepath.Join(shared, "molt.log")}, []string{"log file", "is a symlink in a directory others can write"}},
	} {
		path := filepath.Join(shared, c.plant)
		plantSymlink(t, target, path)
		code, out := run(c.args...)
		if code == 0 {
			t.Errorf("%s: molt started through a planted symlink\n%s", c.name, out)
		}
		for _, w := range append(c.want, path) {
			if !strings.Contains(out, w) {
				t.Errorf("%s: exit %d, output lacks %q:\n%s", c.name, code, w, out)
			}
		}
		checkUntouched(t, target)
		if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Errorf("%s: the planted symlink was removed or replaced: %v", c.name, err)
		}
		os.Remove(path)
	}

	// molt.sock: a regular file of nobody's, then a stale socket of
	// nobody's. Neither is removed; the error names it.
	sock := filepath.Join(shared, "molt.sock")
	if err := os.WriteFile(sock, []byte("nobody's\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chown(sock, nobodyID, nobodyID)
	pid := []string{"--pid-file", filepath.Join(shared, "molt.pid")}
	if code, out := run(pid...); code == 0 || !strings.Contains(out, sock+" exists and is not a socket") {
		t.Errorf("planted regular molt.sock: exit %d:\n%s", code, out)
	}
	if b, _ := os.ReadFile(sock); string(b) != "nobody's\n" {
		t.Errorf("the planted file was changed: %q", b)
	}
	os.Remove(sock)
	staleSocket(t, sock, nobodyID)
	if code, out := run(pid...); code == 0 || !strings.Contains(out, "refuse "+sock+": it is a socket of uid 65534") {
		t.Errorf("nobody's stale molt.sock: exit %d:\n%s", code, out)
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("nobody's socket was removed: %v", err)
	}
	os.Remove(sock)
	if fileExists(filepath.Join(shared, "molt.pid")) {
		t.Error("a refused master wrote a pid file")
	}

	// Root's stale socket is molt's own leftover: replaced, and molt
	// serves, with a warning about the shared directory.
	staleSocket(t, sock, 0)
	m := start(t, runOpts{Dir: private,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", filepath.Join(shared, "molt.pid")}})
	m.pidFile = filepath.Join(shared, "molt.pid")
	get(t, m.addr(), "/")
	test.WaitLog(t, m.log, stepTimeout, 1, "the shared directory's warning", test.Event("files.shared_dir", "path", m.pidFile))
	if fi, err := os.Lstat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket: %v, %v: want mode 0600", fi.Mode(), err)
	}
	if fi, err := os.Stat(m.pidFile + ".lock"); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("lock file: %v: want mode 0600 (anyone who can read it can flock it)", err)
	}
	if code, out := ctl(t, m.pidFile, "status"); code != 0 {
		t.Errorf("molt ctl status: exit %d: %s", code, out)
	}
	m.stop()
}

// staleSocket leaves a unix socket file at path that nothing accepts on,
// owned by uid.
func staleSocket(t *testing.T, path string, uid int) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if err := os.Lchown(path, uid, uid); err != nil {
		t.Fatal(err)
	}
}

// TestTrustFiles_LogFileSymlinkedAfterRotation: a running master logs to
// a file in a shared directory; after a rotation moved it away, nobody
// plants a symlink at its name. USR1 refuses to reopen through it (the
// old file stays in use), and an upgrade's new master refuses to start
// with it (rolled back): the target is untouched and the service never
// fails a request.
func TestTrustFiles_LogFileSymlinkedAfterRotation(t *testing.T) {
	t.Parallel()
	shared, target := sharedDir(t)
	logPath := filepath.Join(shared, "molt.log")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--log-file", logPath, "--ready-timeout", "5s"}})
	m.log = logPath // the last --log-file counts
	addr := m.addr()
	m.waitServing()
	workers := m.waitWorkers(2)
	l := startLoad(t, addr)

	rotated := logPath + ".1"
	if err := os.Rename(logPath, rotated); err != nil {
		t.Fatal(err)
	}
	m.log = rotated // where the master goes on writing
	plantSymlink(t, target, logPath)
	m.Signal(syscall.SIGUSR1)
	lines := test.WaitLog(t, m.log, stepTimeout, 1, "the refused reopen", test.Event("log.reopen_failed"))
	if e := lines[0].Str("error"); !strings.Contains(e, logPath) || !strings.Contains(e, "symlink") {
		t.Errorf("reopen error %q: want one naming %s as a symlink", e, logPath)
	}
	m.Signal(syscall.SIGUSR2)
	test.WaitLog(t, m.log, 60*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	checkUntouched(t, target)
	if now := m.waitWorkers(2); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("workers changed from %v to %v", workers, now)
	}
	if got := m.current(); got != m.Pid {
		t.Errorf("molt.pid names %d, want %d", got, m.Pid)
	}
	if fileExists(m.pidFile + ".oldbin") {
		t.Error("molt.pid.oldbin left after the rollback")
	}
	test.WaitLog(t, m.log, stepTimeout, 1, "the shared directory's warning", test.Event("files.shared_dir", "path", logPath))
	l.stop(t)
	m.stop(test.Event("log.reopen_failed"), test.Event("upgrade.rolled_back"))
}

// fdLimit is a process's RLIMIT_NOFILE as prlimit sets it.
type fdLimit struct{ soft, hard string }

func nofile(t *testing.T, pid int) fdLimit {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(strings.TrimPrefix(line, "Max open files")); strings.HasPrefix(line, "Max open files") && len(f) >= 2 {
			return fdLimit{f[0], f[1]}
		}
	}
	t.Fatalf("no open-files limit in /proc/%d/limits", pid)
	return fdLimit{}
}

func setNofile(t *testing.T, prlimit string, pid int, l fdLimit) {
	t.Helper()
	if out, err := exec.Command(prlimit, "--pid", strconv.Itoa(pid), "--nofile="+l.soft+":"+l.hard).CombinedOutput(); err != nil {
		t.Fatalf("prlimit: %v: %s", err, out)
	}
}

// lowestFreeFD is the descriptor number pid's next open would get: a
// limit at it makes that open fail with EMFILE.
func lowestFreeFD(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, e := range ents {
		n, _ := strconv.Atoi(e.Name())
		fds = append(fds, n)
	}
	sort.Ints(fds)
	free := 0
	for _, fd := range fds {
		if fd == free {
			free++
		}
	}
	return free
}

// TestTrustFiles_ControlSocketSurvivesEMFILE: the master runs out of
// descriptors (its limit lowered under it), so accept on the control
// socket fails while molt ctl calls come in; the failures are logged, at
// most once per five seconds, the control socket answers again once the
// limit is raised, and the service serves under load throughout.
func TestTrustFiles_ControlSocketSurvivesEMFILE(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the test sets the limits of a master that runs as root")
	prlimit := test.RequireCommand(t, "prlimit")
	m, addr, workers := startSteady(t, 2)
	l := startLoad(t, addr)
	orig := nofile(t, m.Pid)
	// The soft limit only: raising a hard limit again needs
	// CAP_SYS_RESOURCE, which a container's root may lack.
	setNofile(t, prlimit, m.Pid, fdLimit{strconv.Itoa(lowestFreeFD(t, m.Pid)), orig.hard})
	start := time.Now()
	restored := false
	defer func() {
		if !restored {
			setNofile(t, prlimit, m.Pid, orig)
		}
	}()
	for range 3 {
		out, err := exec.Command(bins.molt, "ctl", "--pid-file", m.pidFile, "--timeout", "1500ms", "status").CombinedOutput()
		if err == nil {
			t.Fatalf("molt ctl status answered with the master out of fds:\n%s", out)
		}
	}
	lines := test.WaitLog(t, m.log, stepTimeout, 1, "the failed accept logged", test.Event("control.accept_failed"))
	if e := lines[0].Str("error"); !strings.Contains(e, "too many open files") {
		t.Errorf("accept error %q, want EMFILE", e)
	}
	elapsed := time.Since(start)
	setNofile(t, prlimit, m.Pid, orig)
	restored = true
	// Accept is retried at least once a second: unlimited, that would be
	// a line per retry.
	if n, most := len(test.Find(m.log, test.Event("control.accept_failed"))), int(elapsed/(5*time.Second))+2; n > most {
		t.Errorf("%d accept_failed lines in %v: want at most %d (rate-limited)", n, elapsed.Round(time.Millisecond), most)
	}
	test.WaitFor(t, stepTimeout, "molt ctl status to answer again", func() error {
		_, err := tryStatus(t, m.pidFile)
		return err
	})
	test.WaitLog(t, m.log, stepTimeout, 1, "the recovery logged", test.Event("control.accept_recovered"))
	l.stop(t)
	if now := m.workers(); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("workers changed from %v to %v", workers, now)
	}
	m.stop()
}

// TestTrustFiles_ControlSocketCapAndDeadlines: a local process opens as
// many idle connections to the control socket as it serves at once. A
// real molt ctl call is told "busy" at once (not left hanging); each idle
// connection gets an error and is closed at the read deadline; then molt
// ctl answers again. The service serves under load throughout.
func TestTrustFiles_ControlSocketCapAndDeadlines(t *testing.T) {
	t.Parallel()
	const maxConns = 16 // master.maxCtlConns
	m, addr, _ := startSteady(t, 1)
	l := startLoad(t, addr)
	sock := filepath.Join(m.dir, "molt.sock")
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	for range maxConns {
		c, err := net.DialTimeout("unix", sock, reqTimeout)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	opened := time.Now()
	start := time.Now()
	code, out := ctl(t, m.pidFile, "status")
	if code != 1 || !strings.Contains(out, "busy") {
		t.Errorf("molt ctl status with the control socket full: exit %d, want 1 and a busy error:\n%s", code, out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the busy answer took %v", d)
	}
	test.WaitLog(t, m.log, stepTimeout, 1, "the busy refusal logged", test.Event("control.busy"))
	for i, c := range idle {
		c.SetReadDeadline(time.Now().Add(stepTimeout + 10*time.Second))
		reply, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("idle connection %d not closed by the master: %v", i, err)
			continue
		}
		if !strings.Contains(string(reply), "i/o timeout") || !strings.Contains(string(reply), `"done":true`) {
			t.Errorf("idle connection %d: reply %q, want a read-timeout error", i, reply)
		}
	}
	if d := time.Since(opened); d < 9*time.Second {
		t.Errorf("idle connections closed after %v, before the 10s read deadline", d)
	}
	if code, out := ctl(t, m.pidFile, "status"); code != 0 {
		t.Errorf("molt ctl status after the idle connections ended: exit %d:\n%s", code, out)
	}
	l.stop(t)
	m.stop()
}

// TestTrustFiles_CtlRefusesAServerOfAnotherUser: a control socket served
// by nobody (here a molt master nobody runs, at a path root's molt ctl is
// pointed at) is refused by root's molt ctl, which sends it nothing; the
// same molt ctl run as nobody talks to it.
func TestTrustFiles_CtlRefusesAServerOfAnotherUser(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the fake server runs as nobody")
	setpriv := test.RequireCommand(t, "setpriv")
	dir := test.ShortTempDir(t)
	if err := os.Chown(dir, nobodyID, nobodyID); err != nil {
		t.Fatal(err)
	}
	asNobody := []string{"--reuid=65534", "--regid=65534", "--clear-groups"}
	fake := test.Start(t, test.Opts{Path: setpriv, Dir: dir, Log: filepath.Join(test.ShortTempDir(t), "fake.out"),
		Args: append(asNobody, bins.molt, "run", "--no-keeper", "--listen", "127.0.0.1:0", "--workers", "1",
			"--pid-file", filepath.Join(dir, "molt.pid"), "--log-file", filepath.Join(dir, "molt.log"), "--log-json")})
	sock := filepath.Join(dir, "molt.sock")
	test.WaitLog(t, filepath.Join(dir, "molt.log"), startTimeout, 1, "nobody's master serving", test.Event("master.serving"))
	out, err := exec.Command(bins.molt, "ctl", "--socket", sock, "--timeout", "10s", "stop").CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	if code != 3 || !strings.Contains(string(out), "runs as uid 65534, neither root nor you") {
		t.Errorf("root's molt ctl against nobody's socket: exit %d, want 3 and a refusal:\n%s", code, out)
	}
	if got := test.Find(filepath.Join(dir, "molt.log"), test.Event("control.request")); len(got) > 0 {
		t.Errorf("the fake server got root's request: %s", got[0].Raw)
	}
	out, err = exec.Command(setpriv, append(asNobody, bins.molt, "ctl", "--socket", sock, "--timeout", "10s", "status")...).CombinedOutput()
	if err != nil {
		t.Errorf("nobody's molt ctl against nobody's master: %v:\n%s", err, out)
	}
	fake.Signal(quit)
	if code := fake.Wait(stepTimeout); code != 0 {
		t.Errorf("nobody's master exited %d", code)
	}
}

// TestTrustFiles_DeletedPIDFile: molt.pid deleted while molt runs does
// not stop an upgrade (molt ctl upgrade --wait commits, and the new
// master writes molt.pid); deleted again, with molt.pid.oldbin deleted
// during the next upgrade, which fails, the rollback writes molt.pid
// afresh. Under load, with no failed request.
func TestTrustFiles_DeletedPIDFile(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout", "10s", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	u.waitWorkers(2)
	l := startLoad(t, addr)
	if err := os.Remove(u.pidFile); err != nil {
		t.Fatal(err)
	}
	u.install(bins.molt2, byRename)
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("molt ctl upgrade --wait with molt.pid deleted: exit %d:\n%s", code, out)
	}
	test.WaitLog(t, u.log, stepTimeout, 1, "the missing pid file logged", test.Event("pidfile.missing", "path", u.pidFile))
	g2 := u.waitTakeover(u.Pid)
	if r := get(t, addr, "/"); r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(g2) {
		t.Errorf("answered by master %s, want %d", r.Header.Get("X-Molt-Master-Pid"), g2)
	}

	// The next version fails after molt.pid.oldbin is gone.
	if err := os.Remove(u.pidFile); err != nil {
		t.Fatal(err)
	}
	u.deployFile(passesPreflight+fmt.Sprintf(
		"i=0; while [ -e %q ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; exit 3\n", u.pidFile+".oldbin"), 0o755)
	if err := syscall.Kill(g2, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	test.WaitLog(t, u.log, stepTimeout, 2, "the second missing pid file logged", test.Event("pidfile.missing", "path", u.pidFile))
	if got := readPID(t, u.pidFile+".oldbin"); got != g2 {
		t.Errorf("molt.pid.oldbin written afresh names %d, want %d", got, g2)
	}
	if err := os.Remove(u.pidFile + ".oldbin"); err != nil {
		t.Fatal(err)
	}
	test.WaitLog(t, u.log, 60*time.Second, 1, "the pid file rewritten at the rollback", test.Event("pidfile.rewritten", "path", u.pidFile))
	if got := u.current(); got != g2 {
		t.Errorf("molt.pid after the rollback names %d, want %d", got, g2)
	}
	l.stop(t)
	u.stop(test.Event("upgrade.rolled_back"))
}
