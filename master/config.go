package master

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/upgrade"
)

// Defaults of the settings in Config.
const (
	DefaultReadyTimeout = 30 * time.Second
	DefaultDrainTimeout = 30 * time.Second
	DefaultPIDFile      = "molt.pid"
	DefaultProbation    = 10 * time.Second
	DefaultStableAfter  = keeper.SpecAfter
	// DefaultHealthCheckTimeout bounds each health check (health.go).
	DefaultHealthCheckTimeout = 5 * time.Second
	// DefaultControlSocket is the control socket's name, beside the pid file.
	DefaultControlSocket = "molt.sock"
)

// ErrConfig is wrapped by every error Run returns for a configuration it
// refuses before starting anything.
var ErrConfig = errors.New("invalid configuration")

// Config describes one master and its workers.
type Config struct {
	// Listeners are the sockets to open (or inherit), in order: workers get
	// them at fds 3.. in this order. At least one is required.
	Listeners []ListenSpec
	// SocketMode, if not zero, is the permission of unix-socket listeners.
	SocketMode os.FileMode
	// Workers is the number of worker processes (>= 1).
	Workers int
	// Command is the argv of the app a worker runs, started through molt's
	// exec trampoline so that LISTEN_PID is the worker's own pid. Empty
	// means the master's own binary, re-executed with WorkerArgs; that
	// process must call RunChild first thing.
	Command []string
	// ExecPath is the file Command runs: an absolute path, resolved once
	// when the master starts (symlinks too), so that this generation's
	// respawns run what it started with after a deploy re-pointed a
	// symlink (DESIGN §4). Empty means Command[0], which must then be
	// absolute.
	ExecPath string
	// WorkerArgs is the argv of self-executed workers (Command empty).
	// Empty means the master's own os.Args.
	WorkerArgs []string
	// Env is added to every worker's environment (KEY=VALUE). Of the
	// master's own environment workers get only PATH, LANG, LANGUAGE,
	// LC_*, TZ and the Go runtime's GOGC, GOMEMLIMIT, GOMAXPROCS, GODEBUG,
	// GOTRACEBACK, GORACE and GOCOVERDIR; and HOME, USER, LOGNAME and
	// SHELL of the user they run as (Credential's passwd entry, or the
	// master's own values). Env replaces any of those of the same name;
	// the protocol's variables (LISTEN_*, NOTIFY_SOCKET, MOLT_*) replace
	// Env's.
	Env []string
	// Credential, if not nil, is the user and groups workers run as (the
	// master keeps its own: it binds the sockets, Apache's model). Needs root.
	Credential *syscall.Credential
	// AllowNewPrivileges lets workers gain privileges through exec
	// (setuid and setgid programs, file capabilities). By default every
	// worker runs with PR_SET_NO_NEW_PRIVS (RunChild sets it), which its
	// children inherit.
	AllowNewPrivileges bool
	// WorkerDir, if not empty, is the workers' working directory. The
	// master never changes its own (tableflip re-executes relative to it).
	WorkerDir string
	// Umask, if not nil, is the workers' umask.
	Umask *int
	// Backlog, if not zero, is the listen backlog of every listener.
	Backlog int

	// MetricsListen, if not empty, is the HOST:PORT where the master
	// serves Prometheus metrics at /metrics (--metrics-listen). It has no
	// authentication: bind it to loopback or a private address.
	MetricsListen string

	// PIDFile is the master's pid file; its lock file is PIDFile+".lock".
	PIDFile string
	// ControlSocket is the path of the control socket; default molt.sock
	// beside the pid file.
	ControlSocket string
	// ReadyTimeout bounds how long a new worker may take to become ready.
	ReadyTimeout time.Duration
	// DrainTimeout bounds a worker's graceful stop; then it is killed.
	DrainTimeout time.Duration
	// StopSignal asks a worker to drain and exit (default SIGTERM).
	StopSignal syscall.Signal
	// Probation is how long a new generation serves alongside the old one
	// before it commits (DESIGN §4).
	Probation time.Duration
	// StableAfter is how long a primary serves after its commit (or its
	// start) before it registers its exec spec with the keeper, which
	// starts a fresh master from the last registered one if every master
	// dies (default DefaultStableAfter).
	StableAfter time.Duration
	// ManualCommit makes a new generation wait after its probation for the
	// operator's QUIT to the old master (nginx's flow) instead of
	// committing by itself.
	ManualCommit bool
	// Gates judge a new generation's probation by its traffic against
	// the old one's (docs/upgrades.md, "Gates"); the zero value judges
	// nothing.
	Gates upgrade.Gates
	// Canary, if not zero, makes a new generation's probation two-staged:
	// only Canary workers serve at first, the rest once it passed.
	Canary int
	// ReadyDelay, if not zero, makes a worker that never sends READY=1
	// count as ready this long after it started (--ready=delay:DUR).
	ReadyDelay time.Duration
	// Watchdog, if not zero, is passed to workers as WATCHDOG_USEC: a ready
	// worker that sends no WATCHDOG=1 for this long is killed (SIGKILL)
	// and replaced (--watchdog).
	Watchdog time.Duration
	// MaxWorkerLifetime, if not zero, recycles every worker this long
	// (less up to a tenth, at random) after it became ready: a
	// replacement starts, and once it is ready the worker drains.
	MaxWorkerLifetime time.Duration
	// HealthCheck, if not empty, is the path of an HTTP GET the master
	// sends every new worker, once it is ready, on a private socket pair
	// it passes as MOLT_HEALTH_FD (the worker package's ServeHTTP answers
	// it with the app's handler): a worker counts as ready only once the
	// answer is a 2xx (health.go).
	HealthCheck string
	// HealthCheckCmd, if not empty, is run with /bin/sh -c for every new
	// worker once it is ready, as the workers' user, with MOLT_WORKER_PID
	// set: a worker counts as ready only once it exits 0 (after the
	// HealthCheck GET, if both are set).
	HealthCheckCmd string
	// HealthCheckTimeout bounds each check (default
	// DefaultHealthCheckTimeout).
	HealthCheckTimeout time.Duration

	// Logger receives the master's log; nil discards it.
	Logger hclog.Logger
	// Output gives workers their stdout and stderr and reopens the log
	// files on USR1; nil means workers share the master's stdout and
	// stderr. A worker can write to, and truncate, whatever it gets: never
	// give it the master's log file.
	Output Output
	// Version is reported in logs and to workers.
	Version string
	// Preflight, if not empty, is run as "NEW-BINARY Preflight..." (bounded)
	// before every upgrade; if it fails, the upgrade is refused and nothing
	// changes. molt run uses "version".
	Preflight []string
	// Reload returns the configuration a reload (HUP, molt ctl reload)
	// applies: read anew, e.g. from a config file, with COMMAND resolved
	// afresh. Nil reloads the running configuration, which restarts the
	// workers. PIDFile, ControlSocket, Logger, Output and Version are not
	// reloadable: the running master's stay.
	Reload func() (Config, error)
}

