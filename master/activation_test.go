package master

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMatchActivated(t *testing.T) {
	sock := func(fd int, name, network, addr string) *activatedSocket {
		return &activatedSocket{fd: fd, name: name, network: network, addr: addr}
	}
	spec := func(v string, i int) ListenSpec {
		s, err := ParseListen(v, i)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	tests := []struct {
		name    string
		specs   []ListenSpec
		socks   []*activatedSocket
		want    map[string]int // listener name -> fd
		wantErr string
	}{
		{
			name:  "by name, whatever the order",
			specs: []ListenSpec{spec("web=127.0.0.1:8080", 0), spec("admin=unix:/run/a.sock", 1)},
			socks: []*activatedSocket{sock(3, "admin", "unix", "/run/a.sock"), sock(4, "web", "tcp", "127.0.0.1:8080")},
			want:  map[string]int{"web": 4, "admin": 3},
		},
		{
			name:  "unnamed, by address",
			specs: []ListenSpec{spec("127.0.0.1:8080", 0), spec("127.0.0.1:9090", 1)},
			socks: []*activatedSocket{sock(3, "unknown", "tcp", "127.0.0.1:9090")},
			want:  map[string]int{"l1": 3}, // l0 is bound as usual
		},
		{
			name:  ":port takes the unspecified address only",
			specs: []ListenSpec{spec(":8080", 0)},
			socks: []*activatedSocket{sock(3, "unknown", "tcp", "0.0.0.0:8080")},
			want:  map[string]int{"l0": 3},
		},
		{
			name:  "port 0 takes any port of that host",
			specs: []ListenSpec{spec("127.0.0.1:0", 0)},
			socks: []*activatedSocket{sock(3, "unknown", "tcp", "127.0.0.1:40001")},
			want:  map[string]int{"l0": 3},
		},
		{
			name:  "systemd's default name (the unit's) for several sockets falls back to addresses",
			specs: []ListenSpec{spec("a=127.0.0.1:1", 0), spec("b=127.0.0.1:2", 1)},
			socks: []*activatedSocket{sock(3, "molt.socket", "tcp", "127.0.0.1:2"), sock(4, "molt.socket", "tcp", "127.0.0.1:1")},
			want:  map[string]int{"a": 4, "b": 3},
		},
		{
			name:    "a named socket at another address",
			specs:   []ListenSpec{spec("web=127.0.0.1:8080", 0)},
			socks:   []*activatedSocket{sock(3, "web", "tcp", "127.0.0.1:9090")},
			wantErr: `passed fd 3 (name "web", tcp 127.0.0.1:9090), but listener web=127.0.0.1:8080 has another address`,
		},
		{
			name:    "a socket no listener wants",
			specs:   []ListenSpec{spec("web=127.0.0.1:8080", 0)},
			socks:   []*activatedSocket{sock(3, "web", "tcp", "127.0.0.1:8080"), sock(4, "unknown", "unix", "/run/x.sock")},
			wantErr: `passed fd 4 (name "unknown", unix /run/x.sock), which matches no listener`,
		},
		{
			name:    "a unix socket does not serve a TCP listener",
			specs:   []ListenSpec{spec("web=127.0.0.1:0", 0)},
			socks:   []*activatedSocket{sock(3, "unknown", "unix", "/run/x.sock")},
			wantErr: "matches no listener",
		},
		{
			name:    "two sockets, one listener",
			specs:   []ListenSpec{spec("127.0.0.1:0", 0)},
			socks:   []*activatedSocket{sock(3, "unknown", "tcp", "127.0.0.1:1"), sock(4, "unknown", "tcp", "127.0.0.1:2")},
			wantErr: `fd 4 (name "unknown", tcp 127.0.0.1:2), which matches no listener`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := matchActivated(tt.specs, tt.socks)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrConfig) {
					t.Fatalf("error %v, want a config error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("matched %d listeners, want %d: %v", len(got), len(tt.want), got)
			}
			for name, fd := range tt.want {
				if got[name] == nil || got[name].fd != fd {
					t.Errorf("listener %s got %v, want fd %d", name, got[name], fd)
				}
			}
		})
	}
}

