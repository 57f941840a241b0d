package master

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ListenSpec is one --listen flag: a named TCP or unix-socket address.
type ListenSpec struct {
	// Name is what workers see in LISTEN_FDNAMES and what the listener
	// travels under between masters.
	Name string
	// Network is "tcp" or "unix".
	Network string
	// Address is host:port for tcp, a filesystem path for unix.
	Address string
	// Blocking (the listen option ",blocking") puts the socket in
	// blocking mode, for workers that accept(2) in blocking mode as
	// systemd-socket-activate allows. The mode belongs to the socket, so
	// every process holding it shares it; the master keeps it blocking
	// (heal.go). Workers of the Go worker package refuse such a listener
	// (worker.Listeners). Without the option the socket is non-blocking.
	Blocking bool
}

// optBlocking is the listen option that sets ListenSpec.Blocking.
const optBlocking = "blocking"

// String formats the spec as it is written on the command line.
func (s ListenSpec) String() string {
	out := s.Name + "=" + s.Address
	if s.Network == "unix" {
		out = s.Name + "=unix:" + s.Address
	}
	if s.Blocking {
		out += "," + optBlocking
	}
	return out
}

// ParseListen parses one --listen value: ADDR or NAME=ADDR, where ADDR is
// host:port, [v6addr]:port, :port or unix:/path, optionally followed by
// the option ",blocking". index gives the default name "l<index>". Host
// names are resolved only when binding. A unix path may hold commas: only
// a trailing ",blocking" is taken as the option.
func ParseListen(value string, index int) (ListenSpec, error) {
	spec := ListenSpec{Name: "l" + strconv.Itoa(index)}
	addr := value
	if name, rest, ok := strings.Cut(value, "="); ok && !strings.ContainsAny(name, ":/[") {
		if err := validName(name); err != nil {
			return ListenSpec{}, fmt.Errorf("listen %q: %w", value, err)
		}
		spec.Name, addr = name, rest
	}
	if rest, ok := strings.CutSuffix(addr, ","+optBlocking); ok {
		spec.Blocking, addr = true, rest
	}
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if path == "" {
			return ListenSpec{}, fmt.Errorf("listen %q: empty unix socket path", value)
		}
		if len(path) >= len(unix.RawSockaddrUnix{}.Path) {
			return ListenSpec{}, fmt.Errorf("listen %q: unix socket path longer than %d bytes", value, len(unix.RawSockaddrUnix{}.Path)-1)
		}
		spec.Network, spec.Address = "unix", path
		return spec, nil
	}
	if a, opt, ok := strings.Cut(addr, ","); ok {
		if _, _, err := net.SplitHostPort(a); err == nil {
			return ListenSpec{}, fmt.Errorf("listen %q: unknown listen option %q (there is only %q)", value, opt, optBlocking)
		}
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ListenSpec{}, fmt.Errorf("listen %q: want host:port, [ipv6]:port, :port or unix:/path: %w", value, err)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return ListenSpec{}, fmt.Errorf("listen %q: port %q is not a number from 0 to 65535", value, port)
	}
	if strings.Contains(host, ":") && net.ParseIP(host) == nil {
		return ListenSpec{}, fmt.Errorf("listen %q: %q is not an IPv6 address", value, host)
	}
	spec.Network, spec.Address = "tcp", net.JoinHostPort(host, port)
	return spec, nil
}

// validName accepts what can travel in LISTEN_FDNAMES (sd_listen_fds(3):
// printable, no ':'), restricted further to a readable set.
func validName(name string) error {
	if name == "" || len(name) > 255 {
		return errors.New("listener name must be 1 to 255 characters")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return fmt.Errorf("listener name %q: use letters, digits, '_', '-' and '.'", name)
		}
	}
	return nil
}

// ParseListeners parses every --listen value in order and rejects
// duplicate names and duplicate addresses.
func ParseListeners(values []string) ([]ListenSpec, error) {
	var specs []ListenSpec
	names := map[string]bool{}
	addrs := map[string]bool{}
	for i, v := range values {
		s, err := ParseListen(v, i)
		if err != nil {
			return nil, err
		}
		if names[s.Name] {
			return nil, fmt.Errorf("listen %q: listener name %q used twice", v, s.Name)
		}
		key := s.Network + " " + s.Address
		if addrs[key] && !strings.HasSuffix(s.Address, ":0") {
			return nil, fmt.Errorf("listen %q: address used twice", v)
		}
		names[s.Name], addrs[key] = true, true
		specs = append(specs, s)
	}
	return specs, nil
}

// BindError reports a listener that could not be bound.
type BindError struct {
	Spec ListenSpec
	Err  error
}

func (e *BindError) Error() string {
	return fmt.Sprintf("bind %s: %v", e.Spec, e.Err)
}

func (e *BindError) Unwrap() error { return e.Err }

