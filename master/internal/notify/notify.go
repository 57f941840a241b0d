// Package notify is the receiving end of systemd's notify protocol, as
// molt's master (for its workers) and keeper (for its masters) run it: a
// unix datagram socket in the abstract namespace with SO_PASSCRED, and a
// parser of its datagrams that no sender can make panic.
package notify

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// Socket is a NOTIFY_SOCKET: a unix datagram socket in the abstract
// namespace (no file to clean up after a crash; workers that drop
// privileges can still reach it) with SO_PASSCRED, so every datagram
// carries the sender's pid as the kernel saw it (sd_notify(3)).
type Socket struct {
	// f wraps the non-blocking socket so that reads go through the Go
	// poller: close then wakes a blocked reader safely, with no window in
	// which the fd number could be reused under it.
	f *os.File
	// Addr is the address as senders see it: "@molt/...".
	Addr string
}

// Msg is one datagram as the reader saw it. Pgid is looked up the moment
// the datagram is read, while its sender most likely still lives:
// systemd-notify exits right after sending (its BARRIER=1 makes it wait
// for the receiver to close the fd it passes, which the receiver does
// after handling the message).
type Msg struct {
	Pid, Pgid int
	Fields    worker.Notification
	Err       error // malformed datagram or missing credentials
	FDs       []int // passed with the datagram; the receiver closes them (CloseFDs)
}

// maxNotifyFDs is how many descriptors one datagram may carry (SCM_MAX_FD).
const maxNotifyFDs = 253

// Open binds a new socket at a fresh abstract address.
func Open() (*Socket, error) {
	var b [8]byte
	_, _ = rand.Read(b[:])
	name := fmt.Sprintf("molt/%d/%s", os.Getpid(), hex.EncodeToString(b[:]))
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("notify socket: SO_PASSCRED: %w", err)
	}
	// A leading NUL in the address selects the abstract namespace; '@' is
	// how NOTIFY_SOCKET spells it.
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: "\x00" + name}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("notify socket: bind @%s: %w", name, err)
	}
	return &Socket{f: os.NewFile(uintptr(fd), "notify"), Addr: "@" + name}, nil
}

// Read blocks for the next datagram. It returns an error only when the
// socket is closed (wrapping os.ErrClosed) or broken; a bad datagram is a
// Msg with Err set.
func (s *Socket) Read() (Msg, error) {
	buf := make([]byte, worker.MaxNotifySize+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*maxNotifyFDs))
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
	return ParseDatagram(buf[:n], oob[:oobn], flags), nil
}

// ParseDatagram interprets one datagram and its control messages.
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
		// Decoded here rather than with x/sys's ParseUnixRights and
		// ParseUnixCredentials, which index the data before checking its
		// length (found by FuzzParseDatagram): the kernel never sends it
		// short, but a parser of outside input must not be able to panic.
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
	switch {
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || len(data) > worker.MaxNotifySize:
		m.Err = fmt.Errorf("%w: larger than %d bytes or too many fds", worker.ErrNotifyMessage, worker.MaxNotifySize)
	case m.Pid <= 0:
		m.Err = errors.New("no sender credentials")
	default:
		m.Fields, m.Err = worker.ParseNotify(data)
	}
	if m.Pid > 0 {
		if pgid, err := unix.Getpgid(m.Pid); err == nil {
			m.Pgid = pgid
		}
	}
	return m
}

// Close closes the socket; a blocked Read returns an error.
func (s *Socket) Close() error { return s.f.Close() }

// CloseFDs closes descriptors received with a datagram.
func CloseFDs(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}
