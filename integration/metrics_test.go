package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/molt-server/molt/test"
)

// The Prometheus endpoint (--metrics-listen; docs/operating.md, "Metrics").

// metricsAddr waits for the n-th metrics.listening line and returns its
// address.
func (m *master) metricsAddr(n int) string {
	m.t.Helper()
	lines := test.WaitLog(m.t, m.log, startTimeout, n, "the metrics endpoint", test.Event("metrics.listening"))
	return lines[n-1].Str("addr")
}

// scrape GETs /metrics with c and parses it with the Prometheus library's
// own text-format parser.
func scrape(c *http.Client, addr string) (map[string]*dto.MetricFamily, error) {
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		return nil, fmt.Errorf("content type %q", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	for name := range fams {
		if !strings.HasPrefix(name, "molt_") {
			return nil, fmt.Errorf("metric %s lacks the molt_ prefix", name)
		}
	}
	return fams, nil
}

// sample returns the value of the sample of family name whose labels
// include want (name=value pairs), and whether there is one.
func sample(fams map[string]*dto.MetricFamily, name string, want ...string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		got := map[string]string{}
		for _, l := range m.Label {
			got[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(want); i += 2 {
			if got[want[i]] != want[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

// mustScrape scrapes once and fails the test on any error.
func mustScrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	fams, err := scrape(&http.Client{Timeout: reqTimeout, Transport: &http.Transport{DisableKeepAlives: true}}, addr)
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	return fams
}

// scraper scrapes addr without pause until stopped, with a keep-alive
// client (as Prometheus does) or a connection per scrape, and keeps
// every failure and the committed count of every scrape.
type scraper struct {
	mu        sync.Mutex
	n         int
	failures  []error
	committed []float64
	cancel    context.CancelFunc
	done      chan struct{}
}

func startScraper(addr string, keepAlive bool) *scraper {
	ctx, cancel := context.WithCancel(context.Background())
	s := &scraper{cancel: cancel, done: make(chan struct{})}
	c := &http.Client{Timeout: reqTimeout, Transport: &http.Transport{DisableKeepAlives: !keepAlive}}
	go func() {
		defer close(s.done)
		for ctx.Err() == nil {
			fams, err := scrape(c, addr)
			s.mu.Lock()
			s.n++
			if err != nil {
				s.failures = append(s.failures, err)
			} else {
				v, _ := sample(fams, "molt_upgrades_total", "outcome", "committed")
				s.committed = append(s.committed, v)
			}
			s.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond): // pacing, not synchronization
			}
		}
	}()
	return s
}

func (s *scraper) stop(t *testing.T, name string) {
	t.Helper()
	s.cancel()
	select {
	case <-s.done:
	case <-time.After(2 * reqTimeout):
		t.Fatalf("%s scraper did not stop", name)
	}
	t.Logf("%s scraper: %d scrapes, %d failed", name, s.n, len(s.failures))
	for _, err := range s.failures {
		t.Errorf("%s scrape failed: %v", name, err)
	}
	for i := 1; i < len(s.committed); i++ {
		if s.committed[i] < s.committed[i-1] {
			t.Errorf("%s scraper: committed upgrades went from %v to %v: a counter must never go back", name, s.committed[i-1], s.committed[i])
		}
	}
}

// TestMetrics_CountersKeepCountingAcrossUpgrades: under load and two
// scrapers (keep-alive, and a connection per scrape) that never pause,
// two upgrades: every scrape parses and none fails; the same address is
// served by whichever master is current (its generation); the committed
// count is 1, then 2, and never goes back.
func TestMetrics_CountersKeepCountingAcrossUpgrades(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms",
		"--metrics-listen", "127.0.0.1:0"}})
	addr, maddr := m.addr(), m.metricsAddr(1)
	m.waitServing()
	fams := mustScrape(t, maddr)
	if v, ok := sample(fams, "molt_upgrades_total", "outcome", "committed", "reason", "ok"); !ok || v != 0 {
		t.Errorf("before any upgrade: committed %v (present %v), want 0", v, ok)
	}
	if v, _ := sample(fams, "molt_workers", "generation", "1", "state", "ready"); v != 2 {
		t.Errorf("ready workers of generation 1: %v, want 2", v)
	}
	l := startLoad(t, addr)
	ka, pc := startScraper(maddr, true), startScraper(maddr, false)

	for i, bin := range []string{bins.molt2, bins.molt} {
		m.install(bin, byRename)
		m.upgrade()
		fams = mustScrape(t, maddr)
		if v, _ := sample(fams, "molt_generation"); v != float64(i+2) {
			t.Errorf("after upgrade %d: answered by generation %v, want %d", i+1, v, i+2)
		}
		if v, _ := sample(fams, "molt_upgrades_total", "outcome", "committed", "reason", "ok"); v != float64(i+1) {
			t.Errorf("after upgrade %d: committed %v, want %d", i+1, v, i+1)
		}
		if v, _ := sample(fams, "molt_upgrade_duration_seconds", "outcome", "committed"); v != float64(i+1) {
			t.Errorf("after upgrade %d: %v upgrade durations observed, want %d", i+1, v, i+1)
		}
		if v, _ := sample(fams, "molt_drain_duration_seconds", "kind", "generation"); v != float64(i+1) {
			t.Errorf("after upgrade %d: %v generation drains observed, want %d", i+1, v, i+1)
		}
		if v, _ := sample(fams, "molt_workers", "generation", fmt.Sprint(i+2), "state", "ready"); v != 2 {
			t.Errorf("after upgrade %d: ready workers of generation %d: %v, want 2", i+1, i+2, v)
		}
	}
	ka.stop(t, "keep-alive")
	pc.stop(t, "connection per scrape")
	if got := m.metricsAddr(3); got != maddr {
		t.Errorf("the third master's endpoint is at %s, want the first's %s", got, maddr)
	}
	l.stop(t)
	m.stop()
	refused(t, "tcp", maddr)
}

