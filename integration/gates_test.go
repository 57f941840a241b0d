package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"github.com/molt-server/molt/test/load"
)

// The gates of a probation and the canary (docs/upgrades.md, "Gates"):
// a release that starts fine and then serves errors, or slowly, is rolled
// back by what it serves; a fine one is committed with the gates logged
// as passed.

// gatesMin is --min-requests in these tests.
const gatesMin = 100

// gatesApp writes the releases of the app and points dir/app at the good
// one: good answers after 2 ms; errors answers 500 to every request once
// ready; base answers after 20 ms and slow after 100 ms, 5× slower (the
// latency gate's pair: a p99 of a few milliseconds is all scheduling
// noise on a shared machine under the race detector).
func gatesApp(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	writeScript(t, filepath.Join(dir, "good.sh"), "exec "+bins.fakeapp+" serve --delay 2ms")
	writeScript(t, filepath.Join(dir, "errors.sh"), "exec "+bins.fakeapp+" serve --delay 2ms --status 500")
	writeScript(t, filepath.Join(dir, "base.sh"), "exec "+bins.fakeapp+" serve --delay 20ms")
	writeScript(t, filepath.Join(dir, "slow.sh"), "exec "+bins.fakeapp+" serve --delay 100ms")
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "good.sh"))
	return dir
}

// startGated runs 4 workers of dir/app with the gates' flags and waits
// until they serve.
func startGated(t *testing.T, dir string, flags ...string) (*master, []int) {
	t.Helper()
	args := append([]string{"--listen", "127.0.0.1:0", "--workers", "4", "--ready-timeout", "10s", "--probation", "2s",
		"--min-requests", strconv.Itoa(gatesMin)}, flags...)
	u := start(t, runOpts{Deploy: byRename, Args: append(args, "--", filepath.Join(dir, "app"))})
	u.waitServing()
	return u, u.waitWorkers(4)
}

// stopCounting500s ends the standard load, fails the test on any failed
// request but an answer of 500, and returns each kind's result.
func (l *loadPair) stopCounting500s(t *testing.T) (ka, pc load.Result) {
	t.Helper()
	defer l.cancel()
	l.more(t, 32)
	ka, pc = l.ka.Stop(), l.pc.Stop()
	for name, res := range map[string]load.Result{"keep-alive": ka, "connection per request": pc} {
		t.Logf("%s load: %v", name, res)
		if n := res.Failed() - res.Failures[load.Status]; n != 0 {
			t.Errorf("%s load: %d failed requests besides the 500s: %v", name, n, res.Samples)
		}
		for _, s := range res.Samples {
			if strings.HasPrefix(s, string(load.Status)) && !strings.Contains(s, "status 500") {
				t.Errorf("%s load: %s", name, s)
			}
		}
	}
	return ka, pc
}

