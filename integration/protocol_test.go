package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

// fakeReport is what "fakeapp serve --report DIR" writes at start.
type fakeReport struct {
	Pid int
	FDs []struct {
		FD       int
		Target   string
		NonBlock bool
		CloExec  bool
	}
	Env    []string
	Cwd    string
	Umask  string
	Uid    int
	Gid    int
	Groups []int
	// NoNewPrivs is the worker's /proc/self/status NoNewPrivs.
	NoNewPrivs string
	// Tampered is what "fakeapp serve --tamper" did.
	Tampered []string
	// GOMAXPROCS is the worker's runtime.GOMAXPROCS(0).
	GOMAXPROCS int
}

func (r fakeReport) env(k string) (string, bool) {
	for _, kv := range r.Env {
		if key, v, _ := strings.Cut(kv, "="); key == k {
			return v, true
		}
	}
	return "", false
}

func readReports(t *testing.T, dir string) map[int]fakeReport {
	t.Helper()
	out := map[int]fakeReport{}
	files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var r fakeReport
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out[r.Pid] = r
	}
	return out
}

// TestProtocol_WorkerGetsExactlyTheDocumentedFDsAndEnvironment: two named
// listeners; every worker (first ones and a respawned one) starts with
// fds 0-2, the listeners at 3 and 4 in flag order, still non-blocking,
// and the parent pipe at 5, nothing else inheritable; its environment has
// the protocol's variables with LISTEN_PID its own pid, and nothing of
// molt's or tableflip's plumbing. Both listeners serve.
func TestProtocol_WorkerGetsExactlyTheDocumentedFDsAndEnvironment(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	reports := filepath.Join(dir, "reports")
	os.Mkdir(reports, 0o755)
	m := start(t, runOpts{Dir: dir,
		Args: []string{"--listen", "web=127.0.0.1:0", "--listen", "admin=127.0.0.1:0", "--workers", "2", "--drain-timeout", "7s", "--worker-stop-signal", "INT", "--", bins.fakeapp, "serve", "--report", reports}})
	addrs := m.addrs(2)
	m.waitServing()
	first := m.waitWorkers(2)
	syscall.Kill(first[0], syscall.SIGKILL)
	var workers []int
	test.WaitFor(t, stepTimeout, "a respawned worker", func() error {
		workers = m.waitWorkers(2)
		if slices.Contains(workers, first[0]) {
			return fmt.Errorf("not replaced yet")
		}
		return nil
	})
	reps := readReports(t, reports)
	notifySockets := map[string]bool{}
	for _, pid := range append(workers, first[0]) {
		r, ok := reps[pid]
		if !ok {
			t.Fatalf("no report from worker %d (have %v)", pid, reps)
		}
		var inheritable []string
		for _, fd := range r.FDs {
			if !fd.CloExec { // what survived the exec; the Go runtime's own fds are close-on-exec
				inheritable = append(inheritable, fmt.Sprintf("%d", fd.FD))
			}
			switch {
			case fd.FD == 0 && fd.Target != "/dev/null":
				t.Errorf("worker %d: stdin is %s, want /dev/null", pid, fd.Target)
			case (fd.FD == 1 || fd.FD == 2) && fd.Target != m.workerLog:
				t.Errorf("worker %d: fd %d is %s, want the workers' log %s (never molt's log)", pid, fd.FD, fd.Target, m.workerLog)
			case fd.FD == 3 || fd.FD == 4:
				if !strings.HasPrefix(fd.Target, "socket:") || !fd.NonBlock {
					t.Errorf("worker %d: fd %d is %s nonblock=%v, want a non-blocking socket", pid, fd.FD, fd.Target, fd.NonBlock)
				}
			case fd.FD == 5 && !strings.HasPrefix(fd.Target, "pipe:"):
				t.Errorf("worker %d: fd 5 is %s, want the parent pipe", pid, fd.Target)
			case fd.FD == 6 && !strings.HasPrefix(fd.Target, "/memfd:molt-accept-table"):
				t.Errorf("worker %d: fd 6 is %s, want the accept table", pid, fd.Target)
			}
		}
		if got := strings.Join(inheritable, ","); got != "0,1,2,3,4,5,6" {
			t.Errorf("worker %d started with fds %s, want exactly 0,1,2,3,4,5,6", pid, got)
		}
		want := map[string]string{
			"LISTEN_PID": strconv.Itoa(pid), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin",
			"MOLT_PARENT_FD": "5", "MOLT_MASTER_PID": strconv.Itoa(m.Pid), "MOLT_STOP_SIGNAL": "INT",
			"MOLT_DRAIN_TIMEOUT": "7s", "MOLT_ACCEPT_TABLE": "6",
		}
		for k, v := range want {
			if got, _ := r.env(k); got != v {
				t.Errorf("worker %d: %s=%q, want %q", pid, k, got, v)
			}
		}
		// A socket of its own: a path, 0600, in the master's private
		// directory (0711); removed once the worker is gone.
		ns, _ := r.env("NOTIFY_SOCKET")
		if !strings.HasPrefix(ns, "/") || notifySockets[ns] {
			t.Errorf("worker %d: NOTIFY_SOCKET=%q, want a path of its own", pid, ns)
		}
		notifySockets[ns] = true
		fi, err := os.Lstat(ns)
		switch {
		case !slices.Contains(workers, pid):
			if !errors.Is(err, os.ErrNotExist) {
				t.Errorf("worker %d is gone but its notify socket %s is still there (%v)", pid, ns, err)
			}
		case err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600:
			t.Errorf("worker %d: NOTIFY_SOCKET %s: %v %v, want a 0600 socket", pid, ns, fi, err)
		default:
			if di, err := os.Stat(filepath.Dir(ns)); err != nil || di.Mode().Perm() != 0o711 {
				t.Errorf("worker %d: NOTIFY_SOCKET's directory: %v %v, want 0711", pid, di, err)
			}
		}
		if w, _ := r.env("MOLT_WORKER"); w != "0" && w != "1" {
			t.Errorf("worker %d: MOLT_WORKER=%q", pid, w)
		}
		for _, kv := range r.Env {
			if strings.HasPrefix(kv, "TABLEFLIP_") || strings.HasPrefix(kv, "MOLT_ROLE") || strings.HasPrefix(kv, "MOLT_EXEC_PATH") || strings.HasPrefix(kv, "WATCHDOG_") {
				t.Errorf("worker %d sees %s", pid, kv)
			}
		}
	}
	// The master's own copies of the sockets are still non-blocking.
	for name, a := range addrs {
		r := get(t, a, "/")
		if r.Header.Get("X-Fakeapp-Listener") != name || r.Header.Get("X-Fakeapp-Names") != "web:admin" {
			t.Errorf("listener %s at %s answered as %q (names %q)", name, a, r.Header.Get("X-Fakeapp-Listener"), r.Header.Get("X-Fakeapp-Names"))
		}
	}
	checkMasterSocketsNonBlocking(t, m.Pid)
	m.stop(test.Event("worker.exited_unexpectedly"))
}

