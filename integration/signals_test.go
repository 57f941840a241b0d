package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// TestSignals_TTINAndTTOUScaleButKeepOneWorker: under keep-alive and
// connection-per-request load, TTIN adds a worker and TTOU drains one
// away without a single failed request; the last worker stays.
func TestSignals_TTINAndTTOUScaleButKeepOneWorker(t *testing.T) {
	t.Parallel()
	m, addr, before := startSteady(t, 2)
	l := startLoad(t, addr)
	m.Signal(syscall.SIGTTIN)
	after := m.waitWorkers(3)
	for _, p := range before {
		if !slices.Contains(after, p) {
			t.Errorf("TTIN replaced worker %d; it must only add one", p)
		}
	}
	m.Signal(syscall.SIGTTOU)
	m.waitWorkers(2)
	m.Signal(syscall.SIGTTOU)
	m.waitWorkers(1)
	m.Signal(syscall.SIGTTOU)
	test.WaitLog(t, m.log, stepTimeout, 1, "TTOU refused", test.Event("pool.scale_refused", "reason", "minimum", "delta", "-1"))
	if w := m.workers(); len(w) != 1 {
		t.Errorf("after a refused TTOU: workers %v, want 1", w)
	}
	l.stop(t)
	m.stop()
}

// TestSignals_QuitLetsAnInFlightRequestFinish: QUIT while a slow request
// is in a worker's handler: it completes with 200, then the master exits
// 0 and nothing is left.
func TestSignals_QuitLetsAnInFlightRequestFinish(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	hits := filepath.Join(dir, "hits")
	m := start(t, runOpts{Dir: dir,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--", bins.fakeapp, "serve", "--hit-file", hits}})
	addr := m.addr()
	m.waitServing()
	m.waitWorkers(2)
	type result struct {
		r   test.Response
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := test.Get(addr, "/sleep?ms=1500", reqTimeout)
		done <- result{r, err}
	}()
	test.WaitFor(t, stepTimeout, "the slow request in a handler", func() error {
		if b, _ := os.ReadFile(hits); len(b) == 0 {
			return fmt.Errorf("no hit yet")
		}
		return nil
	})
	m.Signal(quit)
	res := <-done
	if res.err != nil || res.r.Status != 200 {
		t.Fatalf("in-flight request during QUIT: %v (status %d)", res.err, res.r.Status)
	}
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("exit code %d after QUIT, want 0", code)
	}
	m.checkLogs()
	test.WaitLog(t, m.log, time.Second, 1, "graceful shutdown line", test.Event("master.shutdown", "mode", "graceful"))
}

// TestSignals_TermStopsEverythingAtOnce: TERM kills the workers without a
// drain (a slow request is cut) and the master exits 0.
func TestSignals_TermStopsEverythingAtOnce(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--drain-timeout", "60s"}})
	m.addr()
	m.waitServing()
	m.waitWorkers(2)
	start := time.Now()
	m.Signal(syscall.SIGTERM)
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("exit code %d after TERM, want 0", code)
	}
	test.WaitLog(t, m.log, time.Second, 1, "fast shutdown line", test.Event("master.shutdown", "mode", "fast"))
	if el := time.Since(start); el > 15*time.Second {
		t.Errorf("TERM took %v: it must not wait for the 60s drain timeout", el)
	}
	m.checkLogs()
}

// TestSignals_INTStopsLikeTERM (a terminal's Ctrl-C).
func TestSignals_INTStopsLikeTERM(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	m.addr()
	m.waitServing()
	m.waitWorkers(1)
	m.Signal(syscall.SIGINT)
	if code := m.Wait(stepTimeout); code != 0 {
		t.Errorf("exit code %d after INT, want 0", code)
	}
}

// TestSignals_USR1ReopensTheLogFile: after a rotation (rename), USR1 makes
// the master write to a new file at the configured path.
func TestSignals_USR1ReopensTheLogFile(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	m.addr()
	m.waitServing()
	rotated := m.log + ".1"
	if err := os.Rename(m.log, rotated); err != nil {
		t.Fatal(err)
	}
	m.Signal(syscall.SIGUSR1)
	test.WaitLog(t, m.log, stepTimeout, 1, "a reopened log file", test.Event("log.reopened"))
	if len(test.Find(rotated, test.Event("signal.received", "signal", "SIGUSR1"))) != 1 {
		t.Error("the rotated file does not end with the USR1 line")
	}
	m.stop()
}

// TestSignals_WINCHOnALoneMasterIsRefused: WINCH would stop the only
// generation serving; it is refused with a log line and changes nothing.
func TestSignals_WINCHOnALoneMasterIsRefused(t *testing.T) {
	t.Parallel()
	m, addr, before := startSteady(t, 2)
	m.Signal(syscall.SIGWINCH)
	test.WaitLog(t, m.log, stepTimeout, 1, "the WINCH refusal", test.Event("upgrade.winch_refused"))
	if after := m.workers(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("workers changed from %v to %v", before, after)
	}
	get(t, addr, "/")
	m.stop()
}
