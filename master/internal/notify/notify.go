// Package notify is the receiving end of systemd's notify protocol, as
// molt's master (for its workers) and keeper (for its masters) run it: a
// unix datagram socket at a path in a private directory, with
// SO_PASSCRED, a parser of its datagrams that no sender can make panic,
// the checks of who may speak, and a throttled log of what was rejected.
package notify

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/safefile"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// Socket is a NOTIFY_SOCKET: a unix datagram socket bound at a path, with
// SO_PASSCRED, so every datagram carries the sender's pid as the kernel
// saw it (sd_notify(3)). Not in the abstract namespace: abstract sockets
// have no permissions, and any local user could write to them.
type Socket struct {
	// f wraps the non-blocking socket so that reads go through the Go
	// poller: close then wakes a blocked reader safely, with no window in
	// which the fd number could be reused under it.
	f *os.File
	// Addr is the socket's path: what NOTIFY_SOCKET says.
	Addr string
	// maxFDs is how many descriptors Read takes from one datagram
	// (AcceptFDs); 0: none, the kernel closes them unread.
	maxFDs int
}

// Msg is one datagram as the reader saw it.
type Msg struct {
	Pid    int // the sender, from the kernel's credentials
	Fields worker.Notification
	Err    error // malformed datagram or missing credentials
	// FDsDiscarded: the sender passed descriptors; the kernel closed them
	// unread (the receive buffer has room for credentials only). That
	// close is what systemd-notify's BARRIER=1 waits for. On a socket
	// that accepts descriptors (AcceptFDs), it means the sender passed
	// more than fit: the kernel closed those beyond FDs.
	FDsDiscarded bool
	// FDs are the descriptors the datagram carried (SCM_RIGHTS), on a
	// socket that accepts them (AcceptFDs): installed close-on-exec in
	// this process, and the receiver's to close (CloseFDs) or keep.
	FDs []int
}

// CloseFDs closes the descriptors the datagram carried, and forgets them.
func (m *Msg) CloseFDs() {
	for _, fd := range m.FDs {
		_ = unix.Close(fd)
	}
	m.FDs = nil
}

// oobSize is room for the credentials and nothing else: descriptors a
// sender passes do not fit, so the kernel sets MSG_CTRUNC and closes them
// instead of installing them in the receiver (scm_detach_fds). A flood
// of datagrams carrying fds can then never raise the receiver's fd count.
var oobSize = unix.CmsgSpace(unix.SizeofUcred)

// AcceptFDs makes Read take up to max descriptors per datagram into
// Msg.FDs instead of leaving the kernel to close them unread: the
// receive buffer gets room for them (the kernel closes any beyond, and
// reports it: Msg.FDsDiscarded). Call it before the first Read. The
// caller must close or keep every descriptor of every Msg; at most max
// are open at a time per Read, whoever sends them.
func (s *Socket) AcceptFDs(max int) {
	if max > 0 {
		s.maxFDs = max
	}
}

// MaxPathLen is the longest socket path sockaddr_un can hold.
const MaxPathLen = len(unix.RawSockaddrUnix{}.Path) - 1

// Listen binds a new socket at path with the given mode (0600: only its
// owner may send), then, if uid >= 0, hands the socket file to uid:gid.
// The mode is set on the socket before bind, by fchmod, and Linux gives
// the file the socket inode's mode: the file never exists with a wider
// one, and no process-wide umask is touched (the callers are
// multithreaded). The chown does not follow symlinks; path is in a
// directory only the caller can write.
func Listen(path string, mode os.FileMode, uid, gid int) (*Socket, error) {
	if len(path) > MaxPathLen {
		return nil, fmt.Errorf("notify socket %s: path longer than %d bytes", path, MaxPathLen)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("notify socket %s: %w", path, err)
	}
	fail := func(what string, err error) (*Socket, error) {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("notify socket %s: %s: %w", path, what, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		return fail("SO_PASSCRED", err)
	}
	if err := unix.Fchmod(fd, uint32(mode.Perm())); err != nil {
		return fail("fchmod", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err)
	}
	if uid >= 0 {
		if err := unix.Fchownat(unix.AT_FDCWD, path, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			_ = os.Remove(path)
			return fail("chown", err)
		}
	}
	return &Socket{f: os.NewFile(uintptr(fd), "notify "+path), Addr: path}, nil
}

// PrivateDir creates a new directory for notify sockets under the
// directory systemd gives the service ($RUNTIME_DIRECTORY, its first
// entry) or else os.TempDir(), with the given mode, owned by this
// process. A process that crashes leaves it behind (nothing listens on
// its sockets any more); a clean exit removes it.
func PrivateDir(prefix string, mode os.FileMode) (string, error) {
	base := os.TempDir()
	if rd, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":"); rd != "" {
		base = rd
	}
	dir, err := os.MkdirTemp(base, prefix)
	if err != nil {
		return "", fmt.Errorf("notify socket directory: %w", err)
	}
	// MkdirTemp made it 0700; only its owner (this process) can have
	// changed it since.
	if err := os.Chmod(dir, mode.Perm()); err != nil {
		_ = os.Remove(dir)
		return "", fmt.Errorf("notify socket directory %s: %w", dir, err)
	}
	return dir, nil
}

