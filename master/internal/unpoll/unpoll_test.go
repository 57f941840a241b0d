package unpoll

import (
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// watched reports whether this process's epoll instances watch a
// descriptor of the socket fd.
func watched(t *testing.T, fd int) bool {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	eps, err := epollFDs()
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		regs, err := registered(ep)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range regs {
			if r.ino == st.Ino {
				return true
			}
		}
	}
	return false
}

// fileOf duplicates ln's socket as an *os.File the way the master and
// tableflip do (os.NewFile on a non-blocking socket: the runtime
// registers it).
func fileOf(t *testing.T, ln net.Listener) (*os.File, int) {
	t.Helper()
	raw, err := ln.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	nfd := -1
	if err := raw.Control(func(fd uintptr) { nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || nfd < 0 {
		t.Fatalf("dup: %v", err)
	}
	return os.NewFile(uintptr(nfd), "listener"), nfd
}

// TestSockets: every descriptor of the named listener leaves the
// runtime's poller, the file stays usable (an accept on its raw
// descriptor still works) and closes cleanly; another listener the
// process accepts on keeps its registration and keeps accepting.
func TestSockets(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	f, fd := fileOf(t, target)
	f2, _ := fileOf(t, target)
	if !watched(t, fd) {
		t.Fatal("os.NewFile on a non-blocking listener registered nothing: the test cannot tell")
	}
	n, err := Sockets(fd)
	if err != nil {
		t.Fatal(err)
	}
	if n < 3 { // the net.Listener's, f's and f2's
		t.Errorf("removed %d registrations, want 3", n)
	}
	if watched(t, fd) {
		t.Error("the listener is still watched")
	}
	ofd := -1
	raw, _ := other.(syscall.Conn).SyscallConn()
	_ = raw.Control(func(u uintptr) { ofd = int(u) })
	if !watched(t, ofd) {
		t.Error("the other listener lost its registration")
	}
	if err := f2.Close(); err != nil {
		t.Errorf("close after unpoll: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		c, err := other.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	c, err := net.Dial("tcp", other.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("accept on the other listener: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the other listener's accept never woke")
	}
	if n, err := Sockets(fd); err != nil || n != 0 {
		t.Errorf("second call: %d removed, %v; want 0, nil", n, err)
	}
	_ = f.Close()
}