// TestGates_ErrorsRollBack: a release that answers 500 to every request
// once ready is rolled back by the error gate within its probation, the
// reason naming the error share; the old generation serves on,
// untouched. With --canary 1 of 4 workers, the 500s the clients saw stay
// bounded by the gates' minimum and the figures' lag
// (docs/upgrades.md, "Canary").
func TestGates_ErrorsRollBack(t *testing.T) {
	t.Parallel()
	for _, canary := range []int{0, 1} {
		t.Run(fmt.Sprintf("canary_%d", canary), func(t *testing.T) {
			t.Parallel()
			dir := gatesApp(t)
			flags := []string{"--max-error-rate", "1%", "--probation", "30s"}
			if canary > 0 {
				flags = append(flags, "--canary", strconv.Itoa(canary))
			}
			u, workers := startGated(t, dir, flags...)
			l := startLoad(t, u.addr())
			repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "errors.sh"))
			usr2 := time.Now()
			u.Signal(syscall.SIGUSR2)
			failed := test.WaitLog(t, u.log, 60*time.Second, 1, "the error gate's verdict", test.Event("upgrade.gate_failed"))
			rb := test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))
			took := time.Since(usr2)
			reason := rb[0].Str("reason")
			if !strings.Contains(reason, "new generation: 5xx 100.0% over ") || !strings.Contains(reason, "(old: 0.0%, ") {
				t.Errorf("rollback reason %q, want the error share of both generations", reason)
			}
			if took > 30*time.Second {
				t.Errorf("rolled back %v after USR2, past the 30s probation", took)
			}
			if n := failed[0].Int("requests"); n < gatesMin {
				t.Errorf("the gate judged %d requests, fewer than --min-requests %d", n, gatesMin)
			}
			started := test.Find(u.log, test.Event("worker.started", "gen", "2"))
			if canary > 0 && len(started) != canary {
				t.Errorf("the new generation started %d workers, want the canary's %d", len(started), canary)
			}
			if got := u.current(); got != u.Pid {
				t.Errorf("molt.pid names %d after the rollback, want the old master %d", got, u.Pid)
			}
			if last := statusOf(t, u.pidFile).LastUpgrade; last == nil || last.Cause != "gate" || last.Reason != reason {
				t.Errorf("ctl status: last upgrade %+v, want cause gate and the reason logged", last)
			}
			if now := u.waitWorkers(4); fmt.Sprint(now) != fmt.Sprint(workers) {
				t.Errorf("the old generation's workers changed from %v to %v", workers, now)
			}
			checkNewGenerationGone(t, u.log)
			r := get(t, u.addr(), "/")
			if r.Status != 200 || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(u.Pid) {
				t.Errorf("after the rollback: %d from master %s, want 200 from %d", r.Status, r.Header.Get("X-Molt-Master-Pid"), u.Pid)
			}
			ka, pc := l.stopCounting500s(t)
			seen := ka.Failures[load.Status] + pc.Failures[load.Status]
			judged := failed[0].Int("requests")
			t.Logf("canary %d: %d answers of 500 seen by the clients (keep-alive %d, per connection %d); the gate judged %d; rolled back %v after USR2",
				canary, seen, ka.Failures[load.Status], pc.Failures[load.Status], judged, took.Round(time.Millisecond))
			if seen == 0 {
				t.Error("the clients saw no 500: the bad release met no traffic")
			}
			if canary > 0 && seen > 2*judged+gatesMin {
				t.Errorf("with --canary %d the clients saw %d answers of 500, more than twice the %d the gate judged plus %d",
					canary, seen, judged, gatesMin)
			}
			u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"),
				test.Event("upgrade.gate_failed"))
		})
	}
}

// TestGates_OneLyingOldWorkerCannotPassABadRelease: one of the old
// generation's 4 workers reports a 5xx share of 100% over huge counts,
// so that the old generation's sum looks as bad as a release of 500s.
// The gates' baseline is the median of the old workers' own figures: the
// release of 500s is rolled back all the same, the reason naming that
// median; the old generation serves on, and no request fails but the new
// generation's 500s (docs/security.md, "Limits").
func TestGates_OneLyingOldWorkerCannotPassABadRelease(t *testing.T) {
	t.Parallel()
	dir := gatesApp(t)
	liarFile := filepath.Join(dir, "liar")
	writeScript(t, filepath.Join(dir, "lying.sh"), "exec "+bins.fakeapp+" serve --delay 2ms --lie-stats 5xx:"+liarFile)
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "lying.sh"))
	u, workers := startGated(t, dir, "--max-error-rate", "1%", "--probation", "30s")
	l := startLoad(t, u.addr())
	// The lie is in: the old generation's sum is all 5xx.
	test.WaitFor(t, stepTimeout, "the lying worker's figures in its generation's", func() error {
		tr, _ := statusOf(t, u.pidFile).traffic(1, "workers")
		if tr.Classes["5xx"] < 1e12 || tr.ErrorShare < 0.99 {
			return fmt.Errorf("figures %+v", tr)
		}
		return nil
	})
	b, err := os.ReadFile(liarFile)
	if liar, _ := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || !slices.Contains(workers, liar) {
		t.Fatalf("the liar %q (%v) is not one of the old workers %v", b, err, workers)
	}
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "errors.sh"))
	u.Signal(syscall.SIGUSR2)
	failed := test.WaitLog(t, u.log, 60*time.Second, 1, "the error gate's verdict", test.Event("upgrade.gate_failed"))
	rb := test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back", "cause", "gate"))
	reason := rb[0].Str("reason")
	if !strings.Contains(reason, "new generation: 5xx 100.0% over ") ||
		!regexp.MustCompile(`\(old: 0\.0%, (median of 4|median of 3 of 4|lower of 2 of 4) workers\)`).MatchString(reason) {
		t.Errorf("rollback reason %q, want the new generation's 100%% against the median of the old workers' 0%%", reason)
	}
	if n := failed[0].Int("requests"); n < gatesMin {
		t.Errorf("the gate judged %d requests, fewer than --min-requests %d", n, gatesMin)
	}
	if gaveUp := test.Find(u.log, test.Event("upgrade.giving_up", "code", strconv.Itoa(16))); len(gaveUp) != 1 {
		t.Errorf("%d upgrade.giving_up lines with exit code 16, want 1", len(gaveUp))
	}
	if last := statusOf(t, u.pidFile).LastUpgrade; last == nil || last.Cause != "gate" || last.Reason != reason {
		t.Errorf("ctl status: last upgrade %+v, want cause gate and the reason logged", last)
	}
	if got := u.current(); got != u.Pid {
		t.Errorf("molt.pid names %d after the rollback, want the old master %d", got, u.Pid)
	}
	if now := u.waitWorkers(4); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("the old generation's workers changed from %v to %v", workers, now)
	}
	checkNewGenerationGone(t, u.log)
	ka, pc := l.stopCounting500s(t)
	if ka.Failures[load.Status]+pc.Failures[load.Status] == 0 {
		t.Error("the clients saw no 500: the bad release met no traffic")
	}
	u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"),
		test.Event("upgrade.gate_failed"))
}

