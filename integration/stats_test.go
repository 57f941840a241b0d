package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// settledRequests waits until generation gen's request count in the
// status of the master at pidFile has not moved for longer than the
// reporting interval (nothing is being served), and returns it.
func settledRequests(t *testing.T, pidFile string, gen int, source string) trafficStatus {
	t.Helper()
	var last trafficStatus
	changed := time.Now()
	test.WaitFor(t, stepTimeout, fmt.Sprintf("generation %d's figures to settle", gen), func() error {
		st, err := tryStatus(t, pidFile)
		if err != nil {
			return err
		}
		tr, ok := st.traffic(gen, source)
		if !ok {
			return fmt.Errorf("no figures for generation %d from %s: %+v", gen, source, st.Traffic)
		}
		if tr.Requests != last.Requests {
			last, changed = tr, time.Now()
		}
		// An observation, not a synchronisation: the workers report
		// every second, so 1.5 s without a change means no request is
		// left unreported.
		if time.Since(changed) < 1500*time.Millisecond {
			return fmt.Errorf("%d requests, changed %v ago", tr.Requests, time.Since(changed).Round(time.Millisecond))
		}
		return nil
	})
	return last
}

// TestStats_StatusMatchesLoad: under the standard load, the figures of
// "ctl status --json" count exactly the requests the load generator
// had answered, once the last report is in (the one-second lag).
func TestStats_StatusMatchesLoad(t *testing.T) {
	t.Parallel()
	m, addr, _ := startSteady(t, 2)
	base := settledRequests(t, m.pidFile, 1, "workers")
	l := startLoad(t, addr)
	// While the load runs, the rate is there.
	test.WaitFor(t, stepTimeout, "a request rate in the status", func() error {
		st := statusOf(t, m.pidFile)
		if tr, _ := st.traffic(1, "workers"); tr.RPS <= 0 || tr.P99MS <= 0 {
			return fmt.Errorf("figures %+v", tr)
		}
		return nil
	})
	l.more(t, 100)
	ka, pc := l.ka.Stop(), l.pc.Stop()
	l.cancel()
	if ka.Failed()+pc.Failed() != 0 {
		t.Fatalf("failed requests: %v %v", ka, pc)
	}
	answered := uint64(ka.OK + pc.OK)
	got := settledRequests(t, m.pidFile, 1, "workers")
	if d := got.Requests - base.Requests; d != answered {
		t.Errorf("status counts %d requests under load, the load generator %d answered (before: %+v, after: %+v)", d, answered, base, got)
	}
	if d := got.Classes["2xx"] - base.Classes["2xx"]; d != answered {
		t.Errorf("status counts %d 2xx, want %d", d, answered)
	}
	for _, c := range []string{"3xx", "4xx", "5xx", "panicked", "cut", "other"} {
		if got.Classes[c] != 0 {
			t.Errorf("class %s: %d, want 0", c, got.Classes[c])
		}
	}
	if got.ReportsDropped != 0 {
		t.Errorf("%d reports dropped from honest workers", got.ReportsDropped)
	}
	if code, out := ctl(t, m.pidFile, "status"); code != 0 || !strings.Contains(out, "traffic  gen 1 (workers): ") || !strings.Contains(out, "req/s, 5xx ") {
		t.Errorf("ctl status: exit %d, no traffic line:\n%s", code, out)
	}
	m.stop()
}

// TestStats_PythonWorker: a worker in Python that sends MOLT_STATS= by
// hand is aggregated like a Go one, by class.
func TestStats_PythonWorker(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--", "python3", app}})
	addr := m.addr()
	m.waitServing()
	base := settledRequests(t, m.pidFile, 1, "workers")
	const ok, failed = 12, 5
	for range ok {
		get(t, addr, "/")
	}
	for range failed {
		r, err := test.Get(addr, "/status/503", reqTimeout)
		if err != nil || r.Status != 503 {
			t.Fatalf("GET /status/503: %v %+v", err, r)
		}
	}
	test.WaitFor(t, stepTimeout, "the Python workers' figures", func() error {
		st := statusOf(t, m.pidFile)
		tr, _ := st.traffic(1, "workers")
		if d2, d5 := tr.Classes["2xx"]-base.Classes["2xx"], tr.Classes["5xx"]-base.Classes["5xx"]; d2 != ok || d5 != failed {
			return fmt.Errorf("2xx %d (want %d), 5xx %d (want %d): %+v", d2, ok, d5, failed, tr)
		}
		if tr.P50MS <= 0 {
			return fmt.Errorf("no latency: %+v", tr)
		}
		return nil
	})
	m.stop()
}

