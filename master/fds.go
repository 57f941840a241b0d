package master

import (
	"errors"
	"os"
	"strconv"

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