// Read blocks for the next datagram. It returns an error only when the
// socket is closed (wrapping os.ErrClosed) or broken; a bad datagram is a
// Msg with Err set.
func (s *Socket) Read() (Msg, error) {
	buf := make([]byte, worker.MaxNotifySize+1)
	size := oobSize
	if s.maxFDs > 0 {
		size += unix.CmsgSpace(4 * s.maxFDs)
	}
	oob := make([]byte, size)
	rc, err := s.f.SyscallConn()
	if err != nil {
		return Msg{}, err
	}
	var (
		n, oobn, flags int
		rerr           error
	)
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
			if !errors.Is(rerr, unix.EINTR) {
				// false (EAGAIN) waits for the poller; retrying EINTR here
				// instead matters: the poller is edge-triggered and would
				// not report data that is already queued again.
				return !errors.Is(rerr, unix.EAGAIN)
			}
		}
	})
	if err != nil {
		// RawRead fails only once the file is closed (poll's "use of
		// closed file" is not os.ErrClosed; callers test for the latter).
		return Msg{}, fmt.Errorf("notify socket: %w (%v)", os.ErrClosed, err)
	}
	if rerr != nil {
		return Msg{}, fmt.Errorf("notify socket: recvmsg: %w", rerr)
	}
	m := ParseDatagram(buf[:n], oob[:oobn], flags)
	if s.maxFDs == 0 && len(m.FDs) > 0 {
		closeInstalled(oob[:oobn])
		m.FDs, m.FDsDiscarded = nil, true
	}
	return m, nil
}

// closeInstalled closes any descriptor the kernel installed after all:
// with a credentials-only buffer it never does, but this keeps the
// promise that the receiver holds none even if that changed.
func closeInstalled(oob []byte) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, c := range cmsgs {
		if c.Header.Level == unix.SOL_SOCKET && c.Header.Type == unix.SCM_RIGHTS {
			for i := 0; i+4 <= len(c.Data); i += 4 {
				_ = unix.Close(int(int32(binary.NativeEndian.Uint32(c.Data[i:]))))
			}
		}
	}
}

// ParseDatagram interprets one datagram and its control messages. It
// never closes anything: the descriptors a fuzzer names are not ours.
// The descriptors of SCM_RIGHTS are listed in FDs; FDsDiscarded says the
// kernel discarded some (MSG_CTRUNC). A socket that does not accept
// descriptors (Read) closes any listed and reports them discarded.
func ParseDatagram(data, oob []byte, flags int) Msg {
	var m Msg
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		m.Err = fmt.Errorf("control message: %w", err)
		return m
	}
	for _, c := range cmsgs {
		if c.Header.Level != unix.SOL_SOCKET {
			continue
		}
		// Decoded here rather than with x/sys's ParseUnixCredentials,
		// which indexes the data before checking its length (found by
		// FuzzParseDatagram): the kernel never sends it short, but a
		// parser of outside input must not be able to panic.
		switch c.Header.Type {
		case unix.SCM_RIGHTS:
			for i := 0; i+4 <= len(c.Data); i += 4 {
				m.FDs = append(m.FDs, int(int32(binary.NativeEndian.Uint32(c.Data[i:]))))
			}
		case unix.SCM_CREDENTIALS:
			if len(c.Data) >= unix.SizeofUcred { // struct ucred: pid, uid, gid
				m.Pid = int(int32(binary.NativeEndian.Uint32(c.Data)))
			}
		}
	}
	// MSG_CTRUNC is expected: it is how the kernel reports descriptors it
	// discarded. The credentials come first (scm_recv), so they are whole.
	if flags&unix.MSG_CTRUNC != 0 {
		m.FDsDiscarded = true
	}
	switch {
	case flags&unix.MSG_TRUNC != 0 || len(data) > worker.MaxNotifySize:
		m.Err = fmt.Errorf("%w: larger than %d bytes", worker.ErrNotifyMessage, worker.MaxNotifySize)
	case m.Pid <= 0:
		m.Err = errors.New("no sender credentials")
	default:
		m.Fields, m.Err = worker.ParseNotify(data)
	}
	return m
}

