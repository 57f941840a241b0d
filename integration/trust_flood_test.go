package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// TestTrust_NotifyFloodIsPaced: under the standard load, a worker run as
// nobody floods its notify socket for 8 s with STATUS= messages, each
// valid and from its own session, so each one is for the loop to apply
// (a MOLT_STATS= flood is dropped before the loop; this is not), with the
// metrics endpoint on (every event the loop handles publishes a snapshot).
// The master paces it (notify.paced, once): over 4 s of the flood it uses
// less than a third of a core (unpaced, the same flood kept it 60 to 70%
// busy on an idle machine), answers "ctl status" promptly and serves; no
// request fails, and no message is lost: the worker's last status, sent
// after the flood, is what "ctl status" shows, with the count it sent.
func TestTrust_NotifyFloodIsPaced(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the flooding worker runs as nobody (--user)")
	app := pyApp(t)
	const python = "/usr/bin/python3" // one nobody can execute
	test.Require(t, "python3", fileExists(python), python+" is missing")
	gate := nobodysGate(t, "flood")
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody", "--metrics-listen", "127.0.0.1:0",
		"--", python, app, "--status-flood", "8:" + gate}})
	addr := m.addr()
	m.waitServing()
	l := startLoad(t, addr)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	test.WaitLog(t, m.log, stepTimeout, 1, "the flood paced", test.Event("notify.paced"))
	share, took := masterShareDuringFlood(t, m)
	t.Logf("the master used %.0f%% of a core over %v of the flood", 100*share, took.Round(time.Millisecond))
	if share > 0.33 {
		t.Errorf("the master used %.0f%% of a core during a worker's notify flood, want under a third", 100*share)
	}
	l.more(t, 64)
	var last string
	test.WaitFor(t, 60*time.Second, "the worker's status after the flood", func() error {
		for _, p := range statusOf(t, m.pidFile).Procs {
			if strings.HasPrefix(p.Status, "flood") {
				last = p.Status
			}
		}
		if !strings.HasPrefix(last, "flood done ") {
			return fmt.Errorf("status %q", last)
		}
		return nil
	})
	if n, err := strconv.Atoi(strings.TrimPrefix(last, "flood done ")); err != nil || n < 200 {
		t.Errorf("the worker's last status %q: want the count of its flood (hundreds at least)", last)
	}
	if n := len(test.Find(m.log, test.Event("notify.paced"))); n != 1 {
		t.Errorf("notify.paced logged %d times, want once", n)
	}
	l.stop(t)
	m.stop(test.Event("notify.paced"))
}

// nobodysGate is a path in a fresh directory that a worker run as nobody
// can look at: the test creates the file to start what the worker does.
func nobodysGate(t *testing.T, name string) string {
	dir := test.ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

// masterShareDuringFlood measures the share of a core master m uses over
// 4 s of a worker's flood, asking for its status every half second (each
// answer must come within 2 s); it returns the share and the span.
func masterShareDuringFlood(t *testing.T, m *master) (float64, time.Duration) {
	t.Helper()
	t0, ok0 := test.CPUTicks(m.Pid)
	began := time.Now()
	// Observation window: the flood goes on (8 s from its start); we only
	// measure the master's CPU over it, while asking for its status.
	for time.Since(began) < 4*time.Second {
		s := time.Now()
		statusOf(t, m.pidFile)
		if d := time.Since(s); d > 2*time.Second {
			t.Errorf("ctl status took %v during the flood", d)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t1, ok1 := test.CPUTicks(m.Pid)
	took := time.Since(began)
	if !ok0 || !ok1 {
		t.Fatal("the master's CPU time unreadable")
	}
	return float64(t1-t0) / 100 / took.Seconds(), took
}
