package drill

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// swapTrigger stands for an upgrade: each Fire makes the server answer as
// the next generation.
type swapTrigger struct{ gen *atomic.Int64 }

func (s swapTrigger) Fire(context.Context) error { s.gen.Add(1); return nil }
func (s swapTrigger) String() string             { return "swap" }

// serve returns the URL of h served on 127.0.0.1 until the test ends.
func serve(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	return "http://" + test.Serve(t, h) + "/"
}

func TestRun_SeesEachUpgradeAndEveryAnswer(t *testing.T) {
	var gen atomic.Int64
	gen.Store(1)
	target := serve(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Molt-Master-Pid", strconv.FormatInt(gen.Load(), 10))
		w.Header().Set("X-Molt-Worker-Pid", "7")
	})
	rep, err := Run(context.Background(), Config{
		Target: target, Clients: 2, Rate: 400, Duration: 1500 * time.Millisecond, Upgrades: 2, Interval: 400 * time.Millisecond,
		Trigger: swapTrigger{&gen}, Header: "X-Molt-Master-Pid", WorkerHeader: "X-Molt-Worker-Pid", IdleConns: 3,
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed != 0 || rep.OK != rep.Requests || rep.OK < 100 {
		t.Fatalf("requests %d, ok %d, failed %d %v", rep.Requests, rep.OK, rep.Failed, rep.Failures)
	}
	if len(rep.Upgrades) != 2 {
		t.Fatalf("upgrades %+v", rep.Upgrades)
	}
	for _, u := range rep.Upgrades {
		// The swap is instant: the new generation answers within a few
		// requests, and nothing answers as the old one after it.
		if u.NewServingMs < 0 || u.NewServingMs > 300 || u.OldGoneMs > 300 || u.Error != "" {
			t.Errorf("upgrade %+v", u)
		}
	}
	if rep.ByServed["1"] == 0 || rep.ByServed["2"] == 0 || rep.ByServed["3"] == 0 || rep.ByWorker["7"] != rep.OK {
		t.Errorf("by generation %v, by worker %v", rep.ByServed, rep.ByWorker)
	}
	var gens []string
	for _, s := range rep.Timeline {
		gens = append(gens, strings.Join(s.Served, "+"))
	}
	if g := strings.Join(gens, " "); !strings.HasPrefix(g, "1") || !strings.HasSuffix(g, "3") {
		t.Errorf("timeline %s", g)
	}
	if rep.ByMode["keep-alive"].OK == 0 || rep.ByMode["close"].OK == 0 {
		t.Errorf("by mode %+v", rep.ByMode)
	}
	if rep.IdleConns != 3 || rep.Latency.N != rep.OK || rep.Steady.N+rep.InUpgrade.N != rep.OK || rep.Latency.P50 > rep.Latency.Max {
		t.Errorf("idle %d, latency %+v steady %+v in %+v", rep.IdleConns, rep.Latency, rep.Steady, rep.InUpgrade)
	}
	var out strings.Builder
	rep.Print(&out)
	for _, want := range []string{"failed 0", "upgrade 1 at", "new generation answered after", "generations 0-", "idle connections: 3 opened"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}

// TestRun_ClassifiesFailures runs the cases test/load's client is tested
// against too (test.FailureCases): both count a failure alike, though
// they share no code (the drill is never its own judge).
func TestRun_ClassifiesFailures(t *testing.T) {
	t.Parallel()
	for _, c := range test.FailureCases(t) {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			target := "http://" + c.Addr + "/"
			if c.Network == "unix" {
				target = "unix:" + c.Addr
			}
			rep, err := Run(context.Background(), Config{Target: target, Clients: 1, Rate: 100, Duration: 700 * time.Millisecond,
				Timeout: 300 * time.Millisecond, Modes: []Mode{KeepAlive, Close}})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Failed == 0 || rep.OK != 0 || rep.Failures[Class(c.Class)] != rep.Failed {
				t.Errorf("failures %v of %d, want all %s", rep.Failures, rep.Requests, c.Class)
			}
		})
	}
}

