package master

import (
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func TestParseCtlRequest(t *testing.T) {
	for _, ok := range []string{`{"cmd":"status"}`, `{"cmd":"upgrade","wait":true}`, `{"cmd":"scale","workers":3}`, `{"cmd":"stop","fast":true}`, "{\"cmd\":\"reopen-logs\"}\n"} {
		if _, err := ParseCtlRequest([]byte(ok)); err != nil {
			t.Errorf("ParseCtlRequest(%s): %v", ok, err)
		}
	}
	for _, bad := range []string{``, `{}`, `nonsense`, `{"cmd":"rm -rf"}`, `{"cmd":"status","extra":1}`, `{"cmd":"scale","workers":0}`, `{"cmd":"scale","workers":100000}`, `{"cmd":"status"} {"cmd":"stop"}x`, strings.Repeat("x", maxCtlRequest+1)} {
		if _, err := ParseCtlRequest([]byte(bad)); !errors.Is(err, ErrCtlRequest) {
			t.Errorf("ParseCtlRequest(%q) = %v, want ErrCtlRequest", bad, err)
		}
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