// checkMasterSocketsNonBlocking reads the flags of the master's socket fds
// from /proc/<pid>/fdinfo: the open file description is shared with every
// worker, so a master that switched it to blocking mode would break every
// worker's drain.
func checkMasterSocketsNonBlocking(t *testing.T, pid int) {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if !strings.HasPrefix(target, "socket:") {
			continue
		}
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				fl, _ := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
				if fl&unix.O_NONBLOCK == 0 {
					t.Errorf("master fd %s (%s) is blocking (flags %o)", e.Name(), target, fl)
				}
				n++
			}
		}
	}
	if n == 0 {
		t.Error("no socket fd found in the master")
	}
}

// TestProtocol_UnixSocketListener: a unix-socket listener with
// --socket-mode serves, and its path is removed when the master stops.
func TestProtocol_UnixSocketListener(t *testing.T) {
	t.Parallel()
	path := filepath.Join(test.ShortTempDir(t), "app.sock")
	m := start(t, runOpts{Args: []string{"--listen", "unix:" + path, "--socket-mode", "0660", "--workers", "2"}})
	addr := m.addr()
	if addr != "unix:"+path {
		t.Fatalf("listening on %s, want unix:%s", addr, path)
	}
	m.waitServing()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket file: %v %v, want a socket with mode 0660", fi, err)
	}
	get(t, addr, "/")
	m.stop()
	if _, err := os.Stat(path); err == nil {
		t.Error("unix socket path left after the last master stopped")
	}
}

