package worker

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Notify sends state, one or more newline-separated KEY=VALUE assignments,
// as one datagram to NOTIFY_SOCKET (sd_notify(3)). It returns nil without
// doing anything when NOTIFY_SOCKET is unset: no manager listens. The
// kernel attaches this process's credentials, which the manager checks.
// Safe for concurrent use; it does not block beyond the send.
func Notify(state string) error {
	addr := os.Getenv(EnvNotifySocket)
	if addr == "" {
		return nil
	}
	return notifyTo(addr, state, 0)
}

// NotifyTo sends state as one datagram to addr (a path, or @name in the
// abstract namespace), as Notify does to NOTIFY_SOCKET, but never waits:
// if the receiver's queue is full it fails with EAGAIN. For a process that
// must not block on its manager (molt's master and keeper).
func NotifyTo(addr, state string) error {
	return notifyTo(addr, state, unix.MSG_DONTWAIT)
}

func notifyTo(addr, state string, flags int) error {
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
	for {
		err = unix.Sendmsg(fd, []byte(state), nil, &unix.SockaddrUnix{Name: name}, flags)
		if err != unix.EINTR { // the Go runtime's preemption signal can interrupt a send
			break
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
