package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// FailureCase is a server that fails every request in one way, and the
// class a load client must count that failure as. The integration tests'
// load client (test/load) and molt drill's (cmd/molt/internal/drill) are
// two independent implementations on purpose (the drill is never its own
// judge); both are tested against these cases, so that their classes of
// failure stay the same.
type FailureCase struct {
	Name string
	// Class is the failure's class: refused, reset, eof, timeout or
	// status (the names both clients use).
	Class string
	// Network and Addr are where to dial: "tcp" and host:port, or "unix"
	// and a socket path.
	Network, Addr string
}

// FailureCaseTimeout is the longest request timeout a client may use
// against the cases: the "timeout" case's server answers no request
// within it (it never answers).
const FailureCaseTimeout = 2 * time.Second

// FailureCases starts the servers of the cases, which serve until the
// test ends.
func FailureCases(t testing.TB) []FailureCase {
	t.Helper()
	dir := ShortTempDir(t)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := closed.Addr().String()
	closed.Close()
	return []FailureCase{
		{"nothing listens on the port", "refused", "tcp", refused},
		{"no socket at the path", "refused", "unix", filepath.Join(dir, "none.sock")},
		{"answers 503", "status", "tcp", Serve(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) })},
		{"closes without an answer", "eof", "tcp", Serve(t, func(w http.ResponseWriter, r *http.Request) {
			c, _, _ := w.(http.Hijacker).Hijack()
			c.Close()
		})},
		{"closes in the middle of the body", "eof", "tcp", Serve(t, func(w http.ResponseWriter, r *http.Request) {
			c, _, _ := w.(http.Hijacker).Hijack()
			fmt.Fprint(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes.")
			c.Close()
		})},
		{"resets the connection after the request", "reset", "tcp", rawServe(t, func(c *net.TCPConn) {
			c.SetLinger(0) // close sends RST
		})},
		{"never answers", "timeout", "tcp", rawServe(t, func(c *net.TCPConn) {
			// Silent until the client gives up and closes (bounded).
			c.SetReadDeadline(time.Now().Add(FailureCaseTimeout + time.Second))
			io.Copy(io.Discard, c)
		})},
	}
}

// rawServe accepts connections on an ephemeral port of 127.0.0.1 until
// the test ends; for each it reads one request's head, calls f, and
// closes the connection.
func rawServe(t testing.TB, f func(c *net.TCPConn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(FailureCaseTimeout))
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if strings.TrimRight(line, "\r\n") == "" {
						break
					}
				}
				f(c.(*net.TCPConn))
			}()
		}
	}()
	return l.Addr().String()
}
