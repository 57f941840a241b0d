package master

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseListen(t *testing.T) {
	tests := []struct {
		in                string
		name, net, addr   string
		blocking          bool
		wantErrContaining string
	}{
		{in: "127.0.0.1:8080", name: "l3", net: "tcp", addr: "127.0.0.1:8080"},
		{in: ":8080", name: "l3", net: "tcp", addr: ":8080"},
		{in: "[::1]:0", name: "l3", net: "tcp", addr: "[::1]:0"},
		{in: "localhost:80", name: "l3", net: "tcp", addr: "localhost:80"},
		{in: "web=127.0.0.1:80", name: "web", net: "tcp", addr: "127.0.0.1:80"},
		{in: "unix:/run/a.sock", name: "l3", net: "unix", addr: "/run/a.sock"},
		{in: "admin=unix:/run/a=b.sock", name: "admin", net: "unix", addr: "/run/a=b.sock"},
		{in: "unix:/tmp/x=y", name: "l3", net: "unix", addr: "/tmp/x=y"},
		{in: "127.0.0.1", wantErrContaining: "want host:port"},
		{in: "127.0.0.1:http", wantErrContaining: "not a number"},
		{in: "127.0.0.1:70000", wantErrContaining: "not a number"},
		{in: "::1:80", wantErrContaining: "want host:port"},
		{in: "[zz::1]:80", wantErrContaining: "not an IPv6 address"},
		{in: "unix:", wantErrContaining: "empty unix socket path"},
		{in: "unix:/" + strings.Repeat("x", 200), wantErrContaining: "longer than"},
		{in: "bad name=127.0.0.1:1", wantErrContaining: "listener name"},
		{in: "=127.0.0.1:1", wantErrContaining: "1 to 255"},
		{in: "web=127.0.0.1:80,blocking", name: "web", net: "tcp", addr: "127.0.0.1:80", blocking: true},
		{in: "[::1]:0,blocking", name: "l3", net: "tcp", addr: "[::1]:0", blocking: true},
		{in: "unix:/run/a,b.sock,blocking", name: "l3", net: "unix", addr: "/run/a,b.sock", blocking: true},
		{in: "unix:/run/a,b.sock", name: "l3", net: "unix", addr: "/run/a,b.sock"},
		{in: "127.0.0.1:80,nonblocking", wantErrContaining: `unknown listen option "nonblocking"`},
		{in: "127.0.0.1:80,blocking,blocking", wantErrContaining: "unknown listen option"},
	}
	for _, tt := range tests {
		got, err := ParseListen(tt.in, 3)
		if tt.wantErrContaining != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErrContaining) {
				t.Errorf("ParseListen(%q) error = %v, want one containing %q", tt.in, err, tt.wantErrContaining)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseListen(%q): %v", tt.in, err)
			continue
		}
		if got.Name != tt.name || got.Network != tt.net || got.Address != tt.addr || got.Blocking != tt.blocking {
			t.Errorf("ParseListen(%q) = %+v, want name=%s net=%s addr=%s blocking=%v", tt.in, got, tt.name, tt.net, tt.addr, tt.blocking)
		}
		if again, err := ParseListen(got.String(), 3); err != nil || again != got {
			t.Errorf("ParseListen(%q).String() = %q parses as %+v, %v", tt.in, got.String(), again, err)
		}
	}
}

func TestParseListeners_NamesAndDuplicates(t *testing.T) {
	specs, err := ParseListeners([]string{"127.0.0.1:0", "api=127.0.0.1:0", "unix:/tmp/s"})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range specs {
		names = append(names, s.Name)
	}
	if got := strings.Join(names, ","); got != "l0,api,l2" {
		t.Errorf("names = %s, want l0,api,l2 (default names follow flag order)", got)
	}
	for _, bad := range [][]string{
		{"a=127.0.0.1:1", "a=127.0.0.1:2"},
		{"127.0.0.1:1", "127.0.0.1:1"},
		{"l1=127.0.0.1:1", "127.0.0.1:2"}, // the second one's default name is l1
	} {
		if _, err := ParseListeners(bad); err == nil {
			t.Errorf("ParseListeners(%q) accepted a duplicate", bad)
		}
	}
}

