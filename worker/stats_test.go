package worker

import (
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestStats_FormatParseRoundTrip(t *testing.T) {
	var s Stats
	for i := range s.Classes {
		s.Classes[i] = uint64(i * 1000)
	}
	for i := range s.Buckets {
		s.Buckets[i] = uint64(i)
	}
	s.Buckets[3] = MaxStatsCount
	v := s.Format()
	if strings.ContainsAny(v, "\n\x00") {
		t.Fatalf("Format = %q: not line-safe", v)
	}
	got, err := ParseStats(v)
	if err != nil || got != s {
		t.Fatalf("ParseStats(%q) = %v, %v; want %v", v, got, err, s)
	}
	if !strings.HasPrefix(v, "1 0,1000,") {
		t.Errorf("Format = %q", v)
	}
}

func TestStats_ParseRejectsBadInput(t *testing.T) {
	good := Stats{}.Format()
	classes := "0,0,0,0,0,0,0"
	buckets := strings.TrimPrefix(good, "1 "+classes+" ")
	for _, v := range []string{
		"",
		"1",
		"2 " + classes + " " + buckets, // unknown version
		"1 " + classes,
		"1 " + classes + " " + buckets + " extra",
		"1 " + classes + ",0 " + buckets,                // 8 classes
		"1 0,0,0,0,0,0 " + buckets,                      // 6 classes
		"1 " + classes + " " + buckets + ",0",           // 19 buckets
		"1 -1,0,0,0,0,0,0 " + buckets,                   // negative
		"1 +1,0,0,0,0,0,0 " + buckets,                   // sign
		"1 0x1,0,0,0,0,0,0 " + buckets,                  // hex
		"1 1e3,0,0,0,0,0,0 " + buckets,                  // exponent
		"1 1000000000000000,0,0,0,0,0,0 " + buckets,     // 16 digits
		"1 18446744073709551616,0,0,0,0,0,0 " + buckets, // overflow
		"1 0,,0,0,0,0,0 " + buckets,                     // empty
		"1  " + classes + " " + buckets,                 // double space
		"1 " + classes + " " + buckets + strings.Repeat(",", 600),
		" 1 " + classes + " " + buckets,
	} {
		if s, err := ParseStats(v); !errors.Is(err, ErrStats) {
			t.Errorf("ParseStats(%.60q) = %v, %v; want ErrStats", v, s, err)
		}
	}
	if _, err := ParseStats(good); err != nil {
		t.Fatalf("ParseStats(%q): %v", good, err)
	}
}

func TestStats_BucketOf(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want int
	}{{0, 0}, {50 * time.Microsecond, 0}, {51 * time.Microsecond, 1}, {time.Millisecond, 4}, {10 * time.Second, 16}, {time.Hour, 17}} {
		if got := BucketOf(c.d); got != c.want {
			t.Errorf("BucketOf(%v) = %d, want %d", c.d, got, c.want)
		}
	}
}

// TestStats_CountRequests serves each kind of answer through
// countRequests on a real HTTP/1 server and checks the class it lands
// in, and that the writer keeps net/http's optional interfaces.
func TestStats_CountRequests(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/implicit", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/redirect", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ok", http.StatusFound) })
	mux.HandleFunc("/missing", http.NotFound)
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusEarlyHints) // informational: not the answer
		w.WriteHeader(http.StatusInternalServerError)
	})
	mux.HandleFunc("/panic", func(w http.ResponseWriter, r *http.Request) { panic("on purpose") })
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, r *http.Request) {
		if _, ok := w.(io.ReaderFrom); !ok {
			t.Error("the writer lost io.ReaderFrom")
		}
		if err := http.NewResponseController(w).Flush(); err != nil {
			t.Errorf("ResponseController.Flush: %v", err)
		}
		c, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			t.Errorf("Hijack: %v", err)
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		c.Close()
	})
	srv := httptest.NewUnstartedServer(countRequests(mux))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Start()
	defer srv.Close()
	before := TrafficStats()
	for _, path := range []string{"/ok", "/implicit", "/redirect", "/missing", "/fail", "/panic", "/hijack"} {
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		// No keep-alive: the transport retries a GET on a reused
		// connection that closed unanswered (the panic).
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		if resp, err := c.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	srv.Close() // every handler has returned
	after := TrafficStats()
	want := [NumClasses]uint64{Class2xx: 2, Class3xx: 1, Class4xx: 1, Class5xx: 1, ClassPanicked: 1, ClassOther: 1}
	var total, hist uint64
	for i := range want {
		if got := after.Classes[i] - before.Classes[i]; got != want[i] {
			t.Errorf("class %s: %d, want %d", ClassNames[i], got, want[i])
		}
		total += after.Classes[i] - before.Classes[i]
	}
	for i := range after.Buckets {
		hist += after.Buckets[i] - before.Buckets[i]
	}
	if hist != total {
		t.Errorf("histogram holds %d requests, the classes %d", hist, total)
	}
}

