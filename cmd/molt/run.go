package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master"
	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

const runUsage = `Usage: molt run [flags] [-- COMMAND [ARGS...]]

Runs a master process that opens the listen sockets and starts --workers
worker processes that accept on them. Without COMMAND the workers run
molt's built-in demo HTTP app; with COMMAND they run that program, which
gets the sockets the way systemd passes them (fds 3.., LISTEN_FDS,
LISTEN_FDNAMES, LISTEN_PID) and reports readiness on NOTIFY_SOCKET.
Started with socket activation itself (a systemd .socket unit, or
systemd-socket-activate), molt adopts the passed sockets for the --listen
listeners they match by name or address instead of binding those.

Examples:
  molt run --listen 127.0.0.1:8080 --workers 2
  molt run --listen web=:8080 --listen admin=unix:/run/app.sock -- ./myapp --flag
  molt run --ready delay:2s -- python3 app.py     # an app that never notifies

Signals to the master (kill -SIGNAL $(cat molt.pid)):
  USR2  upgrade: start the binary at this path anew; it serves alongside for
        --probation, then commits, and the old master drains and exits
        (any failure before the commit rolls back by itself)
  QUIT  graceful stop (after a 1s window in which a USR2 makes it "upgrade,
        then retire"); to the old master during an upgrade: commit; to the
        new master before its commit: roll back
  WINCH old master during an upgrade: stop its workers (standby)
  HUP   old master in standby: respawn its workers
  TERM, INT  fast stop (of both generations during an upgrade)
  TTIN / TTOU  one worker more / fewer
  USR1  reopen --log-file and --worker-log

Flags:
`

// runFlags are the flags of "molt run".
type runFlags struct {
	listen       []string
	socketMode   string
	workers      int
	pidFile      string
	logFile      string
	workerLog    string
	newPrivs     bool
	logLevel     string
	logJSON      bool
	ready        string
	readyTimeout time.Duration
	drainTimeout time.Duration
	stopSignal   string
	probation    time.Duration
	stableAfter  time.Duration
	commit       string
	control      string
	metrics      string
	configFile   string
	user, group  string
	chdir        string
	env          []string
	umask        string
	backlog      int
	noKeeper     bool
	watchdog     time.Duration
	lifetime     time.Duration
	maxErrorRate string
	maxLatency   float64
	minRequests  int
	canary       int
	health       string
	healthCmd    string
	healthTime   time.Duration
}

// listFlag is a repeatable string flag.
type listFlag struct{ values *[]string }

func (l listFlag) String() string {
	if l.values == nil {
		return ""
	}
	return strings.Join(*l.values, ",")
}

func (l listFlag) Set(v string) error {
	*l.values = append(*l.values, v)
	return nil
}

// defaultListen is where "molt run" listens without --listen, as
// gunicorn's default bind: loopback only.
const defaultListen = "127.0.0.1:8080"

