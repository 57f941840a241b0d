package master

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// Socket activation in (sd_listen_fds(3)): a master started by systemd,
// systemd-socket-activate or the keeper with LISTEN_FDS adopts those
// sockets for the configured listeners instead of binding. An adopted
// socket then travels to every new master like a bound one; it is marked
// activated, because its address and unix path belong to whoever created
// it: molt never unlinks its path, and a reload or an upgrade that would
// drop or move it is refused.
//
// The same variables also bring back the sockets the keeper stored in
// systemd's fd store (keeper/fdstore.go) when the whole service
// restarts: systemd passes both kinds in one list, and the stored ones
// are named keeper.StoredNamePrefix+<listener name>. Those are molt's
// own sockets, not activated ones: each goes back to the listener of its
// name if it is still at that address, as if bound anew (a reload or
// upgrade may drop or move it later), and one the configuration no
// longer has (or a unix socket whose path is gone) is closed and removed
// from the keeper's store.

// activatedSocket is one listening socket passed by socket activation.
type activatedSocket struct {
	fd      int
	name    string // from LISTEN_FDNAMES; "unknown" when unnamed
	network string // "tcp" or "unix"
	addr    string // its getsockname, as localAddr formats it
	file    *os.File
	taken   bool
	// stored: from the keeper's store in systemd's (name without the
	// prefix), not from socket activation.
	stored bool
}

func (s *activatedSocket) String() string {
	return fmt.Sprintf("fd %d (name %q, %s %s)", s.fd, s.name, s.network, s.addr)
}

// ActivatedFDs returns the descriptors socket activation passed to this
// very process (LISTEN_PID is its pid): 3, 4, ..., each checked to be a
// listening stream socket and set close-on-exec. A keeper passes them on
// to its first master at the same numbers, as raw descriptors (an
// *os.File could switch the shared socket's blocking mode; DESIGN §4). It
// returns nil, nil when the process was not activated.
func ActivatedFDs() ([]int, error) {
	socks, err := activation(func(pid int) bool { return pid == os.Getpid() })
	if socks == nil || err != nil {
		return nil, err // not activated (the keeper then drops LISTEN_*), or broken
	}
	fds := make([]int, len(socks))
	for i, s := range socks {
		fds[i] = s.fd
	}
	return fds, nil
}

// takeActivation returns the sockets passed to this master: LISTEN_PID is
// its own pid (systemd, systemd-socket-activate, --no-keeper), or that of
// the keeper that started it (MOLT_KEEPER_PID, its parent), which passed
// them on unchanged. The LISTEN_ variables are removed from the
// environment either way, so that no later child (a new master) takes
// them for its own.
func takeActivation() ([]*activatedSocket, error) {
	defer func() {
		for _, k := range []string{worker.EnvListenPID, worker.EnvListenFDs, worker.EnvListenFDNames} {
			_ = os.Unsetenv(k)
		}
	}()
	keeperPID, _ := strconv.Atoi(os.Getenv(keeper.EnvKeeperPID))
	socks, err := activation(func(pid int) bool {
		return pid == os.Getpid() || keeperPID > 0 && pid == keeperPID && pid == os.Getppid()
	})
	if err != nil {
		return nil, err
	}
	return socks, adopt(socks)
}

// activation checks the sockets passed to a process forPID accepts
// (worker.ActivationNames reads the variables).
func activation(forPID func(pid int) bool) ([]*activatedSocket, error) {
	names, err := worker.ActivationNames(forPID)
	if names == nil || err != nil {
		if err != nil {
			err = fmt.Errorf("socket activation: %w", err)
		}
		return nil, err
	}
	socks := make([]*activatedSocket, len(names))
	for i, name := range names {
		fd := worker.ListenFDsStart + i
		if socks[i], err = checkFD(fd, name); err != nil {
			return nil, fmt.Errorf("socket activation (%s=%d): fd %d (name %q): %w", worker.EnvListenFDs, len(names), fd, name, err)
		}
		if n, ok := strings.CutPrefix(name, keeper.StoredNamePrefix); ok {
			socks[i].name, socks[i].stored = n, true
		}
	}
	return socks, nil
}

