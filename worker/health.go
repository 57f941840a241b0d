package worker

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// EnvHealthFD is the fd number of the worker's private health socket: one
// end of a connected stream socket pair whose other end only the master
// holds (molt run --health-check PATH). The master sends one HTTP request
// on it (GET PATH) once the worker said READY=1; ServeHTTP answers it
// with the app's handler. It is not a listener and is not counted in
// LISTEN_FDS: an app that knows nothing of it never sees it as one.
const EnvHealthFD = "MOLT_HEALTH_FD"

var healthOnce sync.Once

// takeHealth returns the health socket as a listener that yields its one
// connection and then blocks until closed; nil when the master passed
// none (no --health-check PATH) or it is not a stream socket. The first
// call takes it; later calls get nil, so that of several ServeHTTP
// calls, the first serves it with its handler.
func takeHealth() net.Listener {
	var ln net.Listener
	healthOnce.Do(func() { ln = openHealth() })
	return ln
}

func openHealth() net.Listener {
	v, ok := os.LookupEnv(EnvHealthFD)
	if !ok {
		return nil
	}
	_ = os.Unsetenv(EnvHealthFD) // children of the app are not workers
	fd, err := strconv.Atoi(v)
	if err != nil || fd < ListenFDsStart {
		return nil
	}
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return nil
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "molt-health")
	c, err := net.FileConn(f) // a duplicate
	_ = f.Close()
	if err != nil {
		return nil
	}
	return newOneConnListener(c)
}

// oneConnListener hands out one connection, then blocks in Accept until
// Close: http.Server.Serve must not end (ServeHTTP takes a Serve that
// ends for a failure) before the drain closes it.
type oneConnListener struct {
	c      chan net.Conn
	closed chan struct{}
	once   sync.Once
	addr   net.Addr
}

func newOneConnListener(c net.Conn) *oneConnListener {
	l := &oneConnListener{c: make(chan net.Conn, 1), closed: make(chan struct{}), addr: c.LocalAddr()}
	l.c <- c
	return l
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.closed:
		return nil, fmt.Errorf("worker: health socket: %w", net.ErrClosed)
	}
}

// Close stops Accept; a connection not yet accepted is closed, one
// accepted belongs to the server.
func (l *oneConnListener) Close() error {
	l.once.Do(func() {
		close(l.closed)
		select {
		case c := <-l.c:
			_ = c.Close()
		default:
		}
	})
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.addr }
