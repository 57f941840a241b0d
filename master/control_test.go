package master

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/keeper"
	"golang.org/x/sys/unix"
)

func TestParseCtlRequest(t *testing.T) {
	for _, ok := range []string{`{"cmd":"status"}`, `{"cmd":"upgrade","wait":true}`, `{"cmd":"scale","workers":3}`, `{"cmd":"stop","fast":true}`, `{"cmd":"stop","all":true}`, "{\"cmd\":\"reopen-logs\"}\n"} {
		if _, err := ParseCtlRequest([]byte(ok)); err != nil {
			t.Errorf("ParseCtlRequest(%s): %v", ok, err)
		}
	}
	for _, bad := range []string{``, `{}`, `nonsense`, `{"cmd":"rm -rf"}`, `{"cmd":"status","extra":1}`, `{"cmd":"scale","workers":0}`, `{"cmd":"stop","all":true,"fast":true}`, `{"cmd":"status","all":true}`, `{"cmd":"scale","workers":100000}`, `{"cmd":"status"} {"cmd":"stop"}x`, strings.Repeat("x", maxCtlRequest+1)} {
		if _, err := ParseCtlRequest([]byte(bad)); !errors.Is(err, ErrCtlRequest) {
			t.Errorf("ParseCtlRequest(%q) = %v, want ErrCtlRequest", bad, err)
		}
	}
	// The keeper's QUIT, as it sends it.
	if req, err := ParseCtlRequest([]byte(keeper.StopAllRequest + "\n")); err != nil || req != (CtlRequest{Cmd: "stop", All: true}) {
		t.Errorf("the keeper's stop request %s = %+v, %v", keeper.StopAllRequest, req, err)
	}
}

func FuzzParseCtlRequest(f *testing.F) {
	for _, s := range []string{`{"cmd":"status"}`, `{"cmd":"scale","workers":2}`, `{`, `{"cmd":"upgrade","wait":true}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := ParseCtlRequest(b)
		if err != nil {
			if !errors.Is(err, ErrCtlRequest) {
				t.Fatalf("error %v does not wrap ErrCtlRequest", err)
			}
			return
		}
		if req.Cmd == "scale" && (req.Workers < 1 || req.Workers > maxWorkers) {
			t.Fatalf("accepted %+v", req)
		}
	})
}

func TestCtlAllowed_SameUserOrRoot(t *testing.T) {
	allowed := ctlAllowed(1000)
	for uid, want := range map[uint32]bool{1000: true, 0: true, 1001: false, 65534: false} {
		if allowed(uid) != want {
			t.Errorf("uid %d allowed = %v, want %v", uid, !want, want)
		}
	}
}

// TestControlSocket_BadPeersChangeNothing serves the socket with a fake
// loop: a refused peer, a malformed and an oversized request each get an
// error reply and never reach the loop.
func TestControlSocket_BadPeersChangeNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	c, err := openControlSocket(path, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	events := make(chan event, 8)
	done := make(chan struct{})
	defer close(done)
	var refuseAll atomic.Bool
	go c.serve(func(ev event) bool { events <- ev; return true }, done, func(uint32) bool { return !refuseAll.Load() })
	call := func(payload string) CtlReply {
		t.Helper()
		conn, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write([]byte(payload))
		var r CtlReply
		if err := json.NewDecoder(conn).Decode(&r); err != nil {
			t.Fatalf("no reply to %.40q: %v", payload, err)
		}
		return r
	}
	for _, bad := range []string{"garbage\n", `{"cmd":"explode"}` + "\n", strings.Repeat("a", maxCtlRequest+10) + "\n"} {
		if r := call(bad); r.Error == "" || !r.Done {
			t.Errorf("request %.40q: reply %+v, want an error", bad, r)
		}
	}
	refuseAll.Store(true)
	if r := call(`{"cmd":"status"}` + "\n"); !strings.Contains(r.Error, "permission denied") {
		t.Errorf("refused peer: reply %+v", r)
	}
	select {
	case ev := <-events:
		t.Fatalf("a bad request reached the loop: %v", ev)
	default:
	}
}

// TestBindControl_WhatIsAlreadyThere: nothing, or a stale socket of root
// or this user, is bound over; a live socket, a symlink, a regular file
// and a socket of another user are errors that name the path and leave
// it as it was. The socket is 0600 even under umask 0.
func TestBindControl_WhatIsAlreadyThere(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "molt.sock")
	old := unix.Umask(0)
	ln, _, err := bindControl(path)
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v: want 0600", fi.Mode(), err)
	}
	if _, _, err := bindControl(path); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("bind over a live socket: %v, want EADDRINUSE", err)
	}
	ln.Close() // stale now (SetUnlinkOnClose(false))
	ln, _, err = bindControl(path)
	if err != nil {
		t.Fatalf("bind over our stale socket: %v", err)
	}
	ln.Close()
	os.Remove(path)

	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("keep"), 0o644)
	os.Symlink(target, path)
	if _, _, err := bindControl(path); err == nil || !strings.Contains(err.Error(), "refuse "+path+": it is a symlink") {
		t.Fatalf("bind over a symlink: %v", err)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("target changed: %q", b)
	}
	os.Remove(path)
	os.WriteFile(path, []byte("file"), 0o644)
	if _, _, err := bindControl(path); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("bind over a regular file: %v", err)
	}
	os.Remove(path)
	if os.Geteuid() == 0 {
		ln, _, err := bindControl(path)
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
		os.Lchown(path, 65534, 65534)
		if _, _, err := bindControl(path); err == nil || !strings.Contains(err.Error(), "socket of uid 65534") {
			t.Fatalf("bind over nobody's stale socket: %v", err)
		}
		if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Fatalf("nobody's socket removed: %v", err)
		}
	}
}

func TestControlSocket_AcceptBackoffAndLogLimit(t *testing.T) {
	var d time.Duration
	var got []time.Duration
	for range 12 {
		got = append(got, nextDelay(&d))
	}
	if got[0] != 5*time.Millisecond || got[1] != 10*time.Millisecond || got[len(got)-1] != ctlAcceptBackoff {
		t.Fatalf("delays %v: want 5ms doubling to %v", got, ctlAcceptBackoff)
	}
	var l logLimit
	if n, ok := l.allow(); !ok || n != 0 {
		t.Fatal("the first line is held back")
	}
	for range 3 {
		if _, ok := l.allow(); ok {
			t.Fatal("a repeat within ctlLogEvery is let through")
		}
	}
	l.last = time.Now().Add(-ctlLogEvery)
	if n, ok := l.allow(); !ok || n != 3 {
		t.Fatalf("after ctlLogEvery: %d, %v; want 3 held back, let through", n, ok)
	}
}