func newRunFlagSet(f *runFlags, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("molt run", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Var(listFlag{&f.listen}, "listen", "`ADDR` to listen on, repeatable: host:port, [::1]:port, :port or unix:/path,\noptionally named NAME=ADDR (names default to l0, l1, ... in flag order); ADDR,blocking gives\nworkers the socket in blocking mode (docs/deploying.md) (default "+defaultListen+")")
	fs.StringVar(&f.socketMode, "socket-mode", "", "permission `MODE` of unix-socket listeners, in octal (e.g. 0660)")
	fs.IntVar(&f.workers, "workers", runtime.NumCPU(), "number of worker processes `N`")
	fs.StringVar(&f.pidFile, "pid-file", master.DefaultPIDFile, "pid file `PATH`; its lock is PATH.lock")
	fs.StringVar(&f.logFile, "log-file", "", "append molt's log to `PATH` (default: stderr); workers never get it (see --worker-log)")
	fs.StringVar(&f.workerLog, "worker-log", "", "append the workers' stdout and stderr to `PATH`, opened by the master, reopened by USR1\n(default: molt's own stdout and stderr, e.g. the journal; never the --log-file)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: trace, debug, info, warn or error")
	fs.BoolVar(&f.logJSON, "log-json", false, "log JSON lines")
	fs.StringVar(&f.ready, "ready", "notify", "when a worker counts as ready: `notify` (it sends READY=1) or delay:DUR\n(READY=1, or DUR after it started, whichever comes first)")
	fs.DurationVar(&f.readyTimeout, "ready-timeout", master.DefaultReadyTimeout, "a worker not ready within `DUR` is stopped and replaced")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", master.DefaultDrainTimeout, "a stopping worker still running after `DUR` is killed")
	fs.DurationVar(&f.watchdog, "watchdog", 0, "a ready worker that sends no WATCHDOG=1 for `DUR` is killed and replaced;\nworkers get WATCHDOG_USEC (molt's worker package pings by itself) (default: off)")
	fs.DurationVar(&f.lifetime, "max-worker-lifetime", 0, "recycle each worker `DUR` (less up to 10% at random) after it became ready:\na replacement starts, and the worker drains once it is ready (default: never)")
	fs.StringVar(&f.health, "health-check", "", "before a new worker counts as ready, the master sends it GET `PATH` on a private socket\n(MOLT_HEALTH_FD, served by molt's worker.ServeHTTP); not a 2xx: the worker is replaced,\nan upgrade rolled back (default: off)")
	fs.StringVar(&f.healthCmd, "health-check-cmd", "", "before a new worker counts as ready, run `CMD` with /bin/sh -c, as the workers' user,\nwith MOLT_WORKER_PID set; not exit 0: as --health-check (default: off)")
	fs.DurationVar(&f.healthTime, "health-check-timeout", master.DefaultHealthCheckTimeout, "a health check not passed within `DUR` fails")
	fs.StringVar(&f.stopSignal, "worker-stop-signal", "TERM", "`SIGNAL` that asks a worker to drain and exit")
	fs.DurationVar(&f.probation, "probation", master.DefaultProbation, "after an upgrade, the new generation serves alongside the old one for `DUR`\nbefore it commits; a failure during it rolls back")
	fs.DurationVar(&f.stableAfter, "stable-after", master.DefaultStableAfter, "once a master has served for `DUR` after its commit (or start), the keeper\nrestarts its release, not an older one, if every master dies")
	fs.StringVar(&f.configFile, "config", "", "read settings from the HCL file `FILE` (flags given here override it);\nre-read by every reload and every new master")
	fs.StringVar(&f.user, "user", "", "run workers as `USER` (name or uid; needs root); the master keeps its own")
	fs.StringVar(&f.group, "group", "", "run workers with `GROUP` (default: the user's primary group); needs --user")
	fs.BoolVar(&f.newPrivs, "allow-new-privs", false, "let workers gain privileges through exec (setuid or setgid programs, file\ncapabilities); by default they run with no_new_privs, which their children inherit")
	fs.StringVar(&f.chdir, "chdir", "", "workers' working `DIR` (the master never changes its own)")
	fs.Var(listFlag{&f.env}, "env", "`KEY=VALUE` added to the workers' environment, or KEY alone: molt's own value of KEY\n(none if unset); repeatable. Of molt's environment workers get only PATH, LANG,\nLANGUAGE, LC_*, TZ and the Go runtime's GOGC, GOMEMLIMIT, GOMAXPROCS, GODEBUG,\nGOTRACEBACK, GORACE, GOCOVERDIR, and HOME, USER, LOGNAME, SHELL of their user")
	fs.StringVar(&f.umask, "umask", "", "workers' umask, in octal (e.g. `0027`)")
	fs.IntVar(&f.backlog, "backlog", 0, "listen backlog `N` of every listener (default: the kernel's somaxconn)")
	fs.BoolVar(&f.noKeeper, "no-keeper", false, "no keeper process: the master is the process started (nginx's tree;\nits pid changes at every upgrade)")
	fs.StringVar(&f.control, "control-socket", "", "`PATH` of the control socket for molt ctl (default: molt.sock beside the pid file)")
	fs.StringVar(&f.maxErrorRate, "max-error-rate", "", "gate of the probation: the new generation's share of 5xx over the probation may exceed\nthe old one's over the same window by at most `PCT` percentage points (e.g. 1%), or it rolls back\n(default: off; docs/upgrades.md)")
	fs.Float64Var(&f.maxLatency, "max-latency-factor", 0, "gate of the probation: the new generation's p99 latency may be at most `F` times the\nold one's (e.g. 2), or it rolls back (default: off)")
	fs.IntVar(&f.minRequests, "min-requests", upgrade.DefaultMinRequests, "with a gate on, the probation extends (by at most "+upgrade.MaxGateWait.String()+") until the new generation\nhas served `N` requests; then the gates judge what there is, and none at all commits")
	fs.IntVar(&f.canary, "canary", 0, "the probation in two stages: first only `N` new workers serve beside all the old ones;\nonce the probation and the gates pass, the rest start, and the commit follows when all are\nready (default: off)")
	fs.StringVar(&f.metrics, "metrics-listen", "", "serve Prometheus metrics at http://`ADDR`/metrics (HOST:PORT; no authentication:\nbind it to loopback or a private address) (default: off)")
	fs.StringVar(&f.commit, "commit", "auto", "`MODE` of an upgrade's commit: auto (after the probation) or manual\n(QUIT to the old master commits, as with nginx)")
	fs.Usage = func() {
		fmt.Fprint(out, runUsage)
		fs.PrintDefaults()
	}
	return fs
}

// cmdRun is "molt run".
func cmdRun(args []string) int {
	var f runFlags
	fs := newRunFlagSet(&f, os.Stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	cfg, err := loadRunConfig(&f, fs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt run:", err)
		return exitUsage
	}
	var out io.Writer = os.Stderr
	var lf, wl *logFile
	if f.logFile != "" {
		lf, err = openLogFile(f.logFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "molt run:", err)
			return exitUsage
		}
		out = lf
	}
	if f.workerLog != "" {
		if wl, err = openWorkerLog(f.workerLog, lf); err != nil {
			fmt.Fprintln(os.Stderr, "molt run:", err)
			return exitUsage
		}
	}
	if lf != nil || wl != nil {
		cfg.Output = &outputs{log: lf, workers: wl}
	}
	log, err := newLogger(out, f.logLevel, f.logJSON)
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt run:", err)
		return exitUsage
	}
	cfg.Logger = log
	if lf != nil && lf.shared != "" {
		log.Warn("the log file's directory can be written by others: molt opens the file only if it is no symlink and belongs to root or molt's user",
			"event", "files.shared_dir", "path", lf.path, "reason", lf.shared)
	}
	if !f.noKeeper && os.Getenv(keeper.EnvKeeperPID) == "" {
		if wl != nil {
			_ = wl.f.Close() // opened to refuse a bad path here; each master opens its own
		}
		return runKeeper(log, lf)
	}
	// A reload reads the flags again (a config file, when there is one, is
	// read anew) and resolves COMMAND afresh.
	cfg.Reload = func() (master.Config, error) {
		var f2 runFlags
		fs2 := newRunFlagSet(&f2, io.Discard)
		if err := fs2.Parse(args); err != nil {
			return master.Config{}, err
		}
		return loadRunConfig(&f2, fs2)
	}
	cfg.Logger = withFault(cfg.Logger)
	supervisorGC()
	err = master.Run(context.Background(), cfg)
	if err == nil {
		return exitOK
	}
	var exitErr *master.ExitError
	if errors.As(err, &exitErr) {
		// A new master that gave up: the old generation serves on and
		// logs the rollback; this is not the operator's error to see.
		log.Warn("new master exits; the old generation keeps serving", "event", "master.gave_up", "code", exitErr.Code, "reason", exitErr.Reason)
		return exitErr.Code
	}
	log.Error("molt run failed", "event", "master.failed", "error", err)
	if f.logFile != "" { // the operator's terminal sees it too
		fmt.Fprintln(os.Stderr, "molt run:", err)
	}
	var bindErr *master.BindError
	var lockErr *master.LockedError
	switch {
	case errors.Is(err, master.ErrConfig):
		return exitUsage
	case errors.As(err, &bindErr):
		return exitBind
	case errors.As(err, &lockErr):
		return exitLocked
	}
	return exitFailure
}

