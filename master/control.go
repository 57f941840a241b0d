package master

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/ctlclient"
	"github.com/molt-server/molt/master/safefile"
	"golang.org/x/sys/unix"
)

// The control socket (README "molt ctl"): a unix stream socket beside the
// pid file, mode 0600 from its bind on. A client sends one request, a JSON
// object on one line, and reads JSON lines back until one has "done":
// true. Peers are checked (SO_PEERCRED: this master's uid, or root); a
// request is bounded in size and time, and a malformed one gets an error
// reply and changes nothing; so are the connections served at once, and
// each reply line's write. Each request reaches the loop as an event with
// a reply channel.

// CtlRequest is one request on the control socket.
type CtlRequest struct {
	Cmd     string `json:"cmd"`               // status, upgrade, reload, scale, stop, reopen-logs
	Wait    bool   `json:"wait,omitempty"`    // upgrade, reload: reply with progress until the end
	Workers int    `json:"workers,omitempty"` // scale: the exact worker count
	Fast    bool   `json:"fast,omitempty"`    // stop: TERM instead of QUIT
	// All (stop): every live generation ends gracefully: an upgrade in
	// flight is abandoned (its new master rolls back as QUIT to it does)
	// and the old master drains; a committed master's draining
	// predecessor does not take the service back.
	All bool `json:"all,omitempty"`
}

// CtlReply is one line of a reply.
type CtlReply struct {
	OK      bool    `json:"ok"`
	Done    bool    `json:"done,omitempty"`
	Error   string  `json:"error,omitempty"`
	Message string  `json:"message,omitempty"`
	Status  *Status `json:"status,omitempty"`
}

// Bounds of the control protocol.
const (
	maxCtlRequest  = 4096
	ctlReadTimeout = 10 * time.Second
	// ctlWriteTimeout bounds each reply line: a client that stops reading
	// loses its connection, not a goroutine and an fd for ever.
	ctlWriteTimeout = 10 * time.Second
	ctlReplyBuffer  = 64
	// maxCtlConns bounds the connections served at once; one more is told
	// "busy" and closed. Idle ones end at ctlReadTimeout.
	maxCtlConns = 16
	// ctlAcceptBackoff bounds the wait after a failed accept (EMFILE...),
	// which doubles from 5 ms (as net/http's Serve).
	ctlAcceptBackoff = time.Second
	// ctlLogEvery spaces the log lines of repeated accept failures and
	// busy refusals.
	ctlLogEvery = 5 * time.Second
)

// ctlEvent carries a request to the loop. The loop sends replies on
// replies without blocking (it is buffered); the last one has Done set.
type ctlEvent struct {
	req     CtlRequest
	replies chan CtlReply
}

func (e ctlEvent) String() string { return "control request " + e.req.Cmd }

// controlSocket is the listening control socket.
type controlSocket struct {
	ln   *net.UnixListener
	path string
	log  hclog.Logger
	// Shared says who else can write the socket's directory ("" if
	// nobody), for the caller's warning.
	shared string
}

// openControlSocket binds the control socket at path, mode 0600 from the
// start (bindControl). What may already be at path is judged there.
func openControlSocket(path string, log hclog.Logger) (*controlSocket, error) {
	ln, shared, err := bindControl(path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return &controlSocket{ln: ln, path: path, log: log, shared: shared}, nil
}

// bindControl binds a unix socket at path that is never reachable with a
// mode wider than 0600, not even between bind and chmod: the socket's
// inode is fchmod'ed before bind(2), which creates the file with that
// mode less the umask (unix(7); a temporary umask would race with the
// master's other threads). Its directory must pass safefile.CheckDir.
// What is at path already: nothing, or a stale socket (nothing answers)
// of root or molt's user, which is replaced. Anything else — a live
// socket, a socket of another user, a symlink, a file — is an error
// naming it: molt never removes what it cannot tell is its own.
func bindControl(path string) (*net.UnixListener, string, error) {
	d, err := safefile.CheckDir(filepath.Dir(path))
	if err != nil {
		return nil, "", err
	}
	var st unix.Stat_t
	switch err := unix.Lstat(path, &st); {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return nil, "", &os.PathError{Op: "lstat", Path: path, Err: err}
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return nil, "", fmt.Errorf("refuse %s: it is a symlink; molt binds its control socket only where nothing is, or its own stale socket was: remove it", path)
	case st.Mode&unix.S_IFMT != unix.S_IFSOCK:
		return nil, "", fmt.Errorf("%s exists and is not a socket: remove it, or use another --control-socket", path)
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return nil, "", fmt.Errorf("refuse %s: it is a socket of uid %d, neither root nor molt's user (uid %d); molt does not remove it: remove it, or use a directory only root can write", path, st.Uid, os.Geteuid())
	default:
		if err := removeStaleSocket(path); err != nil {
			return nil, "", err
		}
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var ferr error
		if err := c.Control(func(fd uintptr) { ferr = unix.Fchmod(int(fd), 0o600) }); err != nil {
			return err
		}
		return ferr
	}}
	l, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, "", err
	}
	ln := l.(*net.UnixListener)
	ln.SetUnlinkOnClose(false) // release removes it (removeSocket)
	// A kernel that ignored the fchmod would have made it wider: refuse.
	if err := unix.Lstat(path, &st); err != nil || st.Mode&0o7177 != 0 {
		_ = ln.Close()
		_ = os.Remove(path)
		return nil, "", fmt.Errorf("%s: bound with mode %04o, want at most 0600: not served", path, st.Mode&0o7777)
	}
	return ln, d.Shared, nil
}

