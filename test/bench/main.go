// Command bench is "make bench": it measures molt serving its demo app
// with molt drill (the same engine operators use) and writes
// test/bench/RESULTS.md, on a fixed CPU budget (server and load generator
// pinned to different CPUs): throughput and p99 in both connection modes
// against the same app run bare, with the balance across workers and the
// CPU time of molt's master and keeper; memory; the upgrade latency
// against nginx's binary upgrade; zero downtime across upgrades; and
// upgrades at scale. It runs on the machine it is given and says which.
// Numbers are what they are: a target missed is reported as missed.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/test"
)

func main() {
	moltBin := flag.String("molt", "bin/molt", "the molt binary to measure")
	out := flag.String("out", "test/bench/RESULTS.md", "where to write the results")
	upgrades := flag.Int("upgrades", 20, "upgrades per zero-downtime run")
	rounds := flag.Int("rounds", 12, "rounds of the throughput measurement (each runs every setup once in each mode, and (a) around each of them)")
	runFor := flag.Duration("run", time.Second, "length of one throughput run")
	flag.IntVar(&faultRuns, "fault-runs", faultRuns, "drills per fault (faults section)")
	nginx := flag.String("nginx", "", "the nginx `binary` to compare upgrades with (default: /usr/sbin/nginx or nginx on PATH; \"none\" skips it)")
	only := flag.String("only", "", "run only these sections, comma-separated: "+strings.Join(sectionNames, ", ")+" (default all)")
	flag.Parse()
	abs, err := filepath.Abs(*moltBin)
	if err != nil {
		fail(err)
	}
	raiseFileLimit()
	b := &bench{molt: abs, upgrades: *upgrades, rounds: max(1, *rounds), runFor: *runFor, started: time.Now(), cpu: cpuBudget(), nginx: *nginx}
	b.cpu.pinSelf()
	if *only != "" {
		b.only = map[string]bool{}
		for _, s := range strings.Split(*only, ",") {
			s = strings.TrimSpace(s)
			if !slices.Contains(sectionNames, s) {
				fail(fmt.Errorf("-only %q: want one of %s", s, strings.Join(sectionNames, ", ")))
			}
			b.only[s] = true
		}
	}
	b.run()
	if err := os.WriteFile(*out, []byte(b.markdown()+keptSection(*out)), 0o644); err != nil {
		fail(err)
	}
	fmt.Printf("bench: wrote %s in %v\n", *out, time.Since(b.started).Round(time.Second))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

// raiseFileLimit lifts the open-file limit to its hard maximum, for the
// run with thousands of idle connections (children inherit it).
func raiseFileLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

// report is the part of "molt drill --json" the bench reads.
type report struct {
	Requests, OK, Failed int
	Failures             map[string]int
	ByMode               map[string]struct {
		OK     int     `json:"ok"`
		Failed int     `json:"failed"`
		PerSec float64 `json:"per_sec"`
	} `json:"by_mode"`
	Steady    percentiles `json:"latency_steady"`
	InUpgrade percentiles `json:"latency_in_upgrades"`
	Latency   percentiles `json:"latency"`
	Upgrades  []struct {
		TriggerMs    float64 `json:"trigger_ms"`
		NewServingMs float64 `json:"new_serving_ms"`
		OldGoneMs    float64 `json:"old_gone_ms"`
		Error        string  `json:"error"`
		Fault        *struct {
			BackMs     float64 `json:"back_ms"`
			KeeperKept bool    `json:"keeper_kept"`
		} `json:"fault"`
	}
	ByWorker      map[string]int `json:"by_worker"`
	ConnsByWorker map[string]int `json:"conns_by_worker"`
	IdleConns     int            `json:"idle_conns"`
	IdleClosed    int            `json:"idle_closed_by_server"`
}

type percentiles struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func (r report) perSec() float64 {
	t := 0.0
	for _, m := range r.ByMode {
		t += m.PerSec
	}
	return t
}

type bench struct {
	molt             string
	upgrades, rounds int
	runFor           time.Duration
	nginx            string // -nginx
	cpu              budget
	started          time.Time
	commands         []string
	sections         []string
	only             map[string]bool // nil: every section
}

func (b *bench) log(format string, a ...any) {
	fmt.Printf("bench %5.0fs: %s\n", time.Since(b.started).Seconds(), fmt.Sprintf(format, a...))
}

func freeAddr() string {
	a, err := test.FreeAddr()
	if err != nil {
		fail(err)
	}
	return a
}

// drill runs molt drill --json against s.
func (b *bench) drill(s *server, args ...string) report {
	full := append([]string{"drill", "--json"}, args...)
	full = append(full, "http://"+s.addr+"/")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd, shown := command(ctx, b.cpu.load, b.molt, full...)
	b.note(shown)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var r report
	if jerr := json.Unmarshal(stdout.Bytes(), &r); jerr != nil {
		fail(fmt.Errorf("molt %s: %v %v\n%s", strings.Join(full, " "), err, jerr, stderr.String()))
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		fail(err)
	}
	return r
}

// note records a command for the results' "how" section (once).
func (b *bench) note(cmd string) {
	for _, c := range b.commands {
		if c == cmd {
			return
		}
	}
	b.commands = append(b.commands, cmd)
}

func (b *bench) section(title string, lines ...string) {
	b.sections = append(b.sections, "## "+title+"\n\n"+strings.Join(lines, "\n")+"\n")
}

// memMB is one of the memory lines of /proc/PID/status (VmRSS, RssAnon,
// RssFile), in MB; -1 if unknown.
func memMB(pid int, key string) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return float64(kb) / 1024
		}
	}
	return -1
}

