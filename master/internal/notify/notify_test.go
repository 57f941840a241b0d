package notify

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// sendDatagram sends data (and fds) to the notify socket from this process.
func sendDatagram(t *testing.T, s *Socket, data []byte, fds ...int) {
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
	to := &unix.SockaddrUnix{Name: "\x00" + strings.TrimPrefix(s.Addr, "@")}
	if err := unix.Sendmsg(fd, data, oob, to, 0); err != nil {
		t.Fatal(err)
	}
}

func TestNotifySocket_CredentialsAndFields(t *testing.T) {
	s, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.HasPrefix(s.Addr, "@molt/") {
		t.Errorf("addr %q: want an abstract '@molt/...' address", s.Addr)
	}
	sendDatagram(t, s, []byte("READY=1\nSTATUS=warming up\n"))
	m, err := s.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m.Err != nil {
		t.Fatal(m.Err)
	}
	if m.Pid != os.Getpid() || m.Pgid != unix.Getpgrp() {
		t.Errorf("credentials pid=%d pgid=%d, want %d/%d", m.Pid, m.Pgid, os.Getpid(), unix.Getpgrp())
	}
	if !m.Fields.Is("READY", "1") {
		t.Error("READY=1 not parsed")
	}
	if v, _ := m.Fields.Get("STATUS"); v != "warming up" {
		t.Errorf("STATUS = %q", v)
	}
}

func TestNotifySocket_RejectsOversizedAndKeepsFDsForClosing(t *testing.T) {
	s, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sendDatagram(t, s, []byte("STATUS="+strings.Repeat("x", worker.MaxNotifySize)))
	m, err := s.Read()
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(m.Err, worker.ErrNotifyMessage) {
		t.Errorf("oversized datagram: err = %v, want ErrNotifyMessage", m.Err)
	}
	r, w, _ := os.Pipe()
	defer r.Close()
	sendDatagram(t, s, []byte("BARRIER=1"), int(w.Fd()))
	w.Close()
	m, err = s.Read()
	if err != nil || m.Err != nil {
		t.Fatal(err, m.Err)
	}
	if len(m.FDs) != 1 {
		t.Fatalf("got %d fds, want 1", len(m.FDs))
	}
	if fl, _ := unix.FcntlInt(uintptr(m.FDs[0]), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
		t.Error("received fd is not close-on-exec: a worker started now would inherit it")
	}
	CloseFDs(m.FDs)
	// With every write end closed, the barrier's waiter sees EOF.
	if n, err := r.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("barrier pipe still open after closeFDs: n=%d err=%v", n, err)
	}
}

func TestNotifySocket_CloseWakesReader(t *testing.T) {
	s, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.Read()
		done <- err
	}()
	s.Close()
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
		m := ParseDatagram(data, oob, flags)
		if m.Err == nil && m.Pid <= 0 {
			t.Fatal("accepted a datagram without a sender")
		}
		if m.Err == nil && len(m.Fields.Fields) == 0 {
			t.Fatal("accepted an empty message")
		}
		// m.FDs are numbers parsed from fuzz bytes, not descriptors this
		// process received: never close them here.
	})
}