// loadRunConfig applies the config file, if any, under the parsed flags
// and returns the master's configuration.
func loadRunConfig(f *runFlags, fs *flag.FlagSet) (master.Config, error) {
	command := fs.Args()
	if f.configFile != "" {
		fileCommand, err := applyConfigFile(f.configFile, fs)
		if err != nil {
			return master.Config{}, err
		}
		if len(command) == 0 {
			command = fileCommand
		}
	}
	return f.config(command)
}

// config turns the flags and the COMMAND into a master.Config; every
// error names the flag.
func (f *runFlags) config(command []string) (master.Config, error) {
	cfg := master.Config{
		Workers:       f.workers,
		PIDFile:       f.pidFile,
		ControlSocket: f.control,
		MetricsListen: f.metrics,
		Preflight:     []string{"version"},
		ReadyTimeout:  f.readyTimeout,
		DrainTimeout:  f.drainTimeout,
		Version:       version(),
	}
	if f.workers < 1 {
		return cfg, fmt.Errorf("--workers %d: want at least 1", f.workers)
	}
	if f.readyTimeout <= 0 || f.drainTimeout <= 0 || f.probation <= 0 || f.stableAfter <= 0 {
		return cfg, errors.New("--ready-timeout, --drain-timeout, --probation and --stable-after must be positive")
	}
	cfg.Probation = f.probation
	cfg.StableAfter = f.stableAfter
	if f.watchdog < 0 || f.watchdog > 0 && f.watchdog < 100*time.Millisecond {
		return cfg, fmt.Errorf("--watchdog %v: want at least 100ms (workers ping at half of it), or 0 for off", f.watchdog)
	}
	cfg.Watchdog = f.watchdog
	if f.lifetime < 0 || f.lifetime > 0 && f.lifetime < time.Second {
		return cfg, fmt.Errorf("--max-worker-lifetime %v: want at least 1s, or 0 for never", f.lifetime)
	}
	cfg.MaxWorkerLifetime = f.lifetime
	gates, err := f.gates()
	if err != nil {
		return cfg, err
	}
	cfg.Gates = gates
	if f.canary < 0 {
		return cfg, fmt.Errorf("--canary %d: want a number of workers, or 0 for off", f.canary)
	}
	cfg.Canary = f.canary
	if f.healthTime <= 0 {
		return cfg, fmt.Errorf("--health-check-timeout %v: want a positive duration", f.healthTime)
	}
	cfg.HealthCheck, cfg.HealthCheckCmd, cfg.HealthCheckTimeout = f.health, f.healthCmd, f.healthTime
	switch f.commit {
	case "auto":
	case "manual":
		cfg.ManualCommit = true
	default:
		return cfg, fmt.Errorf("--commit %q: want auto or manual", f.commit)
	}
	listen := f.listen
	if len(listen) == 0 {
		listen = []string{defaultListen}
	}
	specs, err := master.ParseListeners(listen)
	if err != nil {
		return cfg, fmt.Errorf("--listen: %w", err)
	}
	cfg.Listeners = specs
	if f.socketMode != "" {
		mode, err := parseOctalMode(f.socketMode)
		if err != nil {
			return cfg, fmt.Errorf("--socket-mode: %w", err)
		}
		cfg.SocketMode = os.FileMode(mode)
	}
	if cfg.ReadyDelay, err = parseReady(f.ready); err != nil {
		return cfg, err
	}
	if cfg.StopSignal, err = parseSignal(f.stopSignal); err != nil {
		return cfg, fmt.Errorf("--worker-stop-signal: %w", err)
	}
	if dir := filepath.Dir(f.pidFile); !isDir(dir) {
		return cfg, fmt.Errorf("--pid-file %s: directory %s does not exist", f.pidFile, dir)
	}
	if len(command) > 0 {
		path, err := resolveCommand(command[0])
		if err != nil {
			return cfg, err
		}
		cfg.Command, cfg.ExecPath = command, path
	} else {
		cfg.WorkerArgs = []string{os.Args[0], "worker", "demo"}
	}
	for _, kv := range f.env {
		k, _, ok := strings.Cut(kv, "=")
		if !validEnvName(k) {
			return cfg, fmt.Errorf("--env %q: want KEY=VALUE or KEY with a valid variable name", kv)
		}
		if !ok { // KEY alone: molt's own value, if it has one
			v, set := os.LookupEnv(k)
			if !set {
				continue
			}
			kv = k + "=" + v
		}
		cfg.Env = append(cfg.Env, kv)
	}
	cfg.AllowNewPrivileges = f.newPrivs
	if f.logJSON {
		cfg.Env = append(cfg.Env, envDemoLogJSON+"=1")
	}
	if f.user != "" || f.group != "" {
		if cfg.Credential, err = lookupCredential(f.user, f.group); err != nil {
			return cfg, err
		}
	}
	if f.chdir != "" {
		if !isDir(f.chdir) {
			return cfg, fmt.Errorf("--chdir %s: not a directory", f.chdir)
		}
		if cfg.WorkerDir, err = filepath.Abs(f.chdir); err != nil {
			return cfg, fmt.Errorf("--chdir: %w", err)
		}
	}
	if f.umask != "" {
		mask, err := parseOctalMode(f.umask)
		if err != nil {
			return cfg, fmt.Errorf("--umask: %w", err)
		}
		cfg.Umask = &mask
	}
	if f.backlog < 0 {
		return cfg, fmt.Errorf("--backlog %d: want a positive number (0: the kernel's default)", f.backlog)
	}
	cfg.Backlog = f.backlog
	return cfg, nil
}