// TestProtocol_PythonWorker: a program not written in Go, using the
// socket-activation variables and sending READY=1 itself or through
// systemd-notify, works as a worker unchanged.
func TestProtocol_PythonWorker(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	for _, variant := range []string{"self", "systemd-notify"} {
		t.Run(variant, func(t *testing.T) {
			args := []string{"--listen", "py=127.0.0.1:0", "--workers", "2", "--", "python3", app}
			if variant == "systemd-notify" {
				test.RequireCommand(t, "systemd-notify")
				args = append(args, "--systemd-notify")
			}
			m := start(t, runOpts{Args: args})
			addr := m.addr()
			m.waitServing()
			workers := m.waitWorkers(2)
			r := get(t, addr, "/")
			if r.Header.Get("X-Molt-App") != "python" || !slices.Contains(workers, r.WorkerPid()) || !strings.Contains(r.Body, "listeners py") {
				t.Errorf("answer %v %q: want the python app, one of %v, listener py", r.Header, r.Body, workers)
			}
			for _, l := range test.Find(m.log, test.Event("worker.ready")) {
				if l.Str("how") != "notify" {
					t.Errorf("ready line %s: want how=notify", l.Raw)
				}
			}
			m.stop()
		})
	}
}

// TestProtocol_NotifyFromAStrangerIsIgnored: READY=1 from a process that is
// no worker of the master (the test itself) changes nothing and is logged.
func TestProtocol_NotifyFromAStrangerIsIgnored(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	reports := filepath.Join(dir, "reports")
	os.Mkdir(reports, 0o755)
	m := start(t, runOpts{Dir: dir,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--", bins.fakeapp, "serve", "--no-notify", "--report", reports}})
	m.addr()
	var sock string
	test.WaitFor(t, stepTimeout, "a worker report", func() error {
		for _, r := range readReports(t, reports) {
			sock, _ = r.env("NOTIFY_SOCKET")
		}
		if sock == "" {
			return fmt.Errorf("no report yet")
		}
		return nil
	})
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte("READY=1"), 0, &unix.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	waitRejected(t, m.log, 1, strconv.Itoa(os.Getpid()))
	if len(test.Find(m.log, test.Event("worker.ready"))) != 0 {
		t.Error("a stranger's READY=1 made a worker ready")
	}
	m.stop()
}

// TestProtocol_WorkersShareTheCPUsInGOMAXPROCS: where the user sets no
// GOMAXPROCS, each Go worker runs with the CPUs shared out among the
// --workers (at least 1); --env GOMAXPROCS=N is kept as it is.
func TestProtocol_WorkersShareTheCPUsInGOMAXPROCS(t *testing.T) {
	t.Parallel()
	want := strconv.Itoa(max(1, runtime.NumCPU()/2))
	if v, ok := os.LookupEnv("GOMAXPROCS"); ok {
		want = v // molt inherits the test's, and passes it on
	}
	for _, c := range []struct {
		name string
		env  []string
		want string
	}{{"default", nil, want}, {"--env", []string{"--env", "GOMAXPROCS=3"}, "3"}} {
		reports := test.ShortTempDir(t)
		args := append([]string{"--listen", "127.0.0.1:0", "--workers", "2"}, c.env...)
		m := start(t, runOpts{Args: append(args, "--", bins.fakeapp, "serve", "--report", reports)})
		m.waitServing()
		m.waitWorkers(2)
		for pid, r := range waitReports(t, reports, 2) {
			if v, _ := r.env("GOMAXPROCS"); v != c.want {
				t.Errorf("%s: worker %d has GOMAXPROCS=%q, want %q", c.name, pid, v, c.want)
			}
			if n, _ := strconv.Atoi(c.want); r.GOMAXPROCS != n {
				t.Errorf("%s: worker %d runs with runtime.GOMAXPROCS %d, want %s", c.name, pid, r.GOMAXPROCS, c.want)
			}
		}
		m.stop()
	}
}