// TestStats_OldGenerationReachesNewMaster: during an upgrade under the
// standard load, the new master receives the old generation's figures
// over the channel and shows both generations.
func TestStats_OldGenerationReachesNewMaster(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--commit", "manual", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("upgrade --wait: exit %d:\n%s", code, out)
	}
	nw := u.waitNewServing(u.Pid)
	test.WaitLog(t, u.log, stepTimeout, 1, "the new master receiving the old generation's figures",
		test.Event("stats.old_generation", "old_gen", "1"))
	var first uint64
	test.WaitFor(t, stepTimeout, "both generations' figures in the new master's status", func() error {
		st := statusOf(t, u.pidFile)
		if st.PID != nw {
			return fmt.Errorf("status of %d, not the new master %d", st.PID, nw)
		}
		old, ok := st.traffic(1, "old master")
		own, ok2 := st.traffic(2, "workers")
		if !ok || !ok2 {
			return fmt.Errorf("traffic %+v", st.Traffic)
		}
		if first == 0 {
			first = old.Requests
		}
		// The old generation serves on beside the new one: its count
		// moves, as the old master sends it every second.
		if old.Requests == 0 || old.Requests == first || own.Requests == 0 {
			return fmt.Errorf("old generation %d requests (first seen %d), new %d", old.Requests, first, own.Requests)
		}
		return nil
	})
	// The commit ("stop" to the old master is its QUIT).
	if code, out := ctl(t, u.pidFile, "--old", "stop"); code != 0 {
		t.Fatalf("ctl --old stop: exit %d: %s", code, out)
	}
	u.waitTakeover(u.Pid)
	l.stop(t)
	u.stop()
}

// TestStats_ReportFloodIsDropped: under the standard load, a worker
// sends 4,000 MOLT_STATS= datagrams as fast as it can, every other one
// malformed, the rest a lie. The master takes at most one a second from
// it (the rest counted as dropped, the malformed ones rejected), keeps
// answering "ctl status" and serving; the lie counts for that worker's
// own figures only, and no request fails.
func TestStats_ReportFloodIsDropped(t *testing.T) {
	t.Parallel()
	app := pyApp(t)
	dir := test.ShortTempDir(t)
	gate := filepath.Join(dir, "flood")
	const n = 4000
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--", "python3", app, "--stats-flood", fmt.Sprintf("%d:%s", n, gate)}})
	addr := m.addr()
	m.waitServing()
	l := startLoad(t, addr)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// The throttled line names the last reason only: a malformed report,
	// or the liar's honest ones, now lower than its lie.
	test.WaitLog(t, m.log, stepTimeout, 1, "the liar's reports rejected", test.Event("notify.rejected"))
	var tr trafficStatus
	test.WaitFor(t, stepTimeout, "the flood dropped", func() error {
		st := statusOf(t, m.pidFile)
		tr, _ = st.traffic(1, "workers")
		if tr.ReportsDropped < n/2 {
			return fmt.Errorf("%d reports dropped", tr.ReportsDropped)
		}
		return nil
	})
	// The lie (10^14 5xx) was taken once, for the liar's own figures;
	// the honest worker's answers count on.
	if tr.Classes["5xx"] != 1e14 {
		t.Errorf("5xx = %d, want the liar's 10^14, once", tr.Classes["5xx"])
	}
	before := tr.Classes["2xx"]
	l.more(t, 64)
	test.WaitFor(t, stepTimeout, "the honest worker's figures moving", func() error {
		st := statusOf(t, m.pidFile)
		tr, _ := st.traffic(1, "workers")
		if tr.Classes["2xx"] <= before {
			return fmt.Errorf("2xx %d, before %d", tr.Classes["2xx"], before)
		}
		return nil
	})
	l.stop(t)
	m.stop(func(ln test.Line) bool { return test.Event("notify.rejected")(ln) })
}
