package notify

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/test"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// openTest binds a socket in a fresh private directory.
func openTest(t *testing.T) *Socket {
	t.Helper()
	dir, err := PrivateDir("molt-notify-test-", 0o711)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { RemoveDir(dir) })
	s, err := Listen(filepath.Join(dir, "n"), 0o600, -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

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
	if err := unix.Sendmsg(fd, data, oob, &unix.SockaddrUnix{Name: s.Addr}, 0); err != nil {
		t.Fatal(err)
	}
}

func TestNotifySocket_CredentialsAndFields(t *testing.T) {
	s := openTest(t)
	sendDatagram(t, s, []byte("READY=1\nSTATUS=warming up\n"))
	m, err := s.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m.Err != nil {
		t.Fatal(m.Err)
	}
	if m.Pid != os.Getpid() {
		t.Errorf("credentials pid=%d, want %d", m.Pid, os.Getpid())
	}
	if !m.Fields.Is("READY", "1") {
		t.Error("READY=1 not parsed")
	}
	if v, _ := m.Fields.Get("STATUS"); v != "warming up" {
		t.Errorf("STATUS = %q", v)
	}
}

// TestNotifySocket_ModesBeforeUse: the directory is 0711 and the socket
// file 0600 from its bind on, owned by the uid asked for; a path socket
// refuses a sender without write permission (EACCES), which an abstract
// one never could.
func TestNotifySocket_ModesBeforeUse(t *testing.T) {
	dir, err := PrivateDir("molt-notify-test-", 0o711)
	if err != nil {
		t.Fatal(err)
	}
	defer RemoveDir(dir)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o711 {
		t.Fatalf("dir %s: %v %v, want 0711", dir, fi.Mode(), err)
	}
	uid := -1
	if os.Geteuid() == 0 {
		uid = 65534
	}
	path := filepath.Join(dir, "w1")
	s, err := Listen(path, 0o600, uid, uid)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket file mode %v, want a socket with 0600", fi.Mode())
	}
	if st := fi.Sys().(*syscall.Stat_t); uid >= 0 && int(st.Uid) != uid {
		t.Errorf("socket file owned by %d, want %d", st.Uid, uid)
	}
	if err := RemoveDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir still there: %v", err)
	}
}

// TestNotifySocket_PassedFDsNeverInstalled: descriptors passed with a
// datagram are discarded by the kernel, not installed in the receiver:
// 50 datagrams of 253 fds leave the receiver's fd count as it was, and a
// BARRIER=1's pipe sees EOF once the datagram is read, which is what
// systemd-notify's barrier waits for.
func TestNotifySocket_PassedFDsNeverInstalled(t *testing.T) {
	s := openTest(t)
	fdCount := func() int {
		ents, _ := os.ReadDir("/proc/self/fd")
		return len(ents)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	many := make([]int, 253)
	for i := range many {
		many[i] = int(devnull.Fd())
	}
	before := fdCount()
	for i := 0; i < 50; i++ {
		sendDatagram(t, s, []byte("STATUS=x"), many...)
		m, err := s.Read()
		if err != nil {
			t.Fatal(err)
		}
		if m.Err != nil || !m.FDsDiscarded || m.Pid != os.Getpid() {
			t.Fatalf("datagram with fds: err=%v discarded=%v pid=%d", m.Err, m.FDsDiscarded, m.Pid)
		}
	}
	if after := fdCount(); after != before {
		t.Errorf("fd count %d after 50 datagrams of 253 fds, was %d", after, before)
	}

	r, w, _ := os.Pipe()
	defer r.Close()
	sendDatagram(t, s, []byte("BARRIER=1"), int(w.Fd()))
	w.Close()
	m, err := s.Read()
	if err != nil || m.Err != nil {
		t.Fatal(err, m.Err)
	}
	if !m.Fields.Is("BARRIER", "1") || !m.FDsDiscarded {
		t.Errorf("barrier message: %+v", m)
	}
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("barrier pipe still open after the read: n=%d err=%v", n, err)
	}
}

func TestNotifySocket_RejectsOversized(t *testing.T) {
	s := openTest(t)
	sendDatagram(t, s, []byte("STATUS="+strings.Repeat("x", worker.MaxNotifySize)))
	m, err := s.Read()
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(m.Err, worker.ErrNotifyMessage) {
		t.Errorf("oversized datagram: err = %v, want ErrNotifyMessage", m.Err)
	}
}

func TestNotifySocket_CloseWakesReader(t *testing.T) {
	s := openTest(t)
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

func TestListen_PathTooLong(t *testing.T) {
	if _, err := Listen("/tmp/"+strings.Repeat("x", 200), 0o600, -1, -1); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("long path: %v", err)
	}
}

func TestSpeaksFor(t *testing.T) {
	sessions := map[int]int{
		100: 100, // worker 100 itself
		101: 100, // its child, in its session (systemd-notify from a script)
		200: 200, // worker 200
		201: 200, // worker 200's child (even if it moved to group 100: setpgid stays in the session)
		300: 1,   // a stranger
	}
	getsid := func(pid int) (int, error) {
		if s, ok := sessions[pid]; ok {
			return s, nil
		}
		return 0, unix.ESRCH
	}
	for _, c := range []struct {
		sender, worker int
		ok             bool
	}{
		{100, 100, true},
		{101, 100, true},
		{200, 100, false},
		{201, 100, false},
		{300, 100, false},
		{999, 100, false}, // gone
		{0, 100, false},
		{100, 0, false},
	} {
		ok, why := SpeaksFor(getsid, c.sender, c.worker)
		if ok != c.ok || (!ok && why == "") {
			t.Errorf("sender %d for worker %d: %v %q, want %v", c.sender, c.worker, ok, why, c.ok)
		}
	}
}