func stats(xs []float64) (median, lo, hi float64) {
	if len(xs) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	median = s[len(s)/2]
	if len(s)%2 == 0 {
		median = (s[len(s)/2-1] + median) / 2
	}
	return median, s[0], s[len(s)-1]
}

// spread formats the median and range of the known (non-negative) values
// of an upgrade measure, and how many were unknown.
func spread(xs []float64) string {
	var known []float64
	for _, x := range xs {
		if x >= 0 {
			known = append(known, x)
		}
	}
	if len(known) == 0 {
		return "n/a"
	}
	m, lo, hi := stats(known)
	out := fmt.Sprintf("%.0f [%.0f–%.0f]", m, lo, hi)
	if n := len(xs) - len(known); n > 0 {
		out += fmt.Sprintf(" (%d unseen)", n)
	}
	return out
}

// upgradeTimes returns the new-serving and old-gone times of r's upgrades
// and how many triggers failed.
func upgradeTimes(r report) (newServing, oldGone []float64, failed int) {
	for _, u := range r.Upgrades {
		newServing, oldGone = append(newServing, u.NewServingMs), append(oldGone, u.OldGoneMs)
		if u.Error != "" {
			failed++
		}
	}
	return newServing, oldGone, failed
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}

// sectionNames are the sections, in the order they run.
var sectionNames = []string{"throughput", "upgrade-latency", "zero-downtime", "faults", "scale"}

func (b *bench) run() {
	for i, run := range []func(){b.throughput, b.upgradeLatency, b.zeroDowntime, b.faults, b.scale} {
		if b.only == nil || b.only[sectionNames[i]] {
			run()
		}
	}
}

// zeroDowntime: upgrades under load at 32 and 256 clients, each mode.
func (b *bench) zeroDowntime() {
	rows := []string{
		"| clients | mode | requests | failed | upgrades failed | p99 steady (ms) | p99 in upgrades (ms) | ratio (target ≤ 1.5) | new generation serving, median [min–max] (ms) | old generation gone, median [min–max] (ms) |",
		"|---|---|---|---|---|---|---|---|---|---|",
	}
	for _, clients := range []int{32, 256} {
		for _, mode := range []string{"keep-alive", "close"} {
			s := b.startMolt(moltOpts{workers: 2})
			b.log("zero downtime: %d clients, %s, %d upgrades", clients, mode, b.upgrades)
			r := b.drill(s, "--clients", strconv.Itoa(clients), "--mode", mode, "--upgrades", strconv.Itoa(b.upgrades),
				"--interval", "1s", "--ctl", s.pidFile)
			s.stop()
			ns, og, bad := upgradeTimes(r)
			ratio := r.InUpgrade.P99 / r.Steady.P99
			rows = append(rows, fmt.Sprintf("| %d | %s | %d | %d %s | %d of %d | %.2f | %.2f | %.2f (%s) | %s | %s |",
				clients, mode, r.Requests, r.Failed, failureClasses(r), bad, len(r.Upgrades), r.Steady.P99, r.InUpgrade.P99, ratio, verdict(ratio <= 1.5),
				spread(ns), spread(og)))
		}
	}
	b.section("Zero downtime: "+strconv.Itoa(b.upgrades)+" upgrades under load",
		append([]string{"molt with 2 workers (the demo app, `--no-keeper`), `molt ctl upgrade --wait` every second, probation 200 ms; one `molt drill` run per row, the clients as fast as they can. Target: 0 failed requests; p99 inside upgrade windows at most 1.5 × steady state. An upgrade window runs from the trigger until the old generation's last answer.", ""}, rows...)...)
}

func failureClasses(r report) string {
	if r.Failed == 0 {
		return ""
	}
	var cls []string
	for c, n := range r.Failures {
		cls = append(cls, fmt.Sprintf("%s %d", c, n))
	}
	sort.Strings(cls)
	return "(" + strings.Join(cls, ", ") + ")"
}