// TestMetrics_RollbackCountsItsReason: a new binary that refuses its
// flags rolls back; the old master counts it under rolled_back with the
// stable reason "config", serves on, and a good upgrade then counts as
// committed, with the rollback still counted.
func TestMetrics_RollbackCountsItsReason(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms",
		"--ready-timeout", "2s", "--metrics-listen", "127.0.0.1:0"}})
	addr, maddr := m.addr(), m.metricsAddr(1)
	m.waitServing()
	l := startLoad(t, addr)
	m.deployFile(passesPreflight+"exit 2\n", 0o755)
	m.Signal(syscall.SIGUSR2)
	test.WaitLog(t, m.log, 60*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	fams := mustScrape(t, maddr)
	if v, _ := sample(fams, "molt_upgrades_total", "outcome", "rolled_back", "reason", "config"); v != 1 {
		t.Errorf("rolled_back{reason=config}: %v, want 1", v)
	}
	if v, _ := sample(fams, "molt_upgrades_total", "outcome", "committed"); v != 0 {
		t.Errorf("committed after a rollback: %v, want 0", v)
	}
	if v, _ := sample(fams, "molt_upgrade_duration_seconds", "outcome", "rolled_back"); v != 1 {
		t.Errorf("rolled-back durations observed: %v, want 1", v)
	}
	m.install(bins.molt2, byRename)
	m.upgrade()
	fams = mustScrape(t, maddr)
	if v, _ := sample(fams, "molt_upgrades_total", "outcome", "rolled_back", "reason", "config"); v != 1 {
		t.Errorf("after the good upgrade: rolled_back{reason=config} %v, want 1 (carried over)", v)
	}
	if v, _ := sample(fams, "molt_upgrades_total", "outcome", "committed", "reason", "ok"); v != 1 {
		t.Errorf("after the good upgrade: committed %v, want 1", v)
	}
	l.stop(t)
	m.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"))
}

// TestMetrics_SlowScrapersDoNotBlockTheMaster: clients that connect and
// never send, and one that pipelines requests and never reads, hold
// every connection slot of the endpoint; meanwhile the master's loop
// answers ctl at once and adds a worker (TTIN), the service serves its
// load without a failure, and the master's descriptors stay bounded. Once
// the endpoint's timeouts cut them, a scrape is answered.
func TestMetrics_SlowScrapersDoNotBlockTheMaster(t *testing.T) {
	t.Parallel()
	m, addr, _ := startSteady(t, 2, "--metrics-listen", "127.0.0.1:0")
	maddr := m.metricsAddr(1)
	mustScrape(t, maddr)
	before := statusOf(t, m.pidFile).FDs
	l := startLoad(t, addr)

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// One that pipelines requests and never reads: the master's writes
	// fill its socket buffers and block that connection's goroutine only.
	c, err := net.DialTimeout("tcp", maddr, reqTimeout)
	if err != nil {
		t.Fatal(err)
	}
	conns = append(conns, c)
	w := bufio.NewWriter(c)
	for i := 0; i < 2000; i++ {
		fmt.Fprintf(w, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_ = w.Flush() // it may block on a full buffer: the deadline ends it
	stalled := time.Now()
	// Then twice the endpoint's connection limit that never send:
	// the first take its slots, the others wait in the backlog.
	for i := 0; i < 16; i++ {
		c, err := net.DialTimeout("tcp", maddr, reqTimeout)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	// The loop is free: ctl answers promptly, TTIN adds a worker.
	t0 := time.Now()
	st := statusOf(t, m.pidFile)
	if d := time.Since(t0); d > 5*time.Second {
		t.Errorf("ctl status took %v while scrapers stall", d)
	}
	if st.FDs > before+8+4 {
		t.Errorf("the master holds %d descriptors with 17 stalled scrapers (%d before): want at most the endpoint's 8 connections more", st.FDs, before)
	}
	m.Signal(syscall.SIGTTIN)
	m.waitWorkers(3)
	l.more(t, 64)
	// Slots free up as the timeouts cut the stalled clients (5 s without
	// a request, 10 s to write a response), eight at a time; a fresh
	// scrape, queued behind them, is answered then.
	if _, err := scrape(&http.Client{Timeout: 45 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}, maddr); err != nil {
		t.Errorf("scrape after the stalled clients: %v", err)
	}
	t.Logf("a scrape answered %v after the clients stalled", time.Since(stalled).Round(time.Millisecond))
	l.stop(t)
	m.stop()
}
