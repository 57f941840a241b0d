package master

import (
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/worker"
)

// workerSpec is how a set of workers starts: the listeners they get and
// the settings of the configuration they were started under. A reload
// starts new workers with a new spec while the old ones finish with theirs.
type workerSpec struct {
	listeners    []*listener
	command      []string // exec workers' argv; empty: this binary
	execPath     string
	workerArgs   []string // self-executed workers' argv
	env          []string // the master's variables, identity and Config.Env (workerEnv)
	newPrivs     bool     // Config.AllowNewPrivileges
	stopSignal   syscall.Signal
	drainTimeout time.Duration
	readyTimeout time.Duration
	readyDelay   time.Duration
	watchdog     time.Duration
	lifetime     time.Duration
	credential   *syscall.Credential
	dir          string
	umask        *int
	health       healthSpec
}

// newSpec takes the worker settings of cfg, with listeners ls.
func newSpec(cfg Config, ls []*listener) *workerSpec {
	sp := &workerSpec{
		listeners: ls, command: cfg.Command, workerArgs: cfg.WorkerArgs,
		env: withGOMAXPROCS(workerEnv(os.Environ(), cfg.Credential, cfg.Env), runtime.NumCPU(), cfg.Workers), newPrivs: cfg.AllowNewPrivileges,
		stopSignal: cfg.StopSignal, drainTimeout: cfg.DrainTimeout,
		readyTimeout: cfg.ReadyTimeout, readyDelay: cfg.ReadyDelay, watchdog: cfg.Watchdog, lifetime: cfg.MaxWorkerLifetime,
		credential: cfg.Credential, dir: cfg.WorkerDir, umask: cfg.Umask,
		health: healthSpec{path: cfg.HealthCheck, cmd: cfg.HealthCheckCmd, timeout: cfg.HealthCheckTimeout},
	}
	if len(cfg.Command) > 0 {
		sp.execPath = cfg.execPath()
	}
	return sp
}

// defaultGOMAXPROCS is the GOMAXPROCS a worker gets where the user set
// none: the CPUs molt may run on (its affinity mask, as runtime.NumCPU
// counts them) shared out among the configured workers, at least 1. Go's
// own default, every CPU in each of N workers, has N times as many
// runnable threads as cores competing under load.
func defaultGOMAXPROCS(cpus, workers int) int {
	if workers < 1 {
		workers = 1
	}
	return max(1, cpus/workers)
}

// withGOMAXPROCS adds GOMAXPROCS=defaultGOMAXPROCS(cpus, workers) to env,
// a worker environment (workerEnv), unless it already sets GOMAXPROCS:
// from molt's own environment or from Config.Env, which win.
func withGOMAXPROCS(env []string, cpus, workers int) []string {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == "GOMAXPROCS" {
			return env
		}
	}
	return append(env, "GOMAXPROCS="+strconv.Itoa(defaultGOMAXPROCS(cpus, workers)))
}

// startWorker forks the worker of slot s with the protocol's fds and
// environment (DESIGN §2; README "The worker protocol").
func (m *Master) startWorker(s *slot) (*proc, error) {
	sp := s.spec
	stdout, stderr := os.Stdout, os.Stderr
	if m.cfg.Output != nil {
		stdout, stderr = m.cfg.Output.Files()
	}
	files := []*os.File{m.devNull, stdout, stderr}
	names := make([]string, len(sp.listeners))
	for i, l := range sp.listeners {
		files = append(files, l.file)
		names[i] = l.spec.Name
	}
	parentFD := len(files)
	files = append(files, m.parentR)
	sock, err := m.workerNotifySocket(sp)
	if err != nil {
		return nil, err
	}
	var balanceEnv []string
	entry, hasEntry := 0, false
	if m.accept != nil {
		entry, hasEntry = m.accept.take()
	}
	if hasEntry {
		balanceEnv = []string{
			worker.EnvAcceptTable + "=" + strconv.Itoa(len(files)),
			worker.EnvAcceptEntry + "=" + strconv.Itoa(entry),
		}
		files = append(files, m.accept.f)
		// A canary also gets the old generation's table, read-only
		// (accepttable.go, shareAcceptTable).
		if m.peerAccept != nil && m.new != nil && m.new.CanaryStage() {
			balanceEnv = append(balanceEnv, worker.EnvAcceptPeerTable+"="+strconv.Itoa(len(files)))
			files = append(files, m.peerAccept)
		}
	}
	// The health socket: after every other fd, announced by its own
	// variable, never in LISTEN_FDS (health.go).
	var healthConn net.Conn
	var healthEnv []string
	if sp.health.path != "" {
		c, theirs, err := healthPair()
		if err != nil {
			if hasEntry {
				m.accept.release(entry)
			}
			dropNotifySocket(m.log, sock)
			return nil, err
		}
		defer theirs.Close() // the worker's copy is all it needs
		healthConn = c
		healthEnv = []string{worker.EnvHealthFD + "=" + strconv.Itoa(len(files))}
		files = append(files, theirs)
	}
	env := []string{
		worker.EnvListenFDs + "=" + strconv.Itoa(len(sp.listeners)),
		worker.EnvListenFDNames + "=" + strings.Join(names, ":"),
		worker.EnvNotifySocket + "=" + sock.Addr,
		worker.EnvMasterPID + "=" + strconv.Itoa(os.Getpid()),
		worker.EnvWorker + "=" + strconv.Itoa(s.n),
		worker.EnvStopSignal + "=" + signalName(sp.stopSignal),
		worker.EnvDrainTimeout + "=" + sp.drainTimeout.String(),
		worker.EnvParentFD + "=" + strconv.Itoa(parentFD),
	}
	env = append(env, balanceEnv...)
	env = append(env, healthEnv...)
	argv := sp.workerArgs
	if len(argv) == 0 {
		argv = os.Args
	}
	if len(sp.command) > 0 {
		argv = sp.command
		env = append(env, envRole+"="+roleExec, envExecPath+"="+sp.execPath)
	} else {
		env = append(env, envRole+"="+roleWorker)
	}
	if sp.watchdog > 0 {
		// WATCHDOG_PID is set by the child itself (RunChild), as LISTEN_PID.
		env = append(env, worker.EnvWatchdogUSec+"="+strconv.FormatInt(sp.watchdog.Microseconds(), 10))
	}
	if sp.umask != nil {
		env = append(env, envUmask+"="+strconv.FormatInt(int64(*sp.umask), 8))
	}
	if sp.newPrivs {
		env = append(env, envNewPrivs+"=allow")
	}
	env = mergeEnv(sp.env, env)
	sp2, err := m.spawnerFor(sp.newPrivs)
	if err != nil {
		if hasEntry {
			m.accept.release(entry)
		}
		dropNotifySocket(m.log, sock)
		closeConn(healthConn)
		return nil, err
	}
	p, err := sp2.start(spawnRequest{
		path: selfExe, argv: argv, env: env, files: files, pdeathsig: sp.stopSignal,
		dir: sp.dir, credential: sp.credential,
	})
	if err != nil {
		if hasEntry {
			m.accept.release(entry)
		}
		dropNotifySocket(m.log, sock)
		closeConn(healthConn)
		return nil, err
	}
	go m.readNotify(m.log, sock, p.Pid)
	pr := &proc{pid: p.Pid, p: p, s: s, slot: s.n, spec: sp, started: time.Now(), notify: sock, health: healthConn}
	if hasEntry {
		pr.entry = entry + 1
	}
	return pr, nil
}

// closeConn closes c if there is one.
func closeConn(c net.Conn) {
	if c != nil {
		_ = c.Close()
	}
}
