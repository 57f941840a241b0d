package master

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The control socket (README "molt ctl"): a unix stream socket beside the
// pid file, mode 0600. A client sends one request, a JSON object on one
// line, and reads JSON lines back until one has "done": true. Peers are
// checked (SO_PEERCRED: this master's uid, or root); a request is bounded
// in size and time, and a malformed one gets an error reply and changes
// nothing. Each request reaches the loop as an event with a reply channel.

// CtlRequest is one request on the control socket.
type CtlRequest struct {
	Cmd     string `json:"cmd"`               // status, upgrade, reload, scale, stop, reopen-logs
	Wait    bool   `json:"wait,omitempty"`    // upgrade, reload: reply with progress until the end
	Workers int    `json:"workers,omitempty"` // scale: the exact worker count
	Fast    bool   `json:"fast,omitempty"`    // stop: TERM instead of QUIT
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
	ctlReplyBuffer = 64
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
}

// openControlSocket binds the control socket at path, mode 0600. A stale
// socket file (nothing answers) is replaced; a live one is an error.
func openControlSocket(path string) (*controlSocket, error) {
	ln, err := bindUnix(path, 0o600)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return &controlSocket{ln: ln.(*net.UnixListener), path: path}, nil
}

// serve accepts connections until the listener is closed; each is handled
// in a goroutine of its own that ends when its reply is done or the
// master has stopped.
func (c *controlSocket) serve(send func(event) bool, done <-chan struct{}, allowed func(uid uint32) bool) {
	for {
		conn, err := c.ln.AcceptUnix()
		if err != nil {
			return // closed
		}
		go handleCtlConn(conn, send, done, allowed)
	}
}

func handleCtlConn(conn *net.UnixConn, send func(event) bool, done <-chan struct{}, allowed func(uid uint32) bool) {
	defer conn.Close()
	enc := json.NewEncoder(conn)
	fail := func(msg string) { _ = enc.Encode(CtlReply{Done: true, Error: msg}) }
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
			if err := enc.Encode(r); err != nil || r.Done {
				return
			}
		case <-done:
			// Replies the loop sent before it ended still count.
			for {
				select {
				case r := <-ev.replies:
					if err := enc.Encode(r); err != nil || r.Done {
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
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		cred *unix.Ucred
		cerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
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
