package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// upgradeLatencyCount is the number of upgrades per system and mode.
const upgradeLatencyCount = 10

// upgradeLatency: the time from the upgrade signal to the first answer of
// the new generation, for molt (USR2 to the pid in its pid file) and, if
// installed, nginx's binary upgrade (USR2 to its master, then QUIT to the
// old one once the new one serves), each mode, 32 clients.
func (b *bench) upgradeLatency() {
	type result struct {
		ns     []float64
		failed string // requests, by class
		bad    int    // upgrades not seen
		// phases: molt's own timings, from its log (phaseTimes)
		phases map[string][]float64
	}
	// molt with the probation of the other sections, and with the least
	// one: it commits as soon as the new generation serves, and the old
	// one drains, as the nginx procedure below does.
	molts := []string{"molt, probation 200 ms", "molt, probation 1 ms"}
	probations := []string{"200ms", "1ms"}
	systems := append(slices.Clone(molts), "nginx")
	results := map[string]map[string]result{}
	for _, sys := range systems {
		results[sys] = map[string]result{}
	}
	args := func(mode string) []string {
		return []string{"--clients", "32", "--mode", mode, "--upgrades", strconv.Itoa(upgradeLatencyCount), "--interval", "2s"}
	}
	collect := func(r report) result {
		ns, _, _ := upgradeTimes(r)
		res := result{failed: strings.TrimSpace(fmt.Sprintf("%d %s", r.Failed, failureClasses(r)))}
		for _, x := range ns {
			if x < 0 {
				res.bad++
			}
		}
		res.ns = ns
		return res
	}
	nginxSkip := ""
	bin, err := nginxBinary(b.nginx)
	if err != nil {
		nginxSkip = fmt.Sprintf("skipped: %v", err)
	}
	for _, mode := range modes {
		for i, sys := range molts {
			b.log("upgrade latency: %s, %s, %d upgrades", sys, mode, upgradeLatencyCount)
			s := b.startMolt(moltOpts{workers: 2, keeper: true, probation: probations[i]})
			r := b.drill(s, append(args(mode), "--signal", s.pidFile)...)
			res := collect(r)
			res.phases = phaseTimes(s.log)
			s.stop()
			results[sys][mode] = res
		}
		if nginxSkip != "" {
			continue
		}
		b.log("upgrade latency: nginx, %s, %d upgrades", mode, upgradeLatencyCount)
		n, err := b.startNginx(bin)
		if err != nil {
			nginxSkip = fmt.Sprintf("nginx did not start: %v", err)
			fmt.Println("bench:", nginxSkip)
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := retireOldNginx(ctx, n); done <- err }()
		r := b.drill(n, append(args(mode), "--signal", n.pidFile, "--header", "X-Nginx-Pid", "--worker-header", "X-Nginx-Pid")...)
		cancel()
		if err := <-done; err != nil {
			nginxSkip = fmt.Sprintf("nginx's upgrade failed: %v", err)
			fmt.Println("bench:", nginxSkip)
		}
		n.stop()
		results["nginx"][mode] = collect(r)
	}
	if nginxSkip != "" {
		fmt.Println("bench:", nginxSkip)
	}
	rows := []string{
		"| server | mode | upgrades | not seen | failed requests | new generation serving, median [min–max] (ms) |",
		"|---|---|---|---|---|---|",
	}
	medians := map[string]map[string]float64{}
	for _, sys := range systems {
		medians[sys] = map[string]float64{}
		for _, mode := range modes {
			res, ok := results[sys][mode]
			if !ok {
				continue
			}
			var known []float64
			for _, x := range res.ns {
				if x >= 0 {
					known = append(known, x)
				}
			}
			m := math.NaN()
			if len(known) > 0 {
				m, _, _ = stats(known)
			}
			medians[sys][mode] = m
			rows = append(rows, fmt.Sprintf("| %s | %s | %d | %d | %s | %s |", sys, mode, len(res.ns), res.bad, res.failed, spread(res.ns)))
		}
	}
	lines := []string{
		fmt.Sprintf("The time from the upgrade signal to the first answer by the new generation, as the clients see it: `molt drill --clients 32 --mode MODE --upgrades %d --interval 2s --signal PIDFILE` (USR2 to the pid in the pid file, sent by the drill itself), one run per server and mode, a fresh server for each. A new generation is the first answer with a generation header value not seen before the signal: `X-Molt-Master-Pid` for molt, the worker pid `X-Nginx-Pid` for nginx (its new master's workers are new pids). molt: 2 workers, with its keeper, the same binary re-executed; with the probation of the other sections (200 ms) and with 1 ms (it commits as soon as the new generation is ready, and the old one drains: the nginx procedure here). nginx (Debian's, the reference): 2 worker processes, the same binary; USR2 starts the new master (the pid file becomes nginx.pid.oldbin for the old one), and the bench, polling every 2 ms on the load generator's CPU, sends QUIT to the old master as soon as a fresh connection is answered by one of the new master's workers, then waits until the old master is gone before the next upgrade. With keep-alive, clients move to the new generation when the old one closes their connections (molt: when the old generation drains, after the probation), so that time is part of it for both; nginx closes idle keep-alive connections at QUIT, and a client that sends its next request just then sees it fail.", upgradeLatencyCount),
		"",
	}
	lines = append(lines, rows...)
	lines = append(lines, "", "Where molt's time goes: the phases its new master logs on `upgrade.committed` (milliseconds since the signal, median [min–max] over the upgrades of the run): its hello on the G1↔G2 channel (the new binary started), its configuration from the old master, and its generation serving (every new worker ready; the first answers come from the first worker ready, before that).", "",
		"| run | mode | hello | config | serving |", "|---|---|---|---|---|")
	for _, sys := range molts {
		for _, mode := range modes {
			ph := results[sys][mode].phases
			lines = append(lines, fmt.Sprintf("| %s | %s | %s | %s | %s |", sys, mode, spread(ph["hello_ms"]), spread(ph["config_ms"]), spread(ph["serving_ms"])))
		}
	}
	lines = append(lines, "")
	if nginxSkip != "" {
		lines = append(lines, "nginx: "+nginxSkip+".")
	}
	for _, mode := range modes {
		for _, sys := range molts {
			m, n := medians[sys][mode], medians["nginx"][mode]
			if sys != molts[len(molts)-1] {
				// The target compares the same procedure: the old
				// generation told to go as soon as the new one answers.
				// A longer probation is a wait the operator chose.
				lines = append(lines, fmt.Sprintf("- For information, %s, %s: %.0f ms (nginx: %.0f ms); the probation is part of it in keep-alive mode.", sys, mode, m, n))
				continue
			}
			if _, ok := results["nginx"][mode]; !ok || math.IsNaN(n) {
				lines = append(lines, fmt.Sprintf("- Target, %s, %s: median ≤ nginx median: not measured (no nginx figure); molt %.0f ms.", sys, mode, m))
				continue
			}
			lines = append(lines, fmt.Sprintf("- Target, %s, %s: median ≤ nginx median: %.0f ms against %.0f ms (%s).", sys, mode, m, n, verdict(m <= n)))
			if m > n {
				ph := results[sys][mode].phases
				hello, _, _ := stats(ph["hello_ms"])
				serving, _, _ := stats(ph["serving_ms"])
				lines = append(lines, fmt.Sprintf("  Why: two Go programs start one after the other before the first new answer, on a CPU the old generation keeps busy: the new master (its hello, median %.1f ms after the signal here) and then its workers (the generation serving at %.1f ms), each an exec of molt's 13 MB binary (about 2.3 ms of CPU and 430 page faults each on an idle CPU, against 1 ms and 170 for an empty Go program: `perf stat -r 30 bin/molt version`); nginx's new master forks its workers without an exec. What would close it: a smaller worker binary than molt's demo (an app's own), a static build (`CGO_ENABLED=0`: 0.8 ms less per start here, but user lookups without NSS), or giving the new generation's start a larger share of the CPU than the old generation's serving.", hello, serving))
			}
		}
	}
	b.section("Upgrade latency against nginx", lines...)
}