// Close closes the socket; a blocked Read returns an error. The socket
// file stays: the caller removes it (or its whole directory).
func (s *Socket) Close() error { return s.f.Close() }

// RejectedLogEvery is how often the master and the keeper log rejected
// notify datagrams, with their count.
const RejectedLogEvery = 5 * time.Second

// Rejected logs rejected datagrams at most once per interval: the first
// at once, then one line per interval with the count of those since, the
// last sender's pid and the last reason (event "notify.rejected"). A
// flood of rejected datagrams is a few lines, not one per datagram.
type Rejected struct {
	log      hclog.Logger
	interval time.Duration
	socket   string
	message  string
	event    []any // the log line's "event" key and value

	mu      sync.Mutex
	count   int
	lastPid int
	reason  string
	armed   bool // a flush is due; lines until then only count
	closed  bool
}

// NewRejected logs to log, at most once per interval, about socket.
func NewRejected(log hclog.Logger, socket string, interval time.Duration) *Rejected {
	return NewRejectedAs(log, socket, interval, "notify messages rejected", "event", "notify.rejected")
}

// NewRejectedAs is NewRejected with another message and event (the log
// line's "event" key and its value), for another kind of rejection on
// the same socket.
func NewRejectedAs(log hclog.Logger, socket string, interval time.Duration, message string, event ...any) *Rejected {
	return &Rejected{log: log, socket: socket, interval: interval, message: message, event: event}
}

// Add counts one rejected datagram.
func (r *Rejected) Add(pid int, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.count++
	r.lastPid, r.reason = pid, reason
	if r.armed || r.closed {
		return
	}
	r.flushLocked()
}

// flushLocked logs what was counted and arms the next flush.
func (r *Rejected) flushLocked() {
	if r.count == 0 {
		r.armed = false
		return
	}
	r.log.Warn(r.message, append(append([]any{}, r.event...), "count", r.count,
		"last_pid", r.lastPid, "reason", r.reason, "socket", r.socket)...)
	r.count = 0
	r.armed = true
	time.AfterFunc(r.interval, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if !r.closed {
			r.flushLocked()
		}
	})
}

// Close logs what is still counted and stops the timer's next line.
func (r *Rejected) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if r.count > 0 {
		r.flushLocked()
	}
	r.closed = true
}

// SessionOf is getsid(2): the session pid is in, or an error once it is
// gone.
func SessionOf(pid int) (int, error) { return unix.Getsid(pid) }

// SpeaksFor decides whether a datagram from sender speaks for the worker
// whose pid (and so session id: every worker starts in a session of its
// own) is worker: only a process in that session may, the worker itself
// or one of its descendants that stayed in its session (systemd-notify
// run by a shell-script worker). Processes cannot join another session,
// so a worker's child cannot speak for a sibling, and a stranger cannot
// speak for any. getsid is a seam for tests. reason says why not.
func SpeaksFor(getsid func(int) (int, error), sender, worker int) (ok bool, reason string) {
	if sender <= 0 || worker <= 0 {
		return false, "no sender"
	}
	sid, err := getsid(sender)
	switch {
	case err != nil:
		return false, "sender gone: " + err.Error()
	case sid != worker:
		return false, fmt.Sprintf("sender in session %d, not the worker's (%d)", sid, worker)
	}
	return true, ""
}

// RemoveDir removes a private directory of sockets: the sockets in it,
// then the directory. Nothing else belongs there.
func RemoveDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range ents {
		if err := safefile.RemoveSocket(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