// gates turns --max-error-rate, --max-latency-factor and --min-requests
// into the gates of a probation.
func (f *runFlags) gates() (upgrade.Gates, error) {
	var g upgrade.Gates
	if f.maxErrorRate != "" {
		p, err := parseRate(f.maxErrorRate)
		if err != nil {
			return g, fmt.Errorf("--max-error-rate: %w", err)
		}
		g.ErrorGate, g.MaxErrorRate = true, p
	}
	if f.maxLatency != 0 && !(f.maxLatency >= 1 && f.maxLatency <= 1000) {
		return g, fmt.Errorf("--max-latency-factor %v: want a factor from 1 to 1000, or 0 for off", f.maxLatency)
	}
	g.MaxLatencyFactor = f.maxLatency
	if f.minRequests < 0 {
		return g, fmt.Errorf("--min-requests %d: want 0 or more", f.minRequests)
	}
	g.MinRequests = uint64(f.minRequests)
	return g, nil
}

// parseRate parses a number of percentage points: "1%", "0.5", "0%".
func parseRate(v string) (float64, error) {
	p, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), "%"), 64)
	if err != nil || !(p >= 0 && p <= 100) {
		return 0, fmt.Errorf("%q: want percentage points from 0 to 100, e.g. 1%%", v)
	}
	return p, nil
}