// TestRejected_Throttled: 2,000 rejections in a burst are two lines: the
// first at once, then one with the count of the rest after the interval.
func TestRejected_Throttled(t *testing.T) {
	var buf syncBuffer
	log := hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true})
	r := NewRejected(log, "/x", 50*time.Millisecond)
	for i := 0; i < 2000; i++ {
		r.Add(1000+i, "test")
	}
	deadline := time.Now().Add(5 * time.Second)
	for strings.Count(buf.String(), "notify.rejected") < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling a bounded wait for the timer's line
	}
	r.Close()
	out := buf.String()
	if n := strings.Count(out, "notify.rejected"); n != 2 {
		t.Fatalf("%d lines, want 2:\n%s", n, out)
	}
	if !strings.Contains(out, `"count":1,`) || !strings.Contains(out, `"count":1999,`) || !strings.Contains(out, `"last_pid":2999`) {
		t.Errorf("counts not as expected:\n%s", out)
	}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// FuzzParseDatagram feeds arbitrary data and control bytes to the notify
// reader's parser: it must never panic, and must reject what it cannot
// attribute to a sender.
func FuzzParseDatagram(f *testing.F) {
	cred := unix.UnixCredentials(&unix.Ucred{Pid: 42, Uid: 0, Gid: 0})
	f.Add([]byte("READY=1"), cred, 0)
	f.Add([]byte("STATUS=x"), append(cred, unix.UnixRights(7)...), 0)
	f.Add([]byte("BARRIER=1"), cred, unix.MSG_CTRUNC)
	f.Add([]byte("READY=1"), []byte{}, unix.MSG_TRUNC)
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int) {
		m := ParseDatagram(data, oob, flags)
		if m.Err == nil && m.Pid <= 0 {
			t.Fatal("accepted a datagram without a sender")
		}
		if m.Err == nil && len(m.Fields.Fields) == 0 {
			t.Fatal("accepted an empty message")
		}
	})
}

// TestNotifySocket_SystemdNotifyBarrier: systemd-notify --ready sends
// READY=1, then BARRIER=1 with a pipe's write end and waits for its
// close. With a credentials-only buffer the reader sees MSG_CTRUNC, the
// kernel closes the fd at the read, and systemd-notify exits at once.
func TestNotifySocket_SystemdNotifyBarrier(t *testing.T) {
	sdNotify := test.RequireCommand(t, "systemd-notify")
	s := openTest(t)
	cmd := exec.Command(sdNotify, "--ready", "--status=up")
	cmd.Env = []string{"NOTIFY_SOCKET=" + s.Addr}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var got []Msg
	for len(got) < 2 {
		m, err := s.Read()
		if err != nil || m.Err != nil {
			t.Fatal(err, m.Err)
		}
		got = append(got, m)
		if m.Fields.Is("BARRIER", "1") {
			break
		}
	}
	// systemd-notify speaks for its parent (--pid's default), with the
	// parent's pid in the credentials if it may (root), else its own.
	if !got[0].Fields.Is("READY", "1") || (got[0].Pid != cmd.Process.Pid && got[0].Pid != os.Getpid()) {
		t.Errorf("first message %+v, want READY=1 from %d or %d", got[0], cmd.Process.Pid, os.Getpid())
	}
	if last := got[len(got)-1]; !last.Fields.Is("BARRIER", "1") || !last.FDsDiscarded {
		t.Logf("this systemd-notify sent no barrier: %+v", got)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("systemd-notify: %v", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Error("systemd-notify still waits for its barrier")
	}
}

// TestNotifySocket_AcceptFDs: a socket that accepts descriptors gets
// those of worker.NotifyWithFDs in Msg.FDs (installed close-on-exec, the receiver's
// to close); beyond its bound per datagram the kernel closes the rest
// and the message says so. A flood of many-fd datagrams never raises the
// receiver's count beyond what it has not closed yet.
func TestNotifySocket_AcceptFDs(t *testing.T) {
	s := openTest(t)
	s.AcceptFDs(2)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	fdCount := func() int {
		ents, _ := os.ReadDir("/proc/self/fd")
		return len(ents)
	}
	if err := worker.NotifyWithFDs(s.Addr, "FDSTORE=1\nFDNAME=x", []int{int(devnull.Fd())}, time.Second); err != nil {
		t.Fatal(err)
	}
	m, err := s.Read()
	if err != nil || m.Err != nil || m.Pid != os.Getpid() {
		t.Fatal(err, m.Err, m.Pid)
	}
	if len(m.FDs) != 1 || m.FDsDiscarded || !m.Fields.Is("FDSTORE", "1") {
		t.Fatalf("message %+v", m)
	}
	if fl, err := unix.FcntlInt(uintptr(m.FDs[0]), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("received fd %d: flags %#x, %v: want close-on-exec", m.FDs[0], fl, err)
	}
	m.CloseFDs()

	before := fdCount()
	many := make([]int, 200)
	for i := range many {
		many[i] = int(devnull.Fd())
	}
	for i := 0; i < 20; i++ {
		if err := worker.NotifyWithFDs(s.Addr, "FDSTORE=1\nFDNAME=x", many, time.Second); err != nil {
			t.Fatal(err)
		}
		m, err := s.Read()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.FDs) != 2 || !m.FDsDiscarded {
			t.Fatalf("200 fds to a socket taking 2: got %d, discarded %v", len(m.FDs), m.FDsDiscarded)
		}
		m.CloseFDs()
	}
	if after := fdCount(); after != before {
		t.Errorf("fd count %d after the flood, was %d", after, before)
	}
}