// TestGates_OneLyingOldWorkerCannotFailAGoodRelease: one of the old
// generation's 4 workers reports huge counts of fast 2xx, so that the old
// generation's sum has a p99 of microseconds and a fine release looks
// hundreds of times slower. On the median of the old workers' own p99,
// the fine release passes the latency gate and commits.
func TestGates_OneLyingOldWorkerCannotFailAGoodRelease(t *testing.T) {
	t.Parallel()
	dir := gatesApp(t)
	writeScript(t, filepath.Join(dir, "lying.sh"), "exec "+bins.fakeapp+" serve --delay 20ms --lie-stats fast:"+filepath.Join(dir, "liar"))
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "lying.sh"))
	u, _ := startGated(t, dir, "--max-error-rate", "1%", "--max-latency-factor", "3")
	l := startLoad(t, u.addr())
	test.WaitFor(t, stepTimeout, "the lying worker's figures in its generation's", func() error {
		tr, _ := statusOf(t, u.pidFile).traffic(1, "workers")
		if tr.Classes["2xx"] < 1e12 || tr.P99MS <= 0 || tr.P99MS > 1 {
			return fmt.Errorf("figures %+v", tr)
		}
		return nil
	})
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "base.sh"))
	pid := u.upgrade()
	passed := test.Find(u.log, test.Event("upgrade.gates_passed", "stage", "commit"))
	if len(passed) != 1 {
		t.Fatalf("%d upgrade.gates_passed lines, want 1", len(passed))
	}
	if why := passed[0].Str("reason"); !regexp.MustCompile(`p99 \S+ \(old: \S+, (median of 4|median of 3 of 4|lower of 2 of 4) workers\)`).MatchString(why) {
		t.Errorf("gates_passed reason %q, want the p99 against the median of the old workers'", why)
	}
	if masters := l.stop(t); masters[pid] == 0 {
		t.Errorf("the new master %d answered nothing: %v", pid, masters)
	}
	u.stop()
}

// TestGates_SlowRollsBack: a release 5× slower is rolled back by the
// latency gate.
func TestGates_SlowRollsBack(t *testing.T) {
	t.Parallel()
	dir := gatesApp(t)
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "base.sh"))
	u, workers := startGated(t, dir, "--max-latency-factor", "2", "--probation", "30s")
	l := startLoad(t, u.addr())
	repoint(t, filepath.Join(dir, "app"), filepath.Join(dir, "slow.sh"))
	u.Signal(syscall.SIGUSR2)
	rb := test.WaitLog(t, u.log, 60*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	if reason := rb[0].Str("reason"); !strings.Contains(reason, "new generation: p99 ") || !strings.Contains(reason, "the old's") {
		t.Errorf("rollback reason %q, want the p99 of both generations", reason)
	}
	if now := u.waitWorkers(4); fmt.Sprint(now) != fmt.Sprint(workers) {
		t.Errorf("the old generation's workers changed from %v to %v", workers, now)
	}
	checkNewGenerationGone(t, u.log)
	l.stop(t)
	u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"),
		test.Event("upgrade.gate_failed"))
}

