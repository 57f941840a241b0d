package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Serve serves h on an ephemeral port of 127.0.0.1 until the test ends
// and returns the address.
func Serve(t testing.TB, h http.HandlerFunc) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// Response is what Get read.
type Response struct {
	Status int
	Header http.Header
	Body   string
}

// WorkerPid is the X-Molt-Worker-Pid of the response (0 if absent).
func (r Response) WorkerPid() int {
	n, _ := strconv.Atoi(r.Header.Get("X-Molt-Worker-Pid"))
	return n
}

// Get sends one GET over a new connection to addr (host:port, or
// unix:/path) with Connection: close, written by hand and parsed with
// http.ReadResponse: net/http's client retries failed requests silently
// and would hide a dropped one.
func Get(addr, path string, timeout time.Duration) (Response, error) {
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	}
	c, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return Response{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: molt-test\r\nConnection: close\r\n\r\n", path); err != nil {
		return Response{}, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return Response{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return Response{}, err
	}
	return Response{Status: resp.StatusCode, Header: resp.Header, Body: string(body)}, nil
}
