package worker

import (
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

var (
	goneOnce sync.Once
	goneC    <-chan struct{}
)

// MasterGone returns a channel that is closed when the molt master that
// started this worker is gone: the read end at MOLT_PARENT_FD reaches EOF
// once the last copy of its write end, which only the master holds, is
// closed, however the master died. It returns nil (a channel that never
// fires) when MOLT_PARENT_FD is unset or not a pipe, as under systemd.
// Safe to call many times; one goroutine watches the pipe.
func MasterGone() <-chan struct{} {
	goneOnce.Do(func() {
		fd, err := strconv.Atoi(os.Getenv(EnvParentFD))
		if err != nil {
			return
		}
		goneC = watchParent(fd)
	})
	return goneC
}

// watchParent takes over fd, which must be a pipe, and returns a channel
// closed at its EOF; nil if fd is no pipe.
func watchParent(fd int) <-chan struct{} {
	var st unix.Stat_t
	if fd < ListenFDsStart || unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return nil
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "molt-parent")
	c := make(chan struct{})
	go func() {
		defer close(c)
		defer f.Close()
		buf := make([]byte, 64)
		for {
			// The master never writes; only EOF (or an error) ends this.
			if _, err := f.Read(buf); err != nil {
				return
			}
		}
	}()
	return c
}
