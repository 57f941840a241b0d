package notify

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// SendFDs sends one notify datagram, state, with the descriptors fds
// (SCM_RIGHTS; none if empty), to the notify socket at addr (a path, or
// @name in the abstract namespace), as sd_pid_notify_with_fds does. It
// waits up to wait for room in the receiver's queue (a blocking send
// bounded by SO_SNDTIMEO; 0: not at all). The descriptors stay the
// caller's: the receiver gets its own duplicates.
func SendFDs(addr, state string, fds []int, wait time.Duration) error {
	name := addr
	switch {
	case strings.HasPrefix(addr, "@"):
		name = "\x00" + addr[1:]
	case !strings.HasPrefix(addr, "/"):
		return fmt.Errorf("notify %s: not an absolute path or @abstract address", addr)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("notify %s: %w", addr, err)
	}
	defer unix.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	to := &unix.SockaddrUnix{Name: name}
	flags := unix.MSG_DONTWAIT
	if wait > 0 {
		flags = 0
		tv := unix.NsecToTimeval(wait.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
			return fmt.Errorf("notify %s: SO_SNDTIMEO: %w", addr, err)
		}
	}
	deadline := time.Now().Add(wait)
	for {
		err = unix.Sendmsg(fd, []byte(state), oob, to, flags)
		// A signal interrupts a blocking send: go on while time is left.
		if !errors.Is(err, unix.EINTR) || (wait > 0 && time.Now().After(deadline)) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("notify %s: %w", addr, err)
	}
	return nil
}