// bind opens the listening socket of spec and returns a close-on-exec
// duplicate of it as a file; the Go listener is closed (the socket lives on
// in the duplicate). The socket stays in non-blocking mode: the duplicate is
// made with fcntl on the raw fd, never through os.File.Fd (DESIGN §4).
func bind(spec ListenSpec, socketMode os.FileMode) (*os.File, error) {
	var (
		ln  net.Listener
		err error
	)
	switch spec.Network {
	case "unix":
		ln, err = bindUnix(spec.Address, socketMode)
	default:
		// An IPv6 host ([::]:80, [::1]:80) listens on IPv6 only, so that
		// 0.0.0.0:80 can be another listener; :80 is dual-stack.
		network := "tcp"
		if host, _, _ := net.SplitHostPort(spec.Address); strings.Contains(host, ":") {
			network = "tcp6"
		}
		ln, err = (&net.ListenConfig{}).Listen(context.Background(), network, spec.Address)
	}
	if err != nil {
		return nil, &BindError{Spec: spec, Err: err}
	}
	defer ln.Close()
	f, err := dupListener(ln.(syscall.Conn), spec.Name)
	if err != nil {
		return nil, &BindError{Spec: spec, Err: err}
	}
	return f, nil
}

// bindUnix binds a unix stream socket at path. A socket file left by a
// crashed run is removed first, but only when nothing answers on it.
func bindUnix(path string, mode os.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := removeStaleSocket(path); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// molt owns unlinking: the path is removed only at final shutdown of the
	// last generation (DESIGN §4, "Unix sockets: molt owns unlinking").
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if mode != 0 {
		if err := os.Chmod(path, mode); err != nil {
			_ = ln.Close()
			_ = os.Remove(path)
			return nil, fmt.Errorf("set socket mode %#o: %w", mode, err)
		}
	}
	return ln, nil
}

// removeStaleSocket removes the socket file at path if nothing accepts
// on it (a crashed run's); a live one is an error.
func removeStaleSocket(path string) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		_ = c.Close()
		return fmt.Errorf("%s: %w (another process accepts on it)", path, syscall.EADDRINUSE)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("probe stale socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// dupListener duplicates the socket of c as a close-on-exec *os.File,
// through the raw fd so that the blocking mode is left alone.
func dupListener(c syscall.Conn, name string) (*os.File, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var (
		nfd  int
		derr error
	)
	if err := raw.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup: %w", derr)
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// rawFD returns the descriptor number of f without os.File.Fd, which would
// switch the socket to blocking mode. The caller keeps f alive while it uses
// the number.
func rawFD(f *os.File) (int, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := raw.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// localAddr returns the bound address of the socket in f ("127.0.0.1:43211"
// or the unix path), for logs and status.
func localAddr(f *os.File) (string, error) {
	fd, err := rawFD(f)
	if err != nil {
		return "", err
	}
	_, addr, err := sockName(fd)
	return addr, err
}

// sockName returns the network ("tcp" or "unix") and the bound address of
// the socket fd, as localAddr formats it.
func sockName(fd int) (network, addr string, err error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "", "", fmt.Errorf("getsockname: %w", err)
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return "tcp", net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port)), nil
	case *unix.SockaddrInet6:
		return "tcp", net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port)), nil
	case *unix.SockaddrUnix:
		return "unix", a.Name, nil
	}
	return "", "", fmt.Errorf("not a TCP or unix socket (%T)", sa)
}

// inheritedListener describes an inherited socket this master does not
// serve, from the socket itself, so that closeListener can close it.
func inheritedListener(name string, f *os.File) *listener {
	l := &listener{spec: ListenSpec{Name: name, Network: "tcp"}, file: f, inherited: true}
	if fd, err := rawFD(f); err == nil {
		if network, addr, err := sockName(fd); err == nil {
			l.spec.Network, l.addr = network, addr
		}
	}
	l.spec.Address = l.addr
	return l
}

// setBacklog sets the listen backlog of the socket in f: listen(2) on a
// listening socket only updates its backlog, in every process holding it.
func setBacklog(f *os.File, backlog int) error {
	fd, err := rawFD(f)
	if err != nil {
		return err
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return fmt.Errorf("set backlog %d: %w", backlog, err)
	}
	return nil
}

// setBlocking puts the socket in f in blocking mode (ListenSpec.Blocking)
// or in non-blocking mode, for every process holding it, through the raw
// fd. It reports whether it changed the mode.
func setBlocking(f *os.File, blocking bool) (bool, error) {
	fd, err := rawFD(f)
	if err != nil {
		return false, err
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return false, fmt.Errorf("get the blocking mode: %w", err)
	}
	if (fl&unix.O_NONBLOCK == 0) == blocking {
		return false, nil
	}
	if err := unix.SetNonblock(fd, !blocking); err != nil {
		return false, fmt.Errorf("set blocking mode %v: %w", blocking, err)
	}
	return true, nil
}

// specMatches reports whether a socket bound at addr (its getsockname)
// can serve spec: the same unix path; for TCP, the same port unless spec
// asks for any (0), and the same IP when spec names a literal one (":80"
// matches only the unspecified address). A host name is not resolved
// again: it matches.
func specMatches(spec ListenSpec, addr string) bool {
	if spec.Network == "unix" {
		a, err1 := filepath.Abs(spec.Address)
		b, err2 := filepath.Abs(addr)
		return err1 == nil && err2 == nil && a == b
	}
	host, port, err := net.SplitHostPort(spec.Address)
	ahost, aport, err2 := net.SplitHostPort(addr)
	if err != nil || err2 != nil {
		return true
	}
	if _, perr := strconv.Atoi(port); perr == nil && port != "0" && port != aport {
		return false // a service name ("http") is not judged
	}
	got := net.ParseIP(ahost)
	if host == "" {
		return got != nil && got.IsUnspecified()
	}
	if want := net.ParseIP(host); want != nil {
		return got != nil && want.Equal(got)
	}
	return true
}