// parseReady parses --ready: "notify" or "delay:DUR".
func parseReady(v string) (time.Duration, error) {
	if v == "notify" {
		return 0, nil
	}
	if d, ok := strings.CutPrefix(v, "delay:"); ok {
		dur, err := time.ParseDuration(d)
		if err == nil && dur > 0 {
			return dur, nil
		}
	}
	return 0, fmt.Errorf("--ready %q: want notify or delay:DUR (e.g. delay:2s)", v)
}

// parseSignal accepts TERM, SIGTERM, term, or a number.
func parseSignal(v string) (syscall.Signal, error) {
	name := strings.ToUpper(strings.TrimSpace(v))
	if n, err := strconv.Atoi(name); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	s := unix.SignalNum(name)
	if s == 0 {
		return 0, fmt.Errorf("unknown signal %q", v)
	}
	if s == syscall.SIGKILL || s == syscall.SIGSTOP {
		return 0, fmt.Errorf("%s cannot be caught, so workers could not drain", name)
	}
	return s, nil
}

// resolveCommand finds COMMAND as a shell would (PATH for a bare name) and
// resolves it to an absolute path without symlinks: this generation's
// later respawns run that file, never what PATH or a re-pointed symlink
// names after a deploy (a new master resolves afresh; DESIGN §4).
func resolveCommand(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("COMMAND %q: not found", name)
		}
		if errors.Is(err, os.ErrPermission) {
			return "", fmt.Errorf("COMMAND %q: not executable", name)
		}
		return "", fmt.Errorf("COMMAND %q: %w", name, err)
	}
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", fmt.Errorf("COMMAND %q: %w", name, err)
	}
	return abs, nil
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// parseOctalMode parses a permission or umask such as 0660.
func parseOctalMode(v string) (int, error) {
	mode, err := strconv.ParseUint(v, 8, 32)
	if err != nil || mode > 0o777 {
		return 0, fmt.Errorf("%q: want an octal permission such as 0660", v)
	}
	return int(mode), nil
}