// TestGates_FineCommits: a fine release is committed after its
// probation, with the gates logged as passed, and no request failed.
func TestGates_FineCommits(t *testing.T) {
	t.Parallel()
	dir := gatesApp(t)
	u, _ := startGated(t, dir, "--max-error-rate", "1%", "--max-latency-factor", "3")
	l := startLoad(t, u.addr())
	pid := u.upgrade()
	passed := test.Find(u.log, test.Event("upgrade.gates_passed", "stage", "commit"))
	if len(passed) != 1 {
		t.Fatalf("%d upgrade.gates_passed lines, want 1", len(passed))
	}
	if n := passed[0].Int("requests"); n < gatesMin {
		t.Errorf("the gates passed on %d requests, fewer than %d", n, gatesMin)
	}
	if why := passed[0].Str("reason"); !strings.Contains(why, "5xx 0.0% over") || !strings.Contains(why, "p99 ") {
		t.Errorf("gates_passed reason %q, want both gates' figures", why)
	}
	masters := l.stop(t)
	if masters[pid] == 0 {
		t.Errorf("the new master %d answered nothing: %v", pid, masters)
	}
	u.stop()
}

// TestGates_CanaryServesTheMinimum: with --canary 1 of 4, the canary
// alone serves the new generation's share until the gates pass on it,
// having served at least --min-requests; then the rest start and the
// commit follows. In both connection modes: per connection, new
// connections reach the canary from the start; keep-alive clients stay
// on the worker they have, so only those that connect during the canary
// can reach it (docs/upgrades.md, "Canary").
func TestGates_CanaryServesTheMinimum(t *testing.T) {
	t.Parallel()
	eachCanaryMode(t, func(t *testing.T, u *master, ctx context.Context, keepAlive bool, name string) {
		cfg := load.Config{Network: "tcp", Addr: u.addr(), Clients: 16, Rate: 160, KeepAlive: keepAlive}
		before := load.Start(ctx, cfg) // connected before the upgrade
		old := u.current()
		u.Signal(syscall.SIGUSR2)
		serving := test.WaitLog(t, u.log, 60*time.Second, 1, "the canary serving", test.Event("upgrade.serving", "canary", "true"))
		canaries := test.Find(u.log, test.Event("worker.started", "gen", "2"))
		if len(canaries) != 1 {
			t.Fatalf("%d workers of the new generation started before the canary served, want 1", len(canaries))
		}
		canary := canaries[0].Int("pid")
		// The new master (molt.pid names it) shows its stage and the
		// gates' judgement so far.
		test.WaitFor(t, stepTimeout, "the gates' judgement in ctl status", func() error {
			st, err := tryStatus(t, u.pidFile)
			if err != nil {
				return err
			}
			if up := st.Upgrade; up == nil || up.Side != "new" || up.Gates == "" {
				return fmt.Errorf("upgrade %+v", st.Upgrade)
			} else if up.Stage != "probation" && up.Stage != "gates-waiting" || up.Want != 1 {
				t.Errorf("during the canary: stage %q, %d workers wanted", up.Stage, up.Want)
			}
			return nil
		})
		runs := []*load.Run{before}
		onCanary := func() int {
			n := 0
			for _, r := range runs {
				n += r.Snapshot().ByWorker[canary]
			}
			return n
		}
		if keepAlive {
			// The clients connected before stay on the old workers; a
			// few more connect during the canary, two at a time, until
			// one of them lands on it.
			small := load.Config{Network: "tcp", Addr: u.addr(), Clients: 2, Rate: 40, KeepAlive: true}
			test.WaitFor(t, 30*time.Second, "a keep-alive connection on the canary", func() error {
				if onCanary() > 0 {
					return nil
				}
				runs = append(runs, load.Start(ctx, small))
				return fmt.Errorf("%d keep-alive runs, none on the canary yet", len(runs)-1)
			})
		}
		passed := test.WaitLog(t, u.log, 90*time.Second, 1, "the gates passing on the canary", test.Event("upgrade.gates_passed", "stage", "canary"))
		atVerdict := onCanary()
		if n := passed[0].Int("requests"); n < gatesMin {
			t.Errorf("the gates passed the canary on %d requests, fewer than --min-requests %d", n, gatesMin)
		}
		if atVerdict < gatesMin {
			t.Errorf("the clients had %d answers from the canary %d at the verdict, fewer than %d", atVerdict, canary, gatesMin)
		}
		u.waitTakeover(old)
		if n := len(test.Find(u.log, test.Event("worker.started", "gen", "2"))); n < 4 {
			t.Errorf("the new generation started %d workers, want 4", n)
		}
		t.Logf("%s: the canary %d served %d answers by the verdict (the gates counted %d); %v from serving to the verdict",
			name, canary, atVerdict, passed[0].Int("requests"), passed[0].Time.Sub(serving[0].Time).Round(time.Millisecond))
		for _, r := range runs {
			if res := r.Stop(); res.Failed() != 0 {
				t.Errorf("load: %d failed requests: %v", res.Failed(), res.Samples)
			}
		}
		u.stop()
	})
}

