// Package ctlclient is the client side of a master's control socket,
// shared by molt ctl and the keeper: connect, identify the server by the
// credentials the kernel supplies, send one request line and read JSON
// reply lines until the final one. It knows the wire framing, not the
// requests: their types are the master's (master.CtlRequest). A leaf:
// the standard library and golang.org/x/sys.
package ctlclient

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// NoServerError is a dial that nothing answered.
type NoServerError struct {
	Path string
	Err  error
}

func (e *NoServerError) Error() string {
	return fmt.Sprintf("no master answers on %s: %v", e.Path, e.Err)
}
func (e *NoServerError) Unwrap() error { return e.Err }

// SendError is a request that could not be written, with no final reply
// read either.
type SendError struct{ Err error }

func (e *SendError) Error() string { return "send: " + e.Err.Error() }
func (e *SendError) Unwrap() error { return e.Err }

// ErrNoFinal is a connection the server closed before its final reply.
var ErrNoFinal = errors.New("the master closed the connection without a final answer")

// Dial connects to the control socket at path within timeout and checks
// its server (CheckServer). It returns the server's credentials.
func Dial(path string, timeout time.Duration) (*net.UnixConn, *unix.Ucred, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, nil, &NoServerError{Path: path, Err: err}
	}
	conn := c.(*net.UnixConn)
	cred, err := CheckServer(conn, path)
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	return conn, cred, nil
}

// CheckServer refuses a control socket served by a process that is
// neither root nor this user: anyone able to put a socket at path (a
// directory others can write, a wrong --socket) could otherwise answer
// for the master, and say an upgrade committed when it did not. The
// kernel supplies the server's credentials (SO_PEERCRED: those of the
// process that called listen).
func CheckServer(conn *net.UnixConn, path string) (*unix.Ucred, error) {
	cred, err := PeerCred(conn)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: cannot identify its server: %w", path, err)
	}
	if me := os.Geteuid(); cred.Uid != 0 && int(cred.Uid) != me {
		return nil, fmt.Errorf("refuse the control socket %s: its server (pid %d) runs as uid %d, neither root nor you (uid %d): it is not a molt master to trust",
			path, cred.Pid, cred.Uid, me)
	}
	return cred, nil
}

// PeerCred returns the credentials the kernel recorded for the process at
// the other end of a unix stream connection (SO_PEERCRED: as of its
// connect or listen). Both ends of the control socket check it.
func PeerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	var (
		cred *unix.Ucred
		cerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// Exchange sends req as one JSON line on conn and hands each reply line
// to reply, which says whether it was the final one (or fails, and so
// ends the exchange with its error). All of it within timeout: past it,
// the error wraps os.ErrDeadlineExceeded. A connection closed before the
// final reply is ErrNoFinal, or a *SendError if the request could not be
// written either.
func Exchange(conn *net.UnixConn, req any, timeout time.Duration, reply func(line []byte) (final bool, err error)) error {
	_ = conn.SetDeadline(time.Now().Add(timeout))
	// A master that refuses the peer says why and closes at once, maybe
	// before the request is written: read its reply even then.
	sendErr := json.NewEncoder(conn).Encode(req)
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 1<<16), 1<<22)
	for sc.Scan() {
		final, err := reply(sc.Bytes())
		if err != nil {
			return err
		}
		if final {
			awaitClose(conn, sc)
			return nil
		}
	}
	if sendErr != nil {
		return &SendError{Err: sendErr}
	}
	if err := sc.Err(); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("no final answer within %v: %w", timeout, err)
	}
	return ErrNoFinal
}

// awaitClose waits, for at most a second, for the master to close the
// connection after its final reply: the master closes right after it, and
// a caller that runs ctl commands one after another (a script, a test
// counting the master's fds) then never sees the previous call's
// connection still open.
func awaitClose(conn net.Conn, sc *bufio.Scanner) {
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	for sc.Scan() {
	}
}