func meanSD(xs []float64) (mean, sd float64) {
	if len(xs) == 0 {
		return math.NaN(), math.NaN()
	}
	for _, x := range xs {
		mean += x
	}
	mean /= float64(len(xs))
	for _, x := range xs {
		sd += (x - mean) * (x - mean)
	}
	return mean, math.Sqrt(sd / float64(len(xs)))
}

// scale: upgrades with 1, 8 and 32 workers, and with 5,000 idle keep-alive
// connections open.
func (b *bench) scale() {
	rows := []string{
		"| setting | requests | failed | upgrades failed | new generation serving, median [min–max] (ms) | old generation gone, median [min–max] (ms) | idle connections closed by the end |",
		"|---|---|---|---|---|---|---|",
	}
	type run struct {
		name    string
		workers int
		extra   []string
	}
	for _, c := range []run{
		{"1 worker", 1, nil},
		{"8 workers", 8, nil},
		{"32 workers", 32, nil},
		{"2 workers, 5,000 idle keep-alive connections", 2, []string{"--idle-conns", "5000"}},
	} {
		s := b.startMolt(moltOpts{workers: c.workers})
		b.log("scale: %s", c.name)
		args := append([]string{"--clients", "16", "--upgrades", "5", "--interval", "2s", "--ctl", s.pidFile}, c.extra...)
		r := b.drill(s, args...)
		s.stop()
		ns, og, bad := upgradeTimes(r)
		idle := "–"
		if r.IdleConns > 0 {
			idle = fmt.Sprintf("%d of %d", r.IdleClosed, r.IdleConns)
		}
		rows = append(rows, fmt.Sprintf("| %s | %d | %d %s | %d of %d | %s | %s | %s |",
			c.name, r.Requests, r.Failed, failureClasses(r), bad, len(r.Upgrades), spread(ns), spread(og), idle))
	}
	b.section("Scale",
		append([]string{"molt (`--no-keeper`) with the demo app: 5 upgrades (`molt ctl upgrade --wait`) every 2 s under 16 clients of each mode side by side, as fast as they go; one `molt drill` run per row. Idle connections are opened before the first upgrade and never used again; the old generation closes them once they have been idle for 2 s while it drains (a client would reconnect)."}, append([]string{""}, rows...)...)...)
}

func (b *bench) markdown() string {
	budget := "## CPU budget\n\n" + b.cpu.note + ". Numbers from a shared machine (other builds and tests running) are indicative: compare the ratios measured side by side, not absolute numbers.\n\n"
	var sb strings.Builder
	sb.WriteString("# molt benchmark results\n\n")
	sb.WriteString("Written by `make bench` (test/bench). Every number comes from `molt drill`, the engine operators use; a target missed says so.\n\n")
	sb.WriteString("## Machine\n\n")
	sb.WriteString(machine())
	sb.WriteString("\n")
	sb.WriteString(budget)
	for _, s := range b.sections {
		sb.WriteString(s)
		sb.WriteString("\n")
	}
	sb.WriteString("## How\n\n`make bench` (`go run ./test/bench -molt bin/molt`), " + fmt.Sprintf("%v in all", time.Since(b.started).Round(time.Second)) + ". The commands it ran (temp paths and ports vary; each repeated run listed once):\n\n```\n")
	for _, c := range b.commands {
		sb.WriteString(c + "\n")
	}
	sb.WriteString("```\n")
	return sb.String()
}

func machine() string {
	var lines []string
	lines = append(lines, "- date: "+time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	if out, err := exec.Command("uname", "-srm").Output(); err == nil {
		lines = append(lines, "- kernel: "+strings.TrimSpace(string(out)))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				lines = append(lines, "- CPU: "+strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":")))
				break
			}
		}
	}
	lines = append(lines, fmt.Sprintf("- cores: %d", runtime.NumCPU()))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if l, _, ok := strings.Cut(string(b), "\n"); ok {
			lines = append(lines, "- "+strings.Join(strings.Fields(l), " "))
		}
	}
	lines = append(lines, "- Go: "+runtime.Version())
	return strings.Join(lines, "\n") + "\n"
}

// longRunsHeading starts the part of RESULTS.md that make bench does not
// measure: figures of the long runs (make soak, make fuzz, timed
// integration scenarios) written by hand. Every measured number lives in
// RESULTS.md, so a rewrite keeps that part as it was.
const longRunsHeading = "\n## Long runs (by hand)\n"

// keptSection returns the long-runs part of the file at path, or "".
func keptSection(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if i := strings.Index(string(b), longRunsHeading); i >= 0 {
		return string(b[i:])
	}
	return ""
}