func TestBind_KeepsNonBlockingAndCloseOnExec(t *testing.T) {
	f, fd := bindLoopback(t)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Error("listening socket is blocking: a worker's Close would no longer interrupt accept")
	}
	fdfl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if fdfl&unix.FD_CLOEXEC == 0 {
		t.Error("master's copy of the listener is not close-on-exec")
	}
	addr, err := localAddr(f)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v (the socket must still listen after the Go listener was closed)", addr, err)
	}
	c.Close()
}

func TestBind_Errors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = bind(ListenSpec{Name: "l0", Network: "tcp", Address: ln.Addr().String()}, 0)
	var be *BindError
	if !errors.As(err, &be) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("bind of a port in use: %v, want a *BindError wrapping EADDRINUSE", err)
	}
	dir := t.TempDir()
	notSock := filepath.Join(dir, "file")
	os.WriteFile(notSock, nil, 0o644)
	if _, err := bind(ListenSpec{Name: "u", Network: "unix", Address: notSock}, 0); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("bind over a regular file: %v, want 'not a socket'", err)
	}
}

func TestBindUnix_StaleAndLive(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	// A stale socket file: bound, then its listener closed without unlink.
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	f, err := bind(ListenSpec{Name: "u", Network: "unix", Address: path}, 0o600)
	if err != nil {
		t.Fatalf("bind over a stale socket: %v", err)
	}
	defer f.Close()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v (err %v), want 0600", fi.Mode().Perm(), err)
	}
	// Now the path is live: a second bind must refuse, not steal it.
	_, err = bind(ListenSpec{Name: "u2", Network: "unix", Address: path}, 0)
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("bind over a live socket: %v, want EADDRINUSE", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the live socket's path was removed: %v", err)
	}
}

func FuzzParseListen(f *testing.F) {
	for _, s := range []string{"127.0.0.1:80", "web=:8080", "unix:/tmp/a.sock", "[::1]:0", "a=unix:/x=y", "=", "unix:", "[::1", "x=y=z:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseListen(s, 0)
		if err != nil {
			return
		}
		if validName(spec.Name) != nil {
			t.Fatalf("%q: accepted name %q", s, spec.Name)
		}
		switch spec.Network {
		case "unix":
			if spec.Address == "" {
				t.Fatalf("%q: empty unix path", s)
			}
		case "tcp":
			if _, _, err := net.SplitHostPort(spec.Address); err != nil {
				t.Fatalf("%q: accepted %q: %v", s, spec.Address, err)
			}
		default:
			t.Fatalf("%q: network %q", s, spec.Network)
		}
	})
}

func TestSpecMatches(t *testing.T) {
	for _, c := range []struct {
		network, spec, addr string
		want                bool
	}{
		{"tcp", "127.0.0.1:0", "127.0.0.1:41000", true},
		{"tcp", "127.0.0.1:8080", "127.0.0.1:8080", true},
		{"tcp", "127.0.0.1:8081", "127.0.0.1:8080", false},
		{"tcp", "127.0.0.2:8080", "127.0.0.1:8080", false},
		{"tcp", ":8080", "[::]:8080", true},
		{"tcp", ":8080", "0.0.0.0:8080", true},
		{"tcp", ":8080", "127.0.0.1:8080", false},
		{"tcp", "[::1]:8080", "[::1]:8080", true},
		{"tcp", "localhost:8080", "127.0.0.1:8080", true},
		{"tcp", "127.0.0.1:http", "127.0.0.1:80", true},
		{"unix", "/run/a.sock", "/run/a.sock", true},
		{"unix", "/run/b.sock", "/run/a.sock", false},
	} {
		if got := specMatches(ListenSpec{Name: "x", Network: c.network, Address: c.spec}, c.addr); got != c.want {
			t.Errorf("specMatches(%s %s, %s) = %v, want %v", c.network, c.spec, c.addr, got, c.want)
		}
	}
}

