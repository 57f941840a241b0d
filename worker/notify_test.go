package worker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenNotify opens a test-owned notify socket with SO_PASSCRED, at a
// path or (abstract) in the abstract namespace, and returns its
// NOTIFY_SOCKET address.
func listenNotify(t *testing.T, abstract bool) (int, string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	tv := unix.NsecToTimeval((10 * time.Second).Nanoseconds()) // a bounded wait in recv
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	var name, addr string
	if abstract {
		name = fmt.Sprintf("\x00molt-worker-test/%d/%s", os.Getpid(), t.Name())
		addr = "@" + name[1:]
	} else {
		name = filepath.Join(t.TempDir(), "n.sock")
		addr = name
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: name}); err != nil {
		t.Fatal(err)
	}
	return fd, addr
}

// recvNotify reads one datagram and the sender's pid.
func recvNotify(t *testing.T, fd int) (string, int) {
	t.Helper()
	buf := make([]byte, MaxNotifySize)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, 0)
	for i := 0; err == unix.EINTR && i < 100; i++ { // the Go runtime's preemption signals interrupt a blocking recvmsg
		n, oobn, _, _, err = unix.Recvmsg(fd, buf, oob, 0)
	}
	if err != nil {
		t.Fatalf("no datagram: %v", err)
	}
	cms, _ := unix.ParseSocketControlMessage(oob[:oobn])
	pid := 0
	for _, c := range cms {
		if cred, err := unix.ParseUnixCredentials(&c); err == nil {
			pid = int(cred.Pid)
		}
	}
	return string(buf[:n]), pid
}

func TestNotify_PathAndAbstractWithCredentials(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		fd, addr := listenNotify(t, abstract)
		t.Setenv(EnvNotifySocket, addr)
		if err := Ready(); err != nil {
			t.Fatal(err)
		}
		msg, pid := recvNotify(t, fd)
		if msg != "READY=1" || pid != os.Getpid() {
			t.Errorf("%s: got %q from pid %d, want READY=1 from %d", addr, msg, pid, os.Getpid())
		}
		if err := Status("line one\nline two"); err != nil {
			t.Fatal(err)
		}
		if msg, _ := recvNotify(t, fd); msg != "STATUS=line one line two" {
			t.Errorf("Status sent %q", msg)
		}
	}
}

func TestNotify_UnsetIsANoOpAndBadAddressAnError(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	if err := Ready(); err != nil {
		t.Errorf("Ready without NOTIFY_SOCKET: %v, want nil", err)
	}
	t.Setenv(EnvNotifySocket, "relative/path")
	if err := Ready(); err == nil {
		t.Error("a relative NOTIFY_SOCKET was accepted")
	}
	t.Setenv(EnvNotifySocket, filepath.Join(t.TempDir(), "absent"))
	if err := Ready(); err == nil {
		t.Error("sending to a missing socket reported success")
	}
}

// TestNotifyTo_NeverWaits: NotifyTo delivers like Notify, and on a
// receiver whose queue is full it fails with EAGAIN instead of blocking
// (a master or keeper must not hang on its supervisor).
func TestNotifyTo_NeverWaits(t *testing.T) {
	fd, addr := listenNotify(t, true)
	if err := NotifyTo(addr, "READY=1"); err != nil {
		t.Fatal(err)
	}
	if msg, pid := recvNotify(t, fd); msg != "READY=1" || pid != os.Getpid() {
		t.Errorf("got %q from %d", msg, pid)
	}
	var err error
	for i := 0; i < 100000 && err == nil; i++ { // fills the queue: bounded
		err = NotifyTo(addr, "STATUS=filling")
	}
	if !errors.Is(err, unix.EAGAIN) {
		t.Errorf("NotifyTo on a full queue: %v, want EAGAIN", err)
	}
}

