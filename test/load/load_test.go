package load

import (
	"context"
	"fmt"
	"net"
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

func TestLoad_ClassifiesFailures(t *testing.T) {
	// A server that hijacks and closes every connection without an answer.
	eof := test.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		c, _, _ := w.(http.Hijacker).Hijack()
		c.Close()
	})
	bad := test.Serve(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) })
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	refused := l.Addr().String()
	l.Close()
	for _, tc := range []struct {
		addr string
		want Class
	}{{eof, EOF}, {bad, Status}, {refused, Refused}} {
		r := Start(context.Background(), Config{Addr: tc.addr, Clients: 1, Rate: 200, KeepAlive: true, Timeout: 2 * time.Second})
		waitRequests(t, r, 5)
		res := r.Stop()
		if res.Failures[tc.want] != res.Requests || res.OK != 0 {
			t.Errorf("%s: %v, want every request failed as %s; samples %s", tc.addr, res, tc.want, strings.Join(res.Samples, "; "))
		}
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