// serve accepts connections until the listener is closed; each is handled
// in a goroutine of its own that ends when its reply is done or the
// master has stopped. At most maxCtlConns are served at once. A failed
// accept (EMFILE: the master is out of fds for a moment) is logged, at
// most once per ctlLogEvery, and retried after a bounded, doubling wait:
// the control socket outlives it.
func (c *controlSocket) serve(send func(event) bool, done <-chan struct{}, allowed func(uid uint32) bool) {
	slots := make(chan struct{}, maxCtlConns)
	var (
		delay                   time.Duration
		failLog, okLog, busyLog logLimit
		failures                int // since the last "accepting again"
	)
	for {
		conn, err := c.ln.AcceptUnix()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			failures++
			if n, ok := failLog.allow(); ok {
				c.log.Warn("control socket: accept failed; retrying", "event", "control.accept_failed",
					"error", err, "suppressed", n, "retry_in", nextDelay(&delay).String())
			} else {
				nextDelay(&delay)
			}
			select {
			case <-time.After(delay):
			case <-done:
				return
			}
			continue
		}
		delay = 0
		if failures > 0 {
			// Limited too: fds that run out and come back in turn must
			// not log a pair of lines per accept.
			if _, ok := okLog.allow(); ok {
				c.log.Info("control socket: accepting again", "event", "control.accept_recovered", "failures", failures)
				failures = 0
			}
		}
		select {
		case slots <- struct{}{}:
			go func() {
				defer func() { <-slots }()
				handleCtlConn(conn, send, done, allowed)
			}()
		default:
			if n, ok := busyLog.allow(); ok {
				c.log.Warn("control socket: too many connections; one refused as busy", "event", "control.busy",
					"max", maxCtlConns, "suppressed", n)
			}
			// A new connection's send buffer is empty: this write does
			// not wait, and the deadline makes sure of it.
			_ = conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_ = json.NewEncoder(conn).Encode(CtlReply{Done: true, Error: fmt.Sprintf("busy: %d control connections are open; try again", maxCtlConns)})
			_ = conn.Close()
		}
	}
}

// nextDelay doubles *d from 5 ms up to ctlAcceptBackoff and returns it.
func nextDelay(d *time.Duration) time.Duration {
	switch {
	case *d == 0:
		*d = 5 * time.Millisecond
	case *d < ctlAcceptBackoff:
		*d = min(2**d, ctlAcceptBackoff)
	}
	return *d
}

// logLimit lets a repeated log line through at most once per ctlLogEvery
// and counts the ones it held back. One goroutine uses it.
type logLimit struct {
	last       time.Time
	suppressed int
}

// allow reports whether to log now and how many were held back since the
// last line logged.
func (l *logLimit) allow() (suppressed int, ok bool) {
	if !l.last.IsZero() && time.Since(l.last) < ctlLogEvery {
		l.suppressed++
		return 0, false
	}
	n := l.suppressed
	l.last, l.suppressed = time.Now(), 0
	return n, true
}

