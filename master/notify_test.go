package master

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// sendDatagram sends data (and fds) to the notify socket from this process.
func sendDatagram(t *testing.T, s *notifySocket, data []byte, fds ...int) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	to := &unix.SockaddrUnix{Name: "\x00" + strings.TrimPrefix(s.addr, "@")}
	if err := unix.Sendmsg(fd, data, oob, to, 0); err != nil {
		t.Fatal(err)
	}
}

func TestNotifySocket_CredentialsAndFields(t *testing.T) {
	s, err := openNotifySocket()
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	if !strings.HasPrefix(s.addr, "@molt/") {
		t.Errorf("addr %q: want an abstract '@molt/...' address", s.addr)
	}
	sendDatagram(t, s, []byte("READY=1\nSTATUS=warming up\n"))
	m, err := s.read()
	if err != nil {
		t.Fatal(err)
	}
	if m.err != nil {
		t.Fatal(m.err)
	}
	if m.pid != os.Getpid() || m.pgid != unix.Getpgrp() {
		t.Errorf("credentials pid=%d pgid=%d, want %d/%d", m.pid, m.pgid, os.Getpid(), unix.Getpgrp())
	}
	if !m.msg.Is("READY", "1") {
		t.Error("READY=1 not parsed")
	}
	if v, _ := m.msg.Get("STATUS"); v != "warming up" {
		t.Errorf("STATUS = %q", v)
	}
}

func TestNotifySocket_RejectsOversizedAndKeepsFDsForClosing(t *testing.T) {
	s, err := openNotifySocket()
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	sendDatagram(t, s, []byte("STATUS="+strings.Repeat("x", worker.MaxNotifySize)))
	m, err := s.read()
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(m.err, worker.ErrNotifyMessage) {
		t.Errorf("oversized datagram: err = %v, want ErrNotifyMessage", m.err)
	}
	r, w, _ := os.Pipe()
	defer r.Close()
	sendDatagram(t, s, []byte("BARRIER=1"), int(w.Fd()))
	w.Close()
	m, err = s.read()
	if err != nil || m.err != nil {
		t.Fatal(err, m.err)
	}
	if len(m.fds) != 1 {
		t.Fatalf("got %d fds, want 1", len(m.fds))
	}
	if fl, _ := unix.FcntlInt(uintptr(m.fds[0]), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
		t.Error("received fd is not close-on-exec: a worker started now would inherit it")
	}
	closeFDs(m.fds)
	// With every write end closed, the barrier's waiter sees EOF.
	if n, err := r.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("barrier pipe still open after closeFDs: n=%d err=%v", n, err)
	}
}

func TestNotifySocket_CloseWakesReader(t *testing.T) {
	s, err := openNotifySocket()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.read()
		done <- err
	}()
	s.close()
	if err := <-done; !errors.Is(err, os.ErrClosed) {
		t.Errorf("read after close: %v, want os.ErrClosed", err)
	}
}

// FuzzParseDatagram feeds arbitrary data and control bytes to the notify
// reader's parser: it must never panic, and must reject what it cannot
// attribute to a sender.
func FuzzParseDatagram(f *testing.F) {
	cred := unix.UnixCredentials(&unix.Ucred{Pid: 42, Uid: 0, Gid: 0})
	f.Add([]byte("READY=1"), cred, 0)
	f.Add([]byte("STATUS=x"), append(cred, unix.UnixRights(7)...), 0)
	f.Add([]byte("READY=1"), []byte{}, unix.MSG_TRUNC)
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int) {
		m := parseDatagram(data, oob, flags)
		if m.err == nil && m.pid <= 0 {
			t.Fatal("accepted a datagram without a sender")
		}
		if m.err == nil && len(m.msg.Fields) == 0 {
			t.Fatal("accepted an empty message")
		}
		// m.fds are numbers parsed from fuzz bytes, not descriptors this
		// process received: never close them here.
	})
}
