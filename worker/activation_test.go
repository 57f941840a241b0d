package worker

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

type activationReport struct {
	Names   []string          // sorted names of Listeners()
	Addrs   map[string]string // name -> address
	CloExec []bool            // fd 3.. after Files()
	Err     string
}

func init() {
	registerHelper("activation", func() int {
		var r activationReport
		lns, err := Listeners()
		if err != nil {
			r.Err = err.Error()
		}
		r.Addrs = map[string]string{}
		for name, l := range lns {
			r.Names = append(r.Names, name)
			r.Addrs[name] = l[0].Addr().String()
		}
		sort.Strings(r.Names)
		fs, _ := Files()
		for i := range fs {
			fl, _ := unix.FcntlInt(uintptr(ListenFDsStart+i), unix.F_GETFD, 0)
			r.CloExec = append(r.CloExec, fl&unix.FD_CLOEXEC != 0)
		}
		if _, err := Listener("nope"); err == nil || (len(fs) > 0 && !strings.Contains(err.Error(), "there are")) {
			r.Err += fmt.Sprintf(" Listener(nope) = %v", err)
		}
		json.NewEncoder(os.Stdout).Encode(r)
		return 0
	})
}

// rawFD returns c's descriptor without os.File.Fd (which would make the
// socket blocking).
func rawFDOf(t *testing.T, c syscall.Conn) uintptr {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd uintptr
	rc.Control(func(u uintptr) { fd = u })
	return fd
}

func runActivation(t *testing.T, env []string, lns ...net.Listener) activationReport {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	files := []uintptr{0, rawFDOf(t, w), 2}
	for _, l := range lns {
		files = append(files, rawFDOf(t, l.(syscall.Conn)))
	}
	p := startHelper(t, "activation", env, files)
	w.Close()
	var rep activationReport
	line, err := bufio.NewReader(r).ReadBytes('\n')
	if _, werr := p.Wait(); werr != nil {
		t.Fatal(werr)
	}
	if err != nil {
		t.Fatalf("helper said nothing: %v", err)
	}
	if err := json.Unmarshal(line, &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestListeners_ByNameInAChildLeavesTheSocketNonBlocking(t *testing.T) {
	web, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()
	admin, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	rep := runActivation(t, []string{"WORKER_TEST_FIX_PID=1", "LISTEN_FDS=2", "LISTEN_FDNAMES=web:admin"}, web, admin)
	if rep.Err != "" {
		t.Fatal(rep.Err)
	}
	if strings.Join(rep.Names, ",") != "admin,web" {
		t.Fatalf("names %v, want admin and web", rep.Names)
	}
	if rep.Addrs["web"] != web.Addr().String() || rep.Addrs["admin"] != admin.Addr().String() {
		t.Errorf("addresses %v, want web=%s admin=%s", rep.Addrs, web.Addr(), admin.Addr())
	}
	for i, ce := range rep.CloExec {
		if !ce {
			t.Errorf("fd %d not close-on-exec after Files()", ListenFDsStart+i)
		}
	}
	for _, l := range []net.Listener{web, admin} {
		fl, err := unix.FcntlInt(rawFDOf(t, l.(syscall.Conn)), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_NONBLOCK == 0 {
			t.Errorf("%s: the shared socket lost O_NONBLOCK in the child (flags %#x, %v)", l.Addr(), fl, err)
		}
	}
}

// TestListeners_RefusesABlockingSocketAndLeavesItBlocking: a listener in
// blocking mode (molt's ",blocking" option) makes Listeners fail with an
// error that names it, and the shared socket stays blocking for the
// processes that accept on it in blocking mode.
func TestListeners_RefusesABlockingSocketAndLeavesItBlocking(t *testing.T) {
	web, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()
	fd := rawFDOf(t, web.(syscall.Conn))
	if err := unix.SetNonblock(int(fd), false); err != nil {
		t.Fatal(err)
	}
	rep := runActivation(t, []string{"WORKER_TEST_FIX_PID=1", "LISTEN_FDS=1", "LISTEN_FDNAMES=web"}, web)
	if !strings.Contains(rep.Err, `listener "web"`) || !strings.Contains(rep.Err, "blocking mode") {
		t.Errorf("Listeners error %q, want one naming web in blocking mode", rep.Err)
	}
	if len(rep.Names) != 0 {
		t.Errorf("Listeners returned %v", rep.Names)
	}
	if fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("the shared socket was switched to non-blocking in the child (flags %#x, %v)", fl, err)
	}
}

func TestListeners_NotForThisPID(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	rep := runActivation(t, []string{"LISTEN_PID=1", "LISTEN_FDS=1", "LISTEN_FDNAMES=web"}, l)
	if len(rep.Names) != 0 || rep.Err != "" {
		t.Errorf("LISTEN_PID of another process: got %v (%s), want no listener and no error", rep.Names, rep.Err)
	}
}

func TestActivationNames(t *testing.T) {
	self := func(pid int) bool { return pid == os.Getpid() }
	me := strconv.Itoa(os.Getpid())
	for _, c := range []struct {
		pid, fds, names string
		want            string // the names joined by ","; "nil" for none
		wantErr         string
	}{
		{pid: "", want: "nil"},
		{pid: "1", fds: "2", want: "nil"},
		{pid: me, fds: "2", names: "web", want: "web,unknown"},
		{pid: me, fds: "0", want: ""},
		{pid: "x", wantErr: "LISTEN_PID=\"x\" is not a pid"},
		{pid: me, fds: "-1", wantErr: "is not a count"},
		{pid: me, fds: "5000", wantErr: "is not a count"},
		{pid: me, fds: "1", names: "a:b", wantErr: "2 names for 1 fds"},
	} {
		t.Setenv(EnvListenPID, c.pid)
		t.Setenv(EnvListenFDs, c.fds)
		t.Setenv(EnvListenFDNames, c.names)
		names, err := ActivationNames(self)
		got := strings.Join(names, ",")
		if names == nil {
			got = "nil"
		}
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%+v: error %v, want %q", c, err, c.wantErr)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%+v: %q, %v; want %q", c, got, err, c.want)
		}
	}
}