// TestUnixShutDown: a unix listener shut down for reading refuses every
// connect while it still says it listens; unixShutDown sees exactly that
// case, not a shutdown for writing (which refuses nothing).
func TestUnixShutDown(t *testing.T) {
	for _, c := range []struct {
		how     int
		name    string
		refused bool
	}{
		{-1, "none", false},
		{unix.SHUT_WR, "SHUT_WR", false},
		{unix.SHUT_RD, "SHUT_RD", true},
		{unix.SHUT_RDWR, "SHUT_RDWR", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.sock")
			f, err := bind(ListenSpec{Name: "u", Network: "unix", Address: path}, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			fd, err := rawFD(f)
			if err != nil {
				t.Fatal(err)
			}
			if c.how >= 0 {
				if err := unix.Shutdown(fd, c.how); err != nil {
					t.Fatal(err)
				}
			}
			conn, derr := net.Dial("unix", path)
			if derr == nil {
				conn.Close()
			}
			if refused := errors.Is(derr, syscall.ECONNREFUSED); refused != c.refused {
				t.Fatalf("connect: %v, want refused %v", derr, c.refused)
			}
			if got := unixShutDown(fd); got != c.refused {
				t.Errorf("unixShutDown = %v, want %v", got, c.refused)
			}
			if acc, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); acc != 1 {
				t.Errorf("SO_ACCEPTCONN = %d: the kernel now shows the shutdown there; the heal check could use it", acc)
			}
		})
	}
}

// TestSwapUnix: after a shutdown, swapUnix binds a new socket at the path
// and turns every descriptor of the old one, at the same numbers, into the
// new one: the path answers, each descriptor listens on it, and no
// descriptor is added.
func TestSwapUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	spec := ListenSpec{Name: "u", Network: "unix", Address: path}
	f, err := bind(spec, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dup, err := dupListener(f, "dup") // as the handover keeps one for the next master
	if err != nil {
		t.Fatal(err)
	}
	defer dup.Close()
	fd, _ := rawFD(f)
	dfd, _ := rawFD(dup)
	if err := unix.Shutdown(fd, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	m := &Master{}
	if err := m.swapUnix(&listener{spec: spec, file: f}, fd); err != nil {
		t.Fatal(err)
	}
	// The descriptors of the new socket are exactly the two old numbers.
	var sock unix.Stat_t
	if err := unix.Fstat(fd, &sock); err != nil {
		t.Fatal(err)
	}
	var holders []int
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		var st unix.Stat_t
		if n, err := strconv.Atoi(e.Name()); err == nil && unix.Fstat(n, &st) == nil && st.Dev == sock.Dev && st.Ino == sock.Ino {
			holders = append(holders, n)
		}
	}
	slices.Sort(holders)
	if len(holders) != 2 || holders[0] != min(fd, dfd) || holders[1] != max(fd, dfd) {
		t.Errorf("the new socket is held by fds %v, want %d and %d", holders, fd, dfd)
	}
	for _, n := range []int{fd, dfd} {
		if unixShutDown(n) {
			t.Errorf("fd %d: still the shut-down socket", n)
		}
		if fl, _ := unix.FcntlInt(uintptr(n), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
			t.Errorf("fd %d: not close-on-exec", n)
		}
		if fl, _ := unix.FcntlInt(uintptr(n), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 {
			t.Errorf("fd %d: blocking", n)
		}
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("connect after the swap: %v", err)
	}
	defer c.Close()
	nfd, _, errno := unix.Syscall(unix.SYS_ACCEPT4, uintptr(dfd), 0, 0)
	if errno != 0 {
		t.Fatalf("accept on the registered duplicate: %v", errno)
	}
	unix.Close(int(nfd))
}

// TestSetBlocking: the mode is set through the raw fd, reported changed
// only when it was the other one, and read back by fcntl.
func TestSetBlocking(t *testing.T) {
	f, fd := bindLoopback(t)
	for _, step := range []struct{ blocking, changed bool }{{true, true}, {true, false}, {false, true}, {false, false}} {
		changed, err := setBlocking(f, step.blocking)
		if err != nil || changed != step.changed {
			t.Errorf("setBlocking(%v) = %v, %v; want changed %v", step.blocking, changed, err, step.changed)
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil || (fl&unix.O_NONBLOCK == 0) != step.blocking {
			t.Errorf("after setBlocking(%v): flags %#x, %v", step.blocking, fl, err)
		}
	}
}

// bindLoopback binds a TCP listener on 127.0.0.1:0, closed at the end of
// the test, and returns it with its raw descriptor.
func bindLoopback(t *testing.T) (*os.File, int) {
	t.Helper()
	f, err := bind(ListenSpec{Name: "l0", Network: "tcp", Address: "127.0.0.1:0"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fd, err := rawFD(f)
	if err != nil {
		t.Fatal(err)
	}
	return f, fd
}