// TestGates_CanaryShare: with --canary 1 beside 4 old workers, the
// canary meets about its share of the new connections during the canary
// stage, 1/5, not what an idle worker first in the kernel's queue would
// take (docs/upgrades.md, "Canary"). Per connection, every request is a
// new connection; with keep-alive, the clients connected before stay on
// the old workers and clients that connect during the stage are counted.
func TestGates_CanaryShare(t *testing.T) {
	t.Parallel()
	eachCanaryMode(t, func(t *testing.T, u *master, ctx context.Context, keepAlive bool, name string) {
		runs := []*load.Run{load.Start(ctx, load.Config{Network: "tcp", Addr: u.addr(), Clients: 16, Rate: 160, KeepAlive: keepAlive})}
		conns := func() map[int]int {
			all := map[int]int{}
			for _, r := range runs {
				for w, n := range r.Snapshot().Conns {
					all[w] += n
				}
			}
			return all
		}
		u.Signal(syscall.SIGUSR2)
		test.WaitLog(t, u.log, 60*time.Second, 1, "the canary serving", test.Event("upgrade.serving", "canary", "true"))
		canary := test.Find(u.log, test.Event("worker.started", "gen", "2"))[0].Int("pid")
		before := conns()
		verdict := func() error {
			if len(test.Find(u.log, test.Event("upgrade.gates_passed", "stage", "canary"))) == 0 {
				return fmt.Errorf("no verdict on the canary yet")
			}
			return nil
		}
		if keepAlive {
			// New keep-alive clients, four at a time, slow: 120 at most.
			small := load.Config{Network: "tcp", Addr: u.addr(), Clients: 4, Rate: 8, KeepAlive: true}
			test.WaitFor(t, 90*time.Second, "the gates passing on the canary", func() error {
				if len(runs) <= 30 {
					runs = append(runs, load.Start(ctx, small))
				}
				return verdict()
			})
		} else {
			test.WaitFor(t, 90*time.Second, "the gates passing on the canary", verdict)
		}
		after := conns()
		total, onCanary := 0, after[canary]-before[canary]
		for w, n := range after {
			total += n - before[w]
		}
		share := float64(onCanary) / float64(max(total, 1))
		t.Logf("%s: the canary %d took %d of %d new connections during the canary stage: %.1f%% (its share of the workers: 20%%)",
			name, canary, onCanary, total, 100*share)
		if total < 40 {
			t.Errorf("only %d new connections during the canary stage: too few to judge a share", total)
		}
		if share > 0.3 {
			t.Errorf("the canary took %.1f%% of the new connections, more than 30%% (its share of the workers: 20%%)", 100*share)
		}
		u.waitTakeover(u.Pid)
		for _, r := range runs {
			if res := r.Stop(); res.Failed() != 0 {
				t.Errorf("load: %d failed requests: %v", res.Failed(), res.Samples)
			}
		}
		u.stop()
	})
}

// eachCanaryMode runs f in both connection modes, each in a parallel
// subtest of its own: a master with the gates' app, --max-error-rate 1%
// and --canary 1 (startGated), and a context cancelled when f returns.
func eachCanaryMode(t *testing.T, f func(t *testing.T, u *master, ctx context.Context, keepAlive bool, name string)) {
	for _, keepAlive := range []bool{false, true} {
		name := "connection_per_request"
		if keepAlive {
			name = "keep_alive"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			u, _ := startGated(t, gatesApp(t), "--max-error-rate", "1%", "--canary", "1")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			f(t, u, ctx, keepAlive, name)
		})
	}
}