// minWatchdog is the shortest watchdog: a process on a loaded machine must
// be able to ping at half of it without being killed for a scheduling
// hiccup.
const minWatchdog = 100 * time.Millisecond

// Output is where workers write and what USR1 reopens.
type Output interface {
	// Files returns the files a worker started now gets as fds 1 and 2.
	Files() (stdout, stderr *os.File)
	// Reopen reopens the log files (the master's, the workers') at their
	// paths (after rotation).
	Reopen() error
}

// withDefaults returns c with zero settings replaced by their defaults.
func (c Config) withDefaults() Config {
	if c.PIDFile == "" {
		c.PIDFile = DefaultPIDFile
	}
	if c.ControlSocket == "" {
		c.ControlSocket = filepath.Join(filepath.Dir(c.PIDFile), DefaultControlSocket)
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = DefaultReadyTimeout
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.Probation == 0 {
		c.Probation = DefaultProbation
	}
	if c.StableAfter == 0 {
		c.StableAfter = DefaultStableAfter
	}
	if c.StopSignal == 0 {
		c.StopSignal = syscall.SIGTERM
	}
	if c.HealthCheckTimeout == 0 {
		c.HealthCheckTimeout = DefaultHealthCheckTimeout
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c
}

// Check validates c as Run would before starting anything (defaults
// applied): nothing is bound or started. Errors wrap ErrConfig.
func (c Config) Check() error { return c.withDefaults().validate() }

// validate checks everything that can be checked before starting: each
// error says which setting is wrong and wraps ErrConfig.
func (c Config) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, a...))
	}
	if len(c.Listeners) == 0 {
		return bad("no listener: give at least one --listen")
	}
	if err := validMetricsAddr(c.MetricsListen); err != nil {
		return bad("%v", err)
	}
	if c.Workers < 1 {
		return bad("workers must be at least 1, not %d", c.Workers)
	}
	if c.ReadyTimeout < 0 || c.DrainTimeout < 0 || c.ReadyDelay < 0 || c.Probation < 0 || c.StableAfter < 0 || c.Watchdog < 0 || c.MaxWorkerLifetime < 0 || c.HealthCheckTimeout < 0 {
		return bad("timeouts must not be negative")
	}
	if c.Watchdog > 0 && c.Watchdog < minWatchdog {
		return bad("watchdog %v is too short: at least %v (workers ping at half of it)", c.Watchdog, minWatchdog)
	}
	switch c.StopSignal {
	case syscall.SIGKILL, syscall.SIGSTOP:
		return bad("worker stop signal %v cannot be caught: workers could not drain", c.StopSignal)
	}
	if len(c.Command) > 0 {
		if err := checkExecutable(c.execPath()); err != nil {
			return bad("%v", err)
		}
	}
	if c.Credential != nil && os.Geteuid() != 0 {
		return bad("running workers as another user needs root; molt runs as uid %d", os.Geteuid())
	}
	if c.WorkerDir != "" {
		if fi, err := os.Stat(c.WorkerDir); err != nil || !fi.IsDir() {
			return bad("workers' directory %s does not exist", c.WorkerDir)
		}
	}
	if c.Umask != nil && (*c.Umask < 0 || *c.Umask > 0o777) {
		return bad("umask %#o out of range", *c.Umask)
	}
	if err := checkHealthPath(c.HealthCheck); err != nil {
		return bad("%v", err)
	}
	if strings.ContainsRune(c.HealthCheckCmd, 0) {
		return bad("health check command: contains a NUL byte")
	}
	if c.Backlog < 0 {
		return bad("backlog must not be negative")
	}
	dir := filepath.Dir(c.PIDFile)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return bad("pid-file directory %s does not exist", dir)
	}
	return nil
}

// checkExecutable verifies that path is an absolute path to an executable
// regular file.
func checkExecutable(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("command %q: not an absolute path", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("command %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("command %s: not a regular file", path)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("command %s: not executable (mode %v)", path, fi.Mode().Perm())
	}
	return nil
}

// execPath is the file exec workers run.
func (c Config) execPath() string {
	if c.ExecPath != "" {
		return c.ExecPath
	}
	return c.Command[0]
}
