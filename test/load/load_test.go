package load

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// waitRequests waits (bounded) until r has made at least n requests.
func waitRequests(t *testing.T, r *Run, n int) {
	t.Helper()
	for i := 0; r.Snapshot().Requests < n; i++ {
		if i > 1000 {
			t.Fatalf("only %d requests in 10s", r.Snapshot().Requests)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLoad_CountsAnswersByMasterAndWorker(t *testing.T) {
	addr := test.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Molt-Master-Pid", "7")
		w.Header().Set("X-Molt-Worker-Pid", "8")
	})
	for _, ka := range []bool{true, false} {
		r := Start(context.Background(), Config{Addr: addr, Clients: 4, Rate: 400, KeepAlive: ka})
		waitRequests(t, r, 40)
		res := r.Stop()
		if res.Failed() != 0 || res.OK != res.Requests || res.ByMaster[7] != res.OK || res.ByWorker[8] != res.OK {
			t.Errorf("keepalive=%v: %v %v", ka, res, res.Samples)
		}
	}
}

// TestLoad_ClassifiesFailures runs the cases the drill's client is
// tested against too (test.FailureCases): both count a failure alike.
func TestLoad_ClassifiesFailures(t *testing.T) {
	t.Parallel()
	for _, c := range test.FailureCases(t) {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			for _, ka := range []bool{true, false} {
				r := Start(context.Background(), Config{Network: c.Network, Addr: c.Addr, Clients: 1, Rate: 200, KeepAlive: ka, Timeout: 300 * time.Millisecond})
				waitRequests(t, r, 3)
				res := r.Stop()
				if res.Requests == 0 || res.Failures[Class(c.Class)] != res.Requests || res.OK != 0 {
					t.Errorf("keepalive=%v: %v, want every request failed as %s; samples %s", ka, res, c.Class, strings.Join(res.Samples, "; "))
				}
			}
		})
	}
}

func TestLoad_ConnectionCloseIsNoFailure(t *testing.T) {
	addr := test.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		fmt.Fprint(w, "bye")
	})
	r := Start(context.Background(), Config{Addr: addr, Clients: 2, Rate: 200, KeepAlive: true})
	waitRequests(t, r, 20)
	if res := r.Stop(); res.Failed() != 0 {
		t.Errorf("%v %v", res, res.Samples)
	}
}

func TestLoad_AttributesFailuresToTheLastWorkerOfTheirConnection(t *testing.T) {
	var mu sync.Mutex
	n := 0
	addr := test.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		fail := n%5 == 0
		mu.Unlock()
		if fail {
			c, _, _ := w.(http.Hijacker).Hijack()
			c.Close()
			return
		}
		w.Header().Set("X-Molt-Worker-Pid", "8")
	})
	for _, ka := range []bool{true, false} {
		r := Start(context.Background(), Config{Addr: addr, Clients: 1, Rate: 400, KeepAlive: ka})
		waitRequests(t, r, 30)
		res := r.Stop()
		if len(res.Fails) == 0 || len(res.Fails) != res.Failed() {
			t.Fatalf("keepalive=%v: %d failures recorded of %d", ka, len(res.Fails), res.Failed())
		}
		for _, f := range res.Fails {
			want := 0
			if ka {
				want = 8 // four answers by 8 came before each failure on that connection
			}
			if f.LastWorker != want || f.End.Before(f.Start) || f.Class != EOF {
				t.Errorf("keepalive=%v: failure %+v, want last worker %d", ka, f, want)
			}
		}
	}
}