// adopt takes the checked sockets as files, in non-blocking mode like
// the sockets molt binds itself (systemd may pass them blocking; the mode
// is shared by every process holding the socket, DESIGN §4).
func adopt(socks []*activatedSocket) error {
	for _, s := range socks {
		if err := unix.SetNonblock(s.fd, true); err != nil {
			return fmt.Errorf("socket activation: fd %d: set non-blocking: %w", s.fd, err)
		}
	}
	for _, s := range socks {
		s.file = os.NewFile(uintptr(s.fd), s.name)
	}
	return nil
}

// checkFD checks that fd is a listening TCP or unix stream socket and sets
// it close-on-exec.
func checkFD(fd int, name string) (*activatedSocket, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("not open: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("not a socket")
	}
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return nil, fmt.Errorf("not a stream socket (datagram and seqpacket sockets cannot serve workers)")
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return nil, fmt.Errorf("not a listening socket")
	}
	network, addr, err := sockName(fd)
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(fd)
	return &activatedSocket{fd: fd, name: name, network: network, addr: addr}, nil
}

// splitStored matches the sockets that came back from the fd store
// (stored) to the listeners of their names at their addresses, and
// returns them by listener name, the other sockets (activated ones, for
// matchActivated), and the stored sockets no listener takes, which the
// caller closes (their listener was dropped or moved meanwhile).
func splitStored(specs []ListenSpec, socks []*activatedSocket) (map[string]*activatedSocket, []*activatedSocket, []*activatedSocket) {
	out := map[string]*activatedSocket{}
	var rest, unused []*activatedSocket
	for _, s := range socks {
		if !s.stored {
			rest = append(rest, s)
			continue
		}
		taken := false
		for _, spec := range specs {
			if spec.Name == s.name && out[spec.Name] == nil && spec.Network == s.network && specMatches(spec, s.addr) && reachable(s) {
				s.taken, out[spec.Name], taken = true, s, true
				break
			}
		}
		if !taken {
			unused = append(unused, s)
		}
	}
	return out, rest, unused
}

// reachable: clients can still reach a stored socket. A unix socket's
// path is removed when the last generation stops (a stop of the whole
// service, whose restart brings the socket back from systemd's store),
// and nothing can connect to a socket without its path: it is bound anew
// instead.
func reachable(s *activatedSocket) bool {
	if s.network != "unix" {
		return true
	}
	fi, err := os.Lstat(s.addr)
	return err == nil && fi.Mode()&os.ModeSocket != 0
}

// matchActivated pairs each passed socket with a configured listener:
// first by name (a socket named as a listener must be at its address),
// then, for sockets no name claimed, by address, in fd order. A socket
// that pairs with no listener is an error: nobody would ever accept the
// connections queued on it. Listeners left without a socket are bound as
// usual. The result maps listener names to their sockets.
func matchActivated(specs []ListenSpec, socks []*activatedSocket) (map[string]*activatedSocket, error) {
	out := map[string]*activatedSocket{}
	fits := func(spec ListenSpec, s *activatedSocket) bool {
		return spec.Network == s.network && specMatches(spec, s.addr)
	}
	for _, spec := range specs {
		var named []*activatedSocket
		for _, s := range socks {
			if !s.taken && s.name == spec.Name {
				named = append(named, s)
			}
		}
		if len(named) == 0 {
			continue
		}
		found := false
		for _, s := range named {
			if fits(spec, s) {
				s.taken, out[spec.Name], found = true, s, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("%w: socket activation passed %s, but listener %s has another address; make them agree", ErrConfig, named[0], spec)
		}
	}
	for _, s := range socks {
		if s.taken {
			continue
		}
		for _, spec := range specs {
			if out[spec.Name] == nil && fits(spec, s) {
				s.taken, out[spec.Name] = true, s
				break
			}
		}
	}
	var left []string
	for _, s := range socks {
		if !s.taken {
			left = append(left, s.String())
		}
	}
	if len(left) > 0 {
		return nil, fmt.Errorf("%w: socket activation passed %s, which matches no listener by name or address; add a --listen NAME=ADDR for it, or remove it from the socket unit", ErrConfig, strings.Join(left, ", "))
	}
	return out, nil
}