// validEnvName accepts environment variable names: letters, digits and
// '_', not starting with a digit.
func validEnvName(k string) bool {
	if k == "" {
		return false
	}
	for i, c := range k {
		if !(c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// runKeeper makes this process the keeper, which starts the master as
// this same command line (argv[0] made absolute, symlinks kept).
func runKeeper(log hclog.Logger, lf *logFile) int {
	path, err := masterPath(os.Args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt run:", err)
		return exitUsage
	}
	// Sockets passed by socket activation go on to the first master with
	// the LISTEN_ variables (LISTEN_PID stays the keeper's: the master
	// accepts its keeper's); variables meant for another process do not.
	activated, err := master.ActivatedFDs()
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt run:", err)
		return exitUsage
	}
	drop := []string{"NOTIFY_SOCKET="}
	if activated == nil {
		drop = append(drop, "LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES=")
	}
	notify := os.Getenv("NOTIFY_SOCKET")
	var env []string
	for _, kv := range os.Environ() {
		if !hasAnyPrefix(kv, drop) {
			env = append(env, kv)
		}
	}
	cfg := keeper.Config{Path: path, Args: os.Args[1:], Env: env, Notify: notify, Logger: log, Activated: activated}
	if activated != nil {
		// Checked by ActivatedFDs: the same list, now with its names
		// (those of the keeper's own store in systemd's come back too).
		cfg.ActivatedNames, _ = worker.ActivationNames(func(pid int) bool { return pid == os.Getpid() })
	}
	if notify != "" {
		// systemd's fd store for the service (FileDescriptorStoreMax=):
		// the keeper keeps its stored sockets there too.
		cfg.FDStore = keeper.FDStoreFromEnv(os.Getenv("FDSTORE"))
	}
	if lf != nil {
		cfg.Reopen = lf.Reopen
		// The masters get the keeper's own stdout and stderr, never the
		// log file: their workers inherit those without a --worker-log.
		// Set, they also make the keeper tell this terminal when the
		// master fails before it serves (its error is in the log file).
		cfg.Stdout, cfg.Stderr = os.Stdout, os.Stderr
	}
	return keeper.Run(cfg)
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// masterPath is argv[0] as an absolute path, not resolved: a USR2 must
// find whatever a deploy put at that path (DESIGN §4).
func masterPath(arg0 string) (string, error) {
	if !strings.Contains(arg0, "/") {
		p, err := exec.LookPath(arg0)
		if err != nil {
			return "", fmt.Errorf("cannot find %s to start the master: %w", arg0, err)
		}
		arg0 = p
	}
	return filepath.Abs(arg0)
}

// masterGCPercent is the master's GOGC unless the operator sets GOGC.
// A master's live heap is small (about a megabyte) and what it allocates
// is a trickle (a metrics snapshot and the traffic figures each second),
// so with Go's default (100, whose heap goal never falls below 4 MB) its
// resident set creeps up by that goal before the first collection. At 25
// the goal is a quarter of that: collections come every several seconds
// at most and cost the master no measurable CPU (test/bench/RESULTS.md,
// "Memory" and the master's CPU ticks). Workers keep the environment's
// GOGC: this is the master's own setting, not passed on.
const masterGCPercent = 25

// supervisorGC applies masterGCPercent to this process (the master of
// "molt run"; not to an embedded master.Run, whose program decides).
func supervisorGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(masterGCPercent)
	}
}
