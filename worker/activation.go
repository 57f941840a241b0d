package worker

import (
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

var (
	filesOnce sync.Once
	files     []*os.File
	filesErr  error

	listenersOnce sync.Once
	listeners     map[string][]net.Listener
	listenersErr  error
)

// Files returns the descriptors passed by socket activation, as files
// named after LISTEN_FDNAMES ("unknown" where a name is missing), in fd
// order. It returns nil, nil when the process was not activated:
// LISTEN_PID unset or naming another process (the variables were
// inherited, not meant for it), as sd_listen_fds(3). The fds are set
// close-on-exec; their blocking mode is left as it is.
//
// Files takes the fds over once: every call returns the same files, so
// it is safe to call many times and from several goroutines. Closing a
// returned file closes this process's copy only.
func Files() ([]*os.File, error) {
	filesOnce.Do(func() { files, filesErr = takeFiles() })
	return files, filesErr
}

func takeFiles() ([]*os.File, error) {
	names, err := ActivationNames(func(pid int) bool { return pid == os.Getpid() })
	if err != nil {
		return nil, fmt.Errorf("worker: %w", err)
	}
	if names == nil {
		return nil, nil
	}
	out := make([]*os.File, len(names))
	for i := range names {
		fd := ListenFDsStart + i
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return nil, fmt.Errorf("worker: listener fd %d (%s): %w", fd, names[i], err)
		}
		// Children of the app must not inherit the listeners by accident.
		unix.CloseOnExec(fd)
		// os.NewFile looks at the fd's flags and, for a non-blocking socket,
		// registers it with the poller; it does not change the flags.
		out[i] = os.NewFile(uintptr(fd), names[i])
	}
	return out, nil
}

// maxListenFDs bounds LISTEN_FDS: a larger count is a broken launcher.
const maxListenFDs = 1024

// ActivationNames reads the socket-activation variables (sd_listen_fds(3))
// and returns the names of the descriptors passed at fds 3, 4, ...
// ("unknown" where a name is missing). It returns nil, nil when none are
// meant for this process: LISTEN_PID unset, or naming a pid that forPID
// rejects (the variables were inherited, meant for another process). It
// neither checks nor takes the descriptors.
func ActivationNames(forPID func(pid int) bool) ([]string, error) {
	pidStr := os.Getenv(EnvListenPID)
	if pidStr == "" {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil {
		return nil, fmt.Errorf("%s=%q is not a pid", EnvListenPID, pidStr)
	}
	if !forPID(pid) {
		return nil, nil
	}
	nStr := os.Getenv(EnvListenFDs)
	n, err := strconv.Atoi(nStr)
	if err != nil || n < 0 || n > maxListenFDs {
		return nil, fmt.Errorf("%s=%q is not a count of descriptors (0 to %d)", EnvListenFDs, nStr, maxListenFDs)
	}
	return ParseFDNames(os.Getenv(EnvListenFDNames), n)
}

// Listeners returns the activated sockets that are stream listeners, by
// name; several fds may share a name. It returns an empty map when the
// process was not activated. Like Files, it does its work once; each
// listener is a duplicate of the inherited fd (net.FileListener), which
// leaves the shared socket's blocking mode alone. Closing a listener stops
// this process accepting; other processes sharing the socket go on.
//
// A socket in blocking mode (molt's listen option ",blocking", or
// systemd-socket-activate) is refused with an error: net.FileListener
// would switch the shared socket to non-blocking mode for every process
// holding it, making the other workers' blocking accept(2) fail with
// EAGAIN, and Close could not interrupt an accept blocked in the kernel, so
// a drain would wait for the next connection. Serve such a listener with a
// worker that accepts in blocking mode itself.
func Listeners() (map[string][]net.Listener, error) {
	listenersOnce.Do(func() { listeners, listenersErr = makeListeners() })
	return listeners, listenersErr
}

func makeListeners() (map[string][]net.Listener, error) {
	fs, err := Files()
	if err != nil {
		return nil, err
	}
	out := map[string][]net.Listener{}
	for _, f := range fs {
		if blocking, err := blockingListener(f); err != nil {
			return nil, err
		} else if blocking {
			return nil, fmt.Errorf("worker: listener %q (fd %d) is in blocking mode (molt's listen option \",blocking\"?): the worker package serves only non-blocking listeners, since making a net.Listener of it would switch the socket shared with every other process to non-blocking mode", f.Name(), fdOf(f))
		}
		ln, err := net.FileListener(f)
		if err != nil {
			// Not a listening stream socket (a datagram socket, a FIFO):
			// Files still offers it.
			continue
		}
		out[f.Name()] = append(out[f.Name()], ln)
	}
	return out, nil
}

// Listener returns the one activated listener called name. It is an error
// if there is none or more than one; the error names what there is.
func Listener(name string) (net.Listener, error) {
	all, err := Listeners()
	if err != nil {
		return nil, err
	}
	lns := all[name]
	switch len(lns) {
	case 1:
		return lns[0], nil
	case 0:
		var have []string
		for n := range all {
			have = append(have, n)
		}
		sort.Strings(have)
		if len(have) == 0 {
			return nil, fmt.Errorf("worker: no listener %q: the process was not started with socket activation (%s unset or for another pid)", name, EnvListenPID)
		}
		return nil, fmt.Errorf("worker: no listener %q; there are: %s", name, strings.Join(have, ", "))
	}
	return nil, fmt.Errorf("worker: %d listeners are called %q; use Listeners", len(lns), name)
}

// blockingListener reports whether f is a listening stream socket in
// blocking mode, read through the raw fd (os.File.Fd would itself switch
// the socket to blocking mode).
func blockingListener(f *os.File) (bool, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return false, nil // not a socket: net.FileListener skips it
	}
	var fl, acc int
	var ferr, aerr error
	if err := raw.Control(func(fd uintptr) {
		fl, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0)
		acc, aerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	}); err != nil {
		return false, nil
	}
	if aerr != nil || acc == 0 {
		return false, nil // not a listener: net.FileListener skips it
	}
	if ferr != nil {
		return false, fmt.Errorf("worker: listener %q: get its blocking mode: %w", f.Name(), ferr)
	}
	return fl&unix.O_NONBLOCK == 0, nil
}

// fdOf returns f's descriptor number for messages, without os.File.Fd.
func fdOf(f *os.File) int {
	fd := -1
	if raw, err := f.SyscallConn(); err == nil {
		_ = raw.Control(func(u uintptr) { fd = int(u) })
	}
	return fd
}