func handleCtlConn(conn *net.UnixConn, send func(event) bool, done <-chan struct{}, allowed func(uid uint32) bool) {
	defer conn.Close()
	enc := json.NewEncoder(conn)
	send1 := func(r CtlReply) error {
		_ = conn.SetWriteDeadline(time.Now().Add(ctlWriteTimeout))
		return enc.Encode(r)
	}
	fail := func(msg string) { _ = send1(CtlReply{Done: true, Error: msg}) }
	uid, err := peerUID(conn)
	if err != nil {
		fail("cannot identify the peer: " + err.Error())
		return
	}
	if !allowed(uid) {
		fail(fmt.Sprintf("permission denied: uid %d is neither this master's user nor root", uid))
		return
	}
	_ = conn.SetReadDeadline(time.Now().Add(ctlReadTimeout))
	req, err := readCtlRequest(conn)
	if err != nil {
		fail(err.Error())
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	ev := ctlEvent{req: req, replies: make(chan CtlReply, ctlReplyBuffer)}
	if !send(ev) {
		fail("the master is stopping")
		return
	}
	for {
		select {
		case r := <-ev.replies:
			if err := send1(r); err != nil || r.Done {
				return
			}
		case <-done:
			// Replies the loop sent before it ended still count.
			for {
				select {
				case r := <-ev.replies:
					if err := send1(r); err != nil || r.Done {
						return
					}
				default:
					fail("the master has exited")
					return
				}
			}
		}
	}
}

// readCtlRequest reads and parses one request line of at most
// maxCtlRequest bytes.
func readCtlRequest(r io.Reader) (CtlRequest, error) {
	line, err := bufio.NewReaderSize(io.LimitReader(r, maxCtlRequest+1), maxCtlRequest+1).ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxCtlRequest {
			return CtlRequest{}, fmt.Errorf("request larger than %d bytes", maxCtlRequest)
		}
		if !errors.Is(err, io.EOF) || len(line) == 0 {
			return CtlRequest{}, fmt.Errorf("read request: %v", err)
		}
	}
	return ParseCtlRequest(line)
}

// ErrCtlRequest is wrapped by every error ParseCtlRequest returns.
var ErrCtlRequest = errors.New("bad control request")

// ParseCtlRequest parses one request line and checks its arguments.
func ParseCtlRequest(b []byte) (CtlRequest, error) {
	var req CtlRequest
	if len(b) > maxCtlRequest {
		return req, fmt.Errorf("%w: larger than %d bytes", ErrCtlRequest, maxCtlRequest)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return CtlRequest{}, fmt.Errorf("%w: %v", ErrCtlRequest, err)
	}
	if rest := bytes.TrimSpace(b[dec.InputOffset():]); len(rest) > 0 {
		return CtlRequest{}, fmt.Errorf("%w: more than one JSON value", ErrCtlRequest)
	}
	if req.All && (req.Cmd != "stop" || req.Fast) {
		return CtlRequest{}, fmt.Errorf("%w: all is for a graceful stop only", ErrCtlRequest)
	}
	switch req.Cmd {
	case "status", "upgrade", "reload", "stop", "reopen-logs":
	case "scale":
		if req.Workers < 1 || req.Workers > maxWorkers {
			return CtlRequest{}, fmt.Errorf("%w: scale to %d workers: want 1 to %d", ErrCtlRequest, req.Workers, maxWorkers)
		}
	case "":
		return CtlRequest{}, fmt.Errorf("%w: no cmd", ErrCtlRequest)
	default:
		return CtlRequest{}, fmt.Errorf("%w: unknown cmd %q", ErrCtlRequest, req.Cmd)
	}
	return req, nil
}

// peerUID is the uid of the process at the other end (SO_PEERCRED).
func peerUID(conn *net.UnixConn) (uint32, error) {
	cred, err := ctlclient.PeerCred(conn)
	if err != nil {
		return 0, err
	}
	return cred.Uid, nil
}

// ctlAllowed is the peer check: the master's own uid, or root.
func ctlAllowed(self uint32) func(uid uint32) bool {
	return func(uid uint32) bool { return uid == self || uid == 0 }
}

// close stops accepting; the socket path is the caller's to remove.
func (c *controlSocket) close() error { return c.ln.Close() }

// toOld renames the control socket's path to PATH.oldbin: the new master
// binds its own at PATH (the control socket is never passed on).
func (c *controlSocket) toOld() error {
	if err := os.Rename(c.path, c.path+oldSuffix); err != nil {
		return fmt.Errorf("rename control socket: %w", err)
	}
	c.path += oldSuffix
	return nil
}

// fromOld renames it back after a rollback.
func (c *controlSocket) fromOld() error {
	orig, moved := strings.CutSuffix(c.path, oldSuffix)
	if !moved {
		return nil // toOld failed: it never moved
	}
	if err := os.Rename(c.path, orig); err != nil {
		return fmt.Errorf("rename control socket back: %w", err)
	}
	c.path = orig
	return nil
}
