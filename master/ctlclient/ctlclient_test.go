package ctlclient

import (
	"bufio"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// serve answers each connection on a fresh socket with replies (one line
// each) after reading the request line; hang holds it open unanswered.
func serve(t *testing.T, replies []string, hang bool) (path string, got chan string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "cc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path = filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan string, 1)
	go func() {
		conn, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		line, _ := bufio.NewReader(conn).ReadString('\n')
		got <- line
		if hang {
			_, _ = conn.Read(make([]byte, 1))
			return
		}
		for _, r := range replies {
			_, _ = conn.Write([]byte(r + "\n"))
		}
	}()
	return path, got
}

func TestExchange(t *testing.T) {
	for _, c := range []struct {
		name    string
		replies []string
		hang    bool
		lines   int // reply lines handed over
		wantErr func(error) bool
	}{
		{"progress then final", []string{`{"message":"a"}`, `{"done":true}`, `{"after":"final"}`}, false, 2, func(err error) bool { return err == nil }},
		{"closed before the final reply", []string{`{"message":"a"}`}, false, 1, func(err error) bool { return errors.Is(err, ErrNoFinal) }},
		{"no answer in time", nil, true, 0, func(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }},
		{"the caller rejects a line", []string{`bad`}, false, 1, func(err error) bool { return err != nil && err.Error() == "bad line" }},
	} {
		t.Run(c.name, func(t *testing.T) {
			path, got := serve(t, c.replies, c.hang)
			conn, cred, err := Dial(path, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if int(cred.Pid) != os.Getpid() {
				t.Errorf("server pid %d, want this process %d", cred.Pid, os.Getpid())
			}
			n := 0
			err = Exchange(conn, map[string]any{"cmd": "status"}, 300*time.Millisecond, func(line []byte) (bool, error) {
				n++
				if string(line) == "bad" {
					return false, errors.New("bad line")
				}
				return string(line) == `{"done":true}`, nil
			})
			if !c.wantErr(err) || n != c.lines {
				t.Errorf("err %v after %d lines; want %d lines", err, n, c.lines)
			}
			if line := <-got; line != `{"cmd":"status"}`+"\n" {
				t.Errorf("request %q", line)
			}
		})
	}
}

func TestDial_NoServer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none")
	var ns *NoServerError
	if _, _, err := Dial(path, time.Second); !errors.As(err, &ns) || ns.Path != path {
		t.Errorf("Dial(%s) = %v, want a NoServerError", path, err)
	}
}
