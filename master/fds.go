package master

import (
	"errors"
	"os"
	"strconv"

	"github.com/molt-server/molt/master/internal/unpoll"

	"golang.org/x/sys/unix"
)

// closeOnExecAll marks every descriptor from fd 3 up close-on-exec. A
// master may have inherited descriptors from whatever started it (a
// shell's, a supervisor's): syscall.StartProcess passes a child exactly
// its Files plus every descriptor that is not close-on-exec, so without
// this they would leak into every worker (STYLE.md principle 7). The Go
// runtime opens its own descriptors close-on-exec already.
func closeOnExecAll() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) {
		return err
	}
	// Kernels before 5.11: one fcntl per open descriptor.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd >= 3 {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}

// unpoll takes every descriptor this master holds of the listening
// sockets in files (the files themselves, and tableflip's copies,
// inherited and kept for the next upgrade) out of the Go runtime's
// poller: the master never accepts on them, and a registration would
// wake it on every burst of new connections (issue 13; package unpoll).
// newListener calls it for every listener it makes, at the start and in
// a reload.
func (m *Master) unpoll(files ...*os.File) {
	fds := make([]int, 0, len(files))
	for _, f := range files {
		if fd, err := rawFD(f); err == nil {
			fds = append(fds, fd)
		}
	}
	n, err := unpoll.Sockets(fds...)
	if err != nil {
		m.log.Warn("listener left in the runtime's poller: the master wakes on its new connections", "event", "listener.unpoll_failed", "error", err)
		return
	}
	m.log.Debug("listener out of the runtime's poller", "event", "listener.unpolled", "registrations", n)
}
