package worker

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Notify sends state, one or more newline-separated KEY=VALUE assignments,
// as one datagram to NOTIFY_SOCKET (sd_notify(3)). It returns nil without
// doing anything when NOTIFY_SOCKET is unset: no manager listens. The
// kernel attaches this process's credentials, which the manager checks.
// Safe for concurrent use. If the manager's queue is full (a burst of
// messages), it waits for room for up to NotifyWait, then fails with
// EAGAIN: a READY=1 survives a burst, and nothing hangs on a manager that
// stopped reading.
func Notify(state string) error {
	addr := os.Getenv(EnvNotifySocket)
	if addr == "" {
		return nil
	}
	return notifyTo(addr, state, NotifyWait)
}

// NotifyWait bounds how long Notify waits for room in the manager's queue.
const NotifyWait = time.Second

// NotifyTo sends state as one datagram to addr (a path, or @name in the
// abstract namespace, as systemd's own sockets may be), as Notify does to
// NOTIFY_SOCKET, but never waits: if the receiver's queue is full it
// fails with EAGAIN. For a process that must not block on its manager
// (molt's master and keeper).
func NotifyTo(addr, state string) error {
	return notifyTo(addr, state, 0)
}

// notifyTo sends one datagram, waiting up to wait for room in the
// receiver's queue (0: not at all).
func notifyTo(addr, state string, wait time.Duration) error {
	return NotifyWithFDs(addr, state, nil, wait)
}

// NotifyWithFDs sends state as one datagram to addr (a path, or @name in
// the abstract namespace) with the descriptors fds (SCM_RIGHTS; none if
// empty), as sd_pid_notify_with_fds does: FDSTORE=1 with FDNAME= hands
// them to the manager's fd store. It waits up to wait for room in the
// receiver's queue (0: not at all). The wait is the kernel's (a blocking
// send bounded by SO_SNDTIMEO): the sender wakes as soon as the receiver
// has read, instead of polling. The descriptors stay the caller's: the
// receiver gets its own duplicates.
func NotifyWithFDs(addr, state string, fds []int, wait time.Duration) error {
	name := addr
	switch {
	case strings.HasPrefix(addr, "@"):
		name = "\x00" + addr[1:] // the abstract namespace
	case !strings.HasPrefix(addr, "/"):
		return fmt.Errorf("worker: notify %s: not an absolute path or @abstract address", addr)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("worker: notify %s: %w", addr, err)
	}
	defer unix.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	to := &unix.SockaddrUnix{Name: name}
	if wait <= 0 {
		for {
			err = unix.Sendmsg(fd, []byte(state), oob, to, unix.MSG_DONTWAIT)
			if err != unix.EINTR {
				break
			}
		}
	} else {
		deadline := time.Now().Add(wait)
		for {
			left := time.Until(deadline)
			if left <= 0 {
				err = unix.EAGAIN
				break
			}
			tv := unix.NsecToTimeval(left.Nanoseconds())
			if err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
				break
			}
			err = unix.Sendmsg(fd, []byte(state), oob, to, 0)
			// A signal (the Go runtime's preemption, the app's) interrupts
			// the wait: go on with what is left of it.
			if err != unix.EINTR {
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("worker: notify %s: %w", addr, err)
	}
	return nil
}

// Ready tells the manager the app is ready to serve (READY=1). Under molt
// this is what makes a new worker count; see Notify for when it is a no-op.
func Ready() error { return Notify(NotifyReady) }

// Stopping tells the manager the app is shutting down (STOPPING=1). Under
// molt, a worker that says so without being asked is replaced at once.
func Stopping() error { return Notify(NotifyStopping) }

// Status sends a one-line human-readable status (STATUS=...); newlines in
// msg become spaces, as the protocol is line-based.
func Status(msg string) error {
	return Notify("STATUS=" + strings.ReplaceAll(msg, "\n", " "))
}