func TestParseTarget(t *testing.T) {
	for in, want := range map[string]string{
		"http://127.0.0.1:8080/x?y=1": "tcp 127.0.0.1:8080 127.0.0.1:8080 /x?y=1",
		"http://localhost/":           "tcp localhost:80 localhost /",
		"unix:/run/app.sock":          "unix /run/app.sock localhost /",
	} {
		n, a, h, p, err := parseTarget(in, "")
		if got := strings.Join([]string{n, a, h, p}, " "); err != nil || got != want {
			t.Errorf("%s: %q %v, want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"https://x/", "127.0.0.1:80", "http://"} {
		if _, _, _, _, err := parseTarget(bad, ""); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// TestRun_CountsConnectionsByWorker serves each connection as one of two
// "workers" by the order it was accepted in: a connection counts once, for
// the worker that answered its first request, however many requests it
// carried afterwards.
func TestRun_CountsConnectionsByWorker(t *testing.T) {
	t.Parallel()
	type connKey struct{}
	var accepted atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Molt-Worker-Pid", r.Context().Value(connKey{}).(string))
	}))
	srv.Config.ConnContext = func(ctx context.Context, _ net.Conn) context.Context {
		return context.WithValue(ctx, connKey{}, "w"+strconv.FormatInt(accepted.Add(1)%2, 10))
	}
	srv.Start()
	t.Cleanup(srv.Close)
	for _, c := range []struct {
		mode    Mode
		clients int
	}{{KeepAlive, 4}, {Close, 2}} {
		t.Run(string(c.mode), func(t *testing.T) {
			before := accepted.Load()
			rep, err := Run(context.Background(), Config{Target: srv.URL + "/", Clients: c.clients, Rate: 200,
				Duration: 500 * time.Millisecond, Modes: []Mode{c.mode}, WorkerHeader: "X-Molt-Worker-Pid"})
			if err != nil {
				t.Fatal(err)
			}
			conns := int(accepted.Load() - before)
			if rep.Failed != 0 || rep.OK < 40 || rep.ByWorker["w0"]+rep.ByWorker["w1"] != rep.OK {
				t.Fatalf("ok %d, failed %d %v, by worker %v", rep.OK, rep.Failed, rep.Failures, rep.ByWorker)
			}
			got := rep.ConnsByWorker["w0"] + rep.ConnsByWorker["w1"]
			switch c.mode {
			case KeepAlive:
				// One connection per client, alternately accepted as w1, w0.
				if conns != c.clients || got != conns || rep.ConnsByWorker["w0"] != c.clients/2 {
					t.Errorf("%d connections accepted, conns by worker %v", conns, rep.ConnsByWorker)
				}
			case Close:
				// A connection per request: connections are requests.
				if got != rep.OK || rep.ConnsByWorker["w0"] != rep.ByWorker["w0"] || rep.ConnsByWorker["w1"] != rep.ByWorker["w1"] {
					t.Errorf("conns by worker %v, requests by worker %v", rep.ConnsByWorker, rep.ByWorker)
				}
			}
		})
	}
}

// TestRun_SplitsEachUpgradeByGeneration: the answers and 5xx of each
// upgrade's window, by the generation that gave them (generation 2
// answers 500 to every other request: a bad release beside a good one).
func TestRun_SplitsEachUpgradeByGeneration(t *testing.T) {
	var gen, n atomic.Int64
	gen.Store(1)
	target := serve(t, func(w http.ResponseWriter, r *http.Request) {
		g := gen.Load()
		w.Header().Set("X-Molt-Master-Pid", strconv.FormatInt(g, 10))
		if g == 2 && n.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	rep, err := Run(context.Background(), Config{
		Target: target, Clients: 2, Rate: 400, Duration: 1200 * time.Millisecond, Upgrades: 1, Interval: 400 * time.Millisecond,
		Trigger: swapTrigger{&gen}, Header: "X-Molt-Master-Pid",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Upgrades) != 1 {
		t.Fatalf("upgrades %+v", rep.Upgrades)
	}
	sp := rep.Upgrades[0].ByGeneration
	if sp["2"].Answers == 0 || sp["2"].Errors == 0 || sp["2"].Errors > sp["2"].Answers/2+1 || sp["1"].Errors != 0 {
		t.Fatalf("split %+v", sp)
	}
	if rep.Failures[Status] != sp["2"].Errors {
		t.Errorf("%d status failures, %d 5xx in the split", rep.Failures[Status], sp["2"].Errors)
	}
	var out strings.Builder
	rep.Print(&out)
	if !strings.Contains(out.String(), "by generation: ") || !strings.Contains(out.String(), "5xx") {
		t.Errorf("report lacks the split:\n%s", out.String())
	}
}

// TestPrint_EscapesWhatTheServerChose: the generation and worker headers
// are the server's (a compromised worker's) text; a format character that
// reorders the line (U+202E) or a C1 control sequence introducer (U+009B,
// or the raw byte 0x9b), which Go's HTTP parser lets through, reaches the
// operator's terminal escaped.
func TestPrint_EscapesWhatTheServerChose(t *testing.T) {
	evil := []string{"1\u202e0", "2\u009b31m", "3\x9b2J"}
	rep := &Report{ByWorker: map[string]int{}, ConnsByWorker: map[string]int{}}
	u := Upgrade{N: 1, NewServingMs: -1, OldGoneMs: -1, ByGeneration: map[string]Split{}}
	for _, e := range evil {
		rep.ByWorker[e] = 1
		u.ByGeneration[e] = Split{Answers: 1}
	}
	rep.Upgrades = []Upgrade{u}
	rep.Timeline = []Span{{FromS: 0, ToS: 1, Served: evil}}
	var out strings.Builder
	rep.Print(&out)
	for _, bad := range []string{"\u202e", "\u009b", "\x9b"} {
		if strings.Contains(out.String(), bad) {
			t.Errorf("the report shows %q raw:\n%q", bad, out.String())
		}
	}
	for _, want := range []string{`1\u202e0`, `2\u009b31m`, `3\x9b2J`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the report lacks %s:\n%s", want, out.String())
		}
	}
}
