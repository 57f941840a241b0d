package worker

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"golang.org/x/sys/unix"
)

// pendingNotify returns the datagrams waiting on fd, without blocking.
func pendingNotify(t *testing.T, fd int) []string {
	t.Helper()
	var out []string
	buf := make([]byte, MaxNotifySize)
	for range 100 {
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			break
		}
		out = append(out, string(buf[:n]))
	}
	return out
}

func TestRecycleAfter_AsksOnceAtTheNthRequest(t *testing.T) {
	fd, addr := listenNotify(t, true)
	t.Setenv(EnvNotifySocket, addr)
	served := 0
	inner := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { served++ })
	h := RecycleAfter(3, inner)
	for i := 1; i <= 5; i++ {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
		got := pendingNotify(t, fd)
		switch {
		case i == 3 && (len(got) != 1 || got[0] != NotifyRecycle):
			t.Fatalf("request %d: sent %q, want %q once", i, got, NotifyRecycle)
		case i != 3 && len(got) != 0:
			t.Fatalf("request %d: sent %q, want nothing", i, got)
		}
	}
	if served != 5 {
		t.Errorf("served %d of 5 requests", served)
	}
	h0 := RecycleAfter(0, inner)
	h0.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
	if got := pendingNotify(t, fd); len(got) != 0 || served != 6 {
		t.Errorf("RecycleAfter(0): sent %q, served %d", got, served)
	}
}