// TestStats_CutRequest: a client that goes away while the handler runs
// is counted as cut.
func TestStats_CutRequest(t *testing.T) {
	started, release := make(chan struct{}), make(chan struct{})
	h := countRequests(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
		<-release
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	before := TrafficStats()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	cancelOnceStarted(tr, srv.URL, started)
	close(release)
	srv.Close()
	after := TrafficStats()
	if got := after.Classes[ClassCut] - before.Classes[ClassCut]; got != 1 {
		t.Errorf("cut: %d, want 1 (classes %v -> %v)", got, before.Classes, after.Classes)
	}
}

// TestStats_CountRequestsHTTP2: over HTTP/2 the writer keeps Flusher and
// Pusher, and the answer is counted by its class.
func TestStats_CountRequestsHTTP2(t *testing.T) {
	var proto int
	srv := httptest.NewUnstartedServer(countRequests(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proto = r.ProtoMajor
		if _, ok := w.(http.Pusher); !ok {
			t.Error("the HTTP/2 writer lost http.Pusher")
		}
		if _, ok := w.(http.Flusher); !ok {
			t.Error("the HTTP/2 writer lost http.Flusher")
		}
		http.Error(w, "teapot", http.StatusTeapot)
	})))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	before := TrafficStats()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	srv.Close()
	if proto != 2 {
		t.Fatalf("served over HTTP/%d, want 2", proto)
	}
	if got := TrafficStats().Classes[Class4xx] - before.Classes[Class4xx]; got != 1 {
		t.Errorf("4xx: %d, want 1", got)
	}
}

// BenchmarkCountRequests measures what counting adds to one request
// (compare the two sub-benchmarks; a real request costs tens of µs of
// CPU, test/bench).
func BenchmarkCountRequests(b *testing.B) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	req := httptest.NewRequest("GET", "/", nil)
	w := httptest.NewRecorder()
	for _, c := range []struct {
		name string
		h    http.Handler
	}{{"bare", h}, {"counted", countRequests(h)}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c.h.ServeHTTP(w, req)
			}
		})
	}
}

// FuzzParseStats: no input makes ParseStats panic, and what it accepts
// formats to a value it parses back the same.
func FuzzParseStats(f *testing.F) {
	f.Add(Stats{}.Format())
	f.Add("1 1,2,3,4,5,6,7 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,99")
	f.Add("1 01,2,3,4,5,6,7 x")
	f.Fuzz(func(t *testing.T, v string) {
		s, err := ParseStats(v)
		if err != nil {
			return
		}
		back, err := ParseStats(s.Format())
		if err != nil || back != s {
			t.Fatalf("%q parsed to %v, formatted to %q, parsed back to %v, %v", v, s, s.Format(), back, err)
		}
	})
}

// TestStats_AbortAfterTheClientLeftIsCut: a handler that aborts with
// http.ErrAbortHandler because its client went away (what
// httputil.ReverseProxy does when it can no longer write the answer) is
// counted as cut, not as a server error: otherwise any client, by
// hanging up mid-answer on the connections it holds, would raise the
// error share of the workers it reached, and so the gates' baseline or a
// release's figures. An abort while the client is still there stays a
// server error (panicked).
func TestStats_AbortAfterTheClientLeftIsCut(t *testing.T) {
	started := make(chan struct{})
	h := countRequests(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/abort" {
			panic(http.ErrAbortHandler) // the client is still there
		}
		w.Write([]byte("partial"))
		w.(http.Flusher).Flush()
		close(started)
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
		panic(http.ErrAbortHandler)
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	before := TrafficStats()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	cancelOnceStarted(tr, srv.URL+"/stream", started)
	req, _ := http.NewRequest("GET", srv.URL+"/abort", nil)
	if resp, err := tr.RoundTrip(req); err == nil {
		resp.Body.Close()
	}
	srv.Close()
	after := TrafficStats()
	if got := after.Classes[ClassCut] - before.Classes[ClassCut]; got != 1 {
		t.Errorf("cut: %d, want 1 (classes %v -> %v)", got, before.Classes, after.Classes)
	}
	if got := after.Classes[ClassPanicked] - before.Classes[ClassPanicked]; got != 1 {
		t.Errorf("panicked: %d, want 1, the abort with the client there (classes %v -> %v)", got, before.Classes, after.Classes)
	}
}

// cancelOnceStarted sends GET url through tr, cancels it once started is
// closed (its handler runs), and returns when the round trip has ended.
func cancelOnceStarted(tr *http.Transport, url string, started <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	go func() {
		select {
		case <-started:
		case <-ctx.Done():
		}
		cancel()
	}()
	if resp, err := tr.RoundTrip(req); err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