// phaseTimes reads the phases of every upgrade a new master committed
// from molt's JSON log at path: field name (hello_ms, ...) to values.
func phaseTimes(path string) map[string][]float64 {
	out := map[string][]float64{}
	data, err := os.ReadFile(path)
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(data), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil || rec["event"] != "upgrade.committed" || rec["side"] != "new" {
			continue
		}
		for _, k := range []string{"hello_ms", "config_ms", "serving_ms"} {
			if v, ok := rec[k].(float64); ok {
				out[k] = append(out[k], v)
			}
		}
	}
	return out
}

// faultRuns is the number of drills per fault (a fresh server each: the
// keeper gives up after more than 5 deaths a minute).
var faultRuns = 5

// faults: molt drill --fault under load, both modes side by side: the
// primary master killed (kill-master), and a new master killed once the
// old one exited after its commit (kill-new-master), under molt's keeper.
func (b *bench) faults() {
	rows := []string{
		"| fault | runs | requests | failed keep-alive | failed close | fresh master answering after the kill, median [min–max] (ms) | every worker ready (ms) | p99 steady (ms) | p99 after the kill (ms) | keeper unchanged |",
		"|---|---|---|---|---|---|---|---|---|---|",
	}
	var verdicts []string
	for _, fault := range []string{"kill-master", "kill-new-master"} {
		var requests, failedKA, failedClose, kept, bad int
		var serving, back, p99Steady, p99In []float64
		var classes []string
		for run := 1; run <= faultRuns; run++ {
			b.log("faults: %s, run %d of %d", fault, run, faultRuns)
			s := b.startMolt(moltOpts{workers: 2, keeper: true})
			r := b.drill(s, "--clients", "16", "--mode", "both", "--fault", fault, "--interval", "2s", "--duration", "5s", "--ctl", s.pidFile)
			s.stop()
			requests += r.Requests
			failedKA += r.ByMode["keep-alive"].Failed
			failedClose += r.ByMode["close"].Failed
			if c := failureClasses(r); c != "" {
				classes = append(classes, c)
			}
			if len(r.Upgrades) != 1 || r.Upgrades[0].Fault == nil || r.Upgrades[0].Error != "" {
				bad++
				if len(r.Upgrades) == 1 {
					b.log("faults: %s: %s", fault, r.Upgrades[0].Error)
				}
				continue
			}
			u := r.Upgrades[0]
			serving = append(serving, u.NewServingMs)
			back = append(back, u.Fault.BackMs)
			p99Steady, p99In = append(p99Steady, r.Steady.P99), append(p99In, r.InUpgrade.P99)
			if u.Fault.KeeperKept {
				kept++
			}
		}
		notes := ""
		if bad > 0 {
			notes = fmt.Sprintf(" (%d failed)", bad)
		}
		if len(classes) > 0 {
			classes = append([]string{""}, classes...)
		}
		rows = append(rows, fmt.Sprintf("| %s | %d%s | %d | %d | %d%s | %s | %s | %s | %s | %d of %d |",
			fault, faultRuns, notes, requests, failedKA, failedClose, strings.Join(classes, " "), spread(serving), spread(back),
			spread(p99Steady), spread(p99In), kept, faultRuns))
		verdicts = append(verdicts, fmt.Sprintf("- Target, %s: 0 failed requests, every run recovered with the keeper unchanged: %s.",
			fault, verdict(failedKA+failedClose == 0 && bad == 0 && kept == faultRuns)))
	}
	b.section("Faults: a master killed under load",
		append([]string{fmt.Sprintf("molt with 2 workers and its keeper (default `--stable-after` 30 s), `molt drill --clients 16 --mode both --fault FAULT --interval 2s --duration 5s --ctl PIDFILE`, %d runs per fault, a fresh server each. kill-master: SIGKILL to the primary master; its keeper starts a fresh master with the sockets it holds. kill-new-master: `molt ctl upgrade --wait` (the same binary), then, once the old master has exited, SIGKILL to the new one; before it served `--stable-after`, the keeper starts the release before it. The fresh master answering: from the kill to its first answer (`new_serving_ms`); every worker ready: until `molt ctl status` shows it serving with all its workers (`fault.back_ms`, polled every 50 ms); p99 after the kill: answers from the kill until then (`latency_in_upgrades`), medians over the runs. Target: 0 failed requests.", faultRuns), ""},
			append(append(rows, ""), verdicts...)...)...)
}