// TestCheckFD feeds checkFD every kind of descriptor a launcher could
// pass by mistake.
func TestCheckFD(t *testing.T) {
	socket := func(typ int, listen bool) int {
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		if listen {
			if err := unix.Listen(fd, 8); err != nil {
				t.Fatal(err)
			}
		}
		return fd
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	unixFD, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unixFD)
	path := t.TempDir() + "/s.sock"
	if err := unix.Bind(unixFD, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(unixFD, 8); err != nil {
		t.Fatal(err)
	}

	if s, err := checkFD(socket(unix.SOCK_STREAM, true), "web"); err != nil || s.network != "tcp" || !strings.HasPrefix(s.addr, "127.0.0.1:") {
		t.Errorf("listening TCP socket: %+v, %v", s, err)
	}
	if s, err := checkFD(unixFD, "adm"); err != nil || s.network != "unix" || s.addr != path {
		t.Errorf("listening unix socket: %+v, %v", s, err)
	}
	for _, c := range []struct {
		name string
		fd   int
		want string
	}{
		{"datagram", socket(unix.SOCK_DGRAM, false), "not a stream socket"},
		{"not listening", socket(unix.SOCK_STREAM, false), "not a listening socket"},
		{"pipe", int(r.Fd()), "not a socket"},
		{"closed", 1000, "not open"},
	} {
		if _, err := checkFD(c.fd, c.name); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
}

// TestActivatedFDs_NotForThisProcess: variables inherited from elsewhere
// (LISTEN_PID another pid, or unset) are no activation: nil, so that the
// keeper drops them instead of passing them on.
func TestActivatedFDs_NotForThisProcess(t *testing.T) {
	t.Setenv("LISTEN_FDS", "1")
	for _, pid := range []string{"", "1"} {
		t.Setenv("LISTEN_PID", pid)
		if fds, err := ActivatedFDs(); fds != nil || err != nil {
			t.Errorf("LISTEN_PID=%q: %v, %v; want nil, nil", pid, fds, err)
		}
	}
}

// TestSplitStored: sockets back from the keeper's store in systemd's go
// to the listener of their name at their address only; one whose
// listener was dropped or moved is left over (closed by the caller), and
// socket-activated ones go on to matchActivated untouched.
func TestSplitStored(t *testing.T) {
	sock := func(fd int, name, addr string, stored bool) *activatedSocket {
		return &activatedSocket{fd: fd, name: name, network: "tcp", addr: addr, stored: stored}
	}
	specs := []ListenSpec{
		{Name: "web", Network: "tcp", Address: "127.0.0.1:8080"},
		{Name: "api", Network: "tcp", Address: "127.0.0.1:9091"}, // moved from 9090
		{Name: "sys", Network: "tcp", Address: "127.0.0.1:7070"},
	}
	socks := []*activatedSocket{
		sock(3, "molt.socket", "127.0.0.1:7070", false),
		sock(4, "web", "127.0.0.1:8080", true),
		sock(5, "api", "127.0.0.1:9090", true),
		sock(6, "old", "127.0.0.1:6060", true),
		sock(7, "sys2", "127.0.0.1:7070", true), // same address, another name: not by address
	}
	stored, rest, unused := splitStored(specs, socks)
	if len(stored) != 1 || stored["web"] == nil || stored["web"].fd != 4 {
		t.Errorf("stored %v", stored)
	}
	if len(rest) != 1 || rest[0].fd != 3 {
		t.Errorf("activated %v", rest)
	}
	var left []int
	for _, s := range unused {
		left = append(left, s.fd)
	}
	if fmt.Sprint(left) != "[5 6 7]" {
		t.Errorf("unused %v, want [5 6 7]", left)
	}
}