// TestNotify_WaitsBoundedForRoomInAFullQueue: with the manager's queue
// full, Notify waits for room: a READY=1 sent during a burst arrives once
// the manager reads; with nobody reading it gives up with EAGAIN after
// NotifyWait, not never.
func TestNotify_WaitsBoundedForRoomInAFullQueue(t *testing.T) {
	fd, addr := listenNotify(t, false)
	t.Setenv(EnvNotifySocket, addr)
	fill := func() int {
		n := 0
		for i := 0; i < 100000; i++ { // bounded
			if NotifyTo(addr, "STATUS=filling") != nil {
				break
			}
			n++
		}
		return n
	}
	queued := fill()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		time.Sleep(100 * time.Millisecond) // the reader falls behind for a while
		for i := 0; i <= queued; i++ {
			recvNotify(t, fd)
		}
	}()
	start := time.Now()
	if err := Ready(); err != nil {
		t.Fatalf("READY=1 during a burst: %v (after %v)", err, time.Since(start))
	}
	<-drained
	queued = fill()
	start = time.Now()
	err := Ready()
	if took := time.Since(start); !errors.Is(err, unix.EAGAIN) || took < NotifyWait || took > NotifyWait+2*time.Second {
		t.Errorf("READY=1 to a queue nobody reads: %v after %v, want EAGAIN after %v", err, took, NotifyWait)
	}
}

func TestWatchdog_PingsAtHalfTheInterval(t *testing.T) {
	fd, addr := listenNotify(t, true)
	t.Setenv(EnvNotifySocket, addr)
	t.Setenv(EnvWatchdogUSec, "40000") // 40ms: pings every 20ms
	t.Setenv(EnvWatchdogPID, fmt.Sprint(os.Getpid()))
	if d, ok := WatchdogInterval(); !ok || d != 40*time.Millisecond {
		t.Fatalf("WatchdogInterval = %v, %v", d, ok)
	}
	stop := StartWatchdog(context.Background())
	for i := 0; i < 3; i++ {
		if msg, _ := recvNotify(t, fd); msg != NotifyWatchdog {
			t.Fatalf("ping %d: %q", i, msg)
		}
	}
	stop()
	stop() // safe twice
	t.Setenv(EnvWatchdogPID, "1")
	if _, ok := WatchdogInterval(); ok {
		t.Error("a watchdog meant for another pid is enabled")
	}
}

func TestSettings(t *testing.T) {
	t.Setenv(EnvStopSignal, "")
	if s, err := StopSignal(); err != nil || s != unix.SIGTERM {
		t.Errorf("default stop signal %v, %v", s, err)
	}
	t.Setenv(EnvStopSignal, "QUIT")
	if s, err := StopSignal(); err != nil || s != unix.SIGQUIT {
		t.Errorf("QUIT: %v, %v", s, err)
	}
	for _, bad := range []string{"KILL", "NOPE"} {
		t.Setenv(EnvStopSignal, bad)
		if _, err := StopSignal(); err == nil {
			t.Errorf("stop signal %s accepted", bad)
		}
	}
	t.Setenv(EnvDrainTimeout, "")
	if d, _ := DrainTimeout(); d != DefaultDrainTimeout {
		t.Errorf("default drain timeout %v", d)
	}
	t.Setenv(EnvDrainTimeout, "1500ms")
	if d, _ := DrainTimeout(); d != 1500*time.Millisecond {
		t.Errorf("drain timeout %v", d)
	}
	t.Setenv(EnvDrainTimeout, "-1s")
	if _, err := DrainTimeout(); err == nil {
		t.Error("negative drain timeout accepted")
	}
}

func TestWatchParent_EOFMeansMasterGone(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	// watchParent takes over a duplicate, as a worker takes over its fd.
	fd, err := unix.FcntlInt(uintptr(rawFDOf(t, r)), unix.F_DUPFD_CLOEXEC, ListenFDsStart)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	gone := watchParent(fd)
	if gone == nil {
		t.Fatal("a pipe was not accepted")
	}
	select {
	case <-gone:
		t.Fatal("gone before the write end closed")
	case <-time.After(50 * time.Millisecond): // an observation window: nothing may happen
	}
	w.Close()
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatal("EOF on the parent pipe not seen")
	}
	if watchParent(0) != nil || watchParent(999) != nil {
		t.Error("a non-pipe fd was accepted as the parent pipe")
	}
}
