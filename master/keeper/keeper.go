// Package keeper is molt's stable process: the one pid that outlives every
// upgrade, for systemd (its main pid) and containers (PID 1).
//
// A fork+exec upgrade changes the master's pid: systemd would lose its main
// pid and a container whose PID 1 is the old master would die with it. The
// keeper starts the first master and never re-executes. It is a child
// subreaper, so every master it did not start itself (the new master of an
// upgrade, started by the old one) is re-parented to it when its parent
// exits, and it reaps every orphan, as PID 1 must.
//
// The keeper forwards; the masters decide. It knows nothing of
// generations: it learns which master is primary from their notify
// messages on its own NOTIFY_SOCKET (MAINPID=, READY=1, RELOADING=1,
// STOPPING=1, STATUS=, as systemd would, and MOLT_CONTROL_SOCKET=),
// forwards the operator's signals to that master, sends TERM and INT to
// every master it holds, turns QUIT into a request to the primary to stop
// every generation gracefully (over its control socket; SIGQUIT to it if
// that fails), relays a summary to systemd when it runs under it, and
// exits with the last master's exit status once no process of its tree is
// left. It also keeps a copy of every listening socket of the primary,
// pushed with systemd's fd-store protocol, and passes them on to
// systemd's own fd store when the service has one (fdstore.go). When no
// master is left after a death (not a stop), it starts a fresh one from
// the last registered exec spec with those sockets (resurrect.go).
package keeper

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/ctlclient"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/procfs"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// EnvKeeperPID tells a master which keeper it runs under (and that it must
// not become a keeper itself).
const EnvKeeperPID = "MOLT_KEEPER_PID"

// Config is what the keeper runs.
type Config struct {
	// Path is the master's argv[0]: absolute, symlinks not resolved, so
	// that a USR2 re-executes whatever is at that path then (DESIGN §4).
	Path string
	// Args are the master's arguments (argv[1:]).
	Args []string
	// Env is the master's environment, without NOTIFY_SOCKET (the keeper
	// sets its own).
	Env []string
	// Notify is systemd's NOTIFY_SOCKET, if the keeper runs under systemd.
	Notify string
	Logger hclog.Logger
	// Reopen, if not nil, reopens the keeper's log file (USR1, which the
	// master gets too).
	Reopen func() error
	// Stdout and Stderr are the master's (default: the keeper's).
	Stdout, Stderr *os.File
	// Activated are the descriptors socket activation passed to the
	// keeper (3, 4, ...). The first master gets them at the same numbers,
	// with LISTEN_PID (the keeper's pid), LISTEN_FDS and LISTEN_FDNAMES
	// left in Env; the keeper then closes its copies.
	Activated []int
	// ActivatedNames are their names (LISTEN_FDNAMES). Those named
	// StoredNamePrefix+<name> come from systemd's fd store, where the
	// keeper put them (FDStore): the keeper stores them again under
	// <name>, and the master adopts them as its own, not as activated.
	ActivatedNames []string
	// FDStore is the size of systemd's fd store for the service
	// ($FDSTORE, from FileDescriptorStoreMax=); 0: none, nothing is
	// forwarded there.
	FDStore int
}

// FieldControlSocket is the notify field with which a master tells its
// supervisor the absolute path of its control socket, beside MAINPID= and
// READY=1 (systemd ignores it).
const FieldControlSocket = "MOLT_CONTROL_SOCKET"

// StopAllRequest is the keeper's QUIT as a request to the primary master,
// on its control socket: stop every generation, gracefully.
const StopAllRequest = `{"cmd":"stop","all":true}`

// stopRequestTimeout bounds the stop request: connect, send, final reply.
const stopRequestTimeout = 10 * time.Second

// forwarded are the signals the keeper passes on to the primary master.
var forwarded = []os.Signal{
	syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGWINCH, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR1,
}

// stops are the signals that stop every generation.
var stops = []os.Signal{syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGINT}

// keeper is the state of the one loop in Run.
type keeper struct {
	cfg     Config
	log     hclog.Logger
	procs   procView
	sys     sysOps
	primary int // the master the operator's signals go to
	// control is the primary's control socket, from its
	// MOLT_CONTROL_SOCKET= ("" if it said none).
	control string
	// masters are the live masters it knows of, each held as a pidfd
	// opened once the pid was checked (and checked again after the
	// open): a signal sent through it reaches that process or none,
	// never one that reused its pid. Closed when the master is reaped.
	masters map[int]int
	// stopped gets the outcome of a stop request, sent by the goroutine
	// that made it (one at a time: room for one).
	stopped     chan stopResult
	requesting  bool          // a stop request is in flight
	stopTimeout time.Duration // bounds a stop request
	ready       bool          // READY=1 sent upstream once
	stopSent    bool          // STOPPING=1 sent upstream
	status      int           // exit code of the last master reaped
	// store holds a copy of every listening socket of the primary
	// (fdstore.go); fdRejected logs, throttled, what it refused.
	store      *fdStore
	fdRejected *notify.Rejected
	turns      int // turns of the loop, for tests
	// Resurrection (resurrect.go): the spec a fresh master is started
	// from, and the environment (Config.Env, NOTIFY_SOCKET, the keeper's
	// pid); a stop asked; the deaths within the window; the pending
	// start (nil: none), and what the operator sees of it.
	spec          execSpec
	env           []string
	stopAsked     bool
	deaths        []time.Time
	resurrectC    <-chan time.Time
	gaveUp        bool
	resurrections int
	reason        string
	now           func() time.Time
	after         func(time.Duration) <-chan time.Time
}

// sysOps is what the keeper asks of the kernel, a seam for tests.
type sysOps struct {
	pidfdOpen   func(pid int) (int, error)
	pidfdSignal func(fd int, sig syscall.Signal) error
	closeFD     func(fd int)
	// exitedElsewhere: the pidfd's process has exited and is not the
	// keeper's child (its parent reaped it or will).
	exitedElsewhere func(fd int) bool
	// wait is wait4(-1, WNOHANG).
	wait func() (int, unix.WaitStatus, error)
	// requestStop asks the master primary, on its control socket at
	// path, to stop every generation.
	requestStop func(path string, primary int, timeout time.Duration) error
	// openSpec opens the executable and reads the argv of the live
	// master pid, held by pidfd (resurrect.go).
	openSpec func(pid, pidfd int) (fd int, argv []string, err error)
	// startMaster starts a master afresh, fds at 3, 4, ...
	startMaster func(path string, argv, env []string, fds []int) (int, error)
}

// liveOps is the real kernel.
func liveOps() sysOps {
	return sysOps{
		pidfdOpen:   func(pid int) (int, error) { return unix.PidfdOpen(pid, 0) },
		pidfdSignal: func(fd int, sig syscall.Signal) error { return unix.PidfdSendSignal(fd, sig, nil, 0) },
		closeFD:     func(fd int) { _ = unix.Close(fd) },
		exitedElsewhere: func(fd int) bool {
			var info unix.Siginfo
			err := unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
			return errors.Is(err, unix.ECHILD) && exited(fd)
		},
		wait: func() (int, unix.WaitStatus, error) {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			return pid, ws, err
		},
		requestStop: requestStop,
		openSpec:    openSpec,
	}
}

// stopResult is the outcome of a stop request.
type stopResult struct {
	primary int
	path    string
	err     error
}

func newKeeper(cfg Config, procs procView, sys sysOps) *keeper {
	return &keeper{cfg: cfg, log: cfg.Logger.Named("keeper"), procs: procs, sys: sys, masters: map[int]int{},
		stopped: make(chan stopResult, 1), stopTimeout: stopRequestTimeout, store: newFDStore(FDStoreMax),
		spec: execSpec{fd: -1, argv: append([]string{cfg.Path}, cfg.Args...)}, now: time.Now, after: time.After}
}

// Run starts the first master and keeps it, and every master after it,
// until none is left. It returns the exit code for the keeper's process.
func Run(cfg Config) int {
	ops := liveOps()
	ops.startMaster = func(path string, argv, env []string, fds []int) (int, error) {
		return startFresh(path, argv, env, fds, cfg.Stdout, cfg.Stderr)
	}
	k := newKeeper(cfg, liveProcs(), ops)
	defer func() {
		for _, fd := range k.masters {
			k.sys.closeFD(fd)
		}
		k.store.closeAll()
		if k.spec.fd >= 0 {
			k.sys.closeFD(k.spec.fd)
		}
	}()
	// The first spec: the binary the first master runs, held open (a new
	// file at the path is a release not yet known to serve).
	if fd, err := openExec(cfg.Path); err == nil {
		k.spec.fd = fd
	} else {
		k.log.Warn("the master's executable not held; a fresh master would run the file at its path", "path", cfg.Path, "error", err)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		k.log.Error("cannot become a child subreaper", "error", err)
		return 1
	}
	// The notify socket is a path in a directory of the keeper's own
	// (0700; the socket 0600): only processes of the keeper's uid can
	// reach it at all, and of those the reader takes only masters.
	dir, err := notify.PrivateDir("molt-keeper-", 0o700)
	if err != nil {
		k.log.Error("cannot create the keeper's notify socket directory", "error", err)
		return 1
	}
	defer func() {
		if err := notify.RemoveDir(dir); err != nil {
			k.log.Warn("notify socket directory not removed", "path", dir, "error", err)
		}
	}()
	sock, err := notify.Listen(filepath.Join(dir, "notify"), 0o600, -1, -1)
	if err != nil {
		k.log.Error("cannot open the keeper's notify socket", "error", err)
		return 1
	}
	defer sock.Close()
	// Masters push their listening sockets (fdstore.go): the reader takes
	// a few descriptors per datagram, and closes those of anyone else.
	sock.AcceptFDs(fdsPerDatagram)
	rejected := notify.NewRejected(k.log, sock.Addr, notify.RejectedLogEvery)
	defer rejected.Close()
	k.fdRejected = notify.NewRejectedAs(k.log, sock.Addr, notify.RejectedLogEvery, "fd-store messages rejected; their descriptors closed",
		"event", "keeper.fdstore_rejected")
	defer k.fdRejected.Close()
	notices := make(chan notify.Msg, 64)
	done := make(chan struct{})
	defer close(done) // before the socket's close: the reader ends either way
	go k.readNotify(sock.Read, rejected.Add, k.fdRejected.Add, notices, done)

	sigC := make(chan os.Signal, 16)
	signal.Notify(sigC, append(append([]os.Signal{syscall.SIGCHLD}, forwarded...), stops...)...)
	defer signal.Stop(sigC)

	k.restoreStored(cfg.Activated, cfg.ActivatedNames)
	env := append(append([]string{}, cfg.Env...), "NOTIFY_SOCKET="+sock.Addr, EnvKeeperPID+"="+strconv.Itoa(os.Getpid()))
	k.env = listenEnvDropped(env)
	pid, err := startMaster(cfg, env)
	if err != nil {
		k.log.Error("cannot start the master", "path", cfg.Path, "error", err)
		return 1
	}
	k.primary = pid
	if fd, err := k.sys.pidfdOpen(pid); err == nil { // its child, not reaped: the pid is its own
		k.masters[pid] = fd
	} else {
		k.log.Error("cannot hold the master by a pidfd; it cannot be signalled", "pid", pid, "error", err)
	}
	k.log.Info("keeper started the master", "event", "keeper.started", "keeper_pid", os.Getpid(), "master_pid", pid)
	k.upstreamSend("STATUS=starting")
	code := k.loop(sigC, notices)
	if !k.ready && code != 0 && cfg.Stderr != nil {
		// The master's own error went to the log file; the operator's
		// terminal must learn that it failed.
		fmt.Fprintf(os.Stderr, "molt run: the master exited with status %d before it served; its error is in the log file\n", code)
	}
	return code
}

// loop handles signals, notices and stop results until no process is
// left; it returns the keeper's exit code.
func (k *keeper) loop(sigC <-chan os.Signal, notices <-chan notify.Msg) int {
	for {
		k.turns++
		select {
		case s := <-sigC:
			if s != syscall.SIGCHLD {
				k.onSignal(s)
			}
			// After a stop, a pending fresh master is cancelled: the
			// tree may be empty already.
			if (s == syscall.SIGCHLD || len(k.masters) == 0) && k.reap() && k.resurrectC == nil {
				return k.exit()
			}
		case <-k.resurrectC:
			k.resurrect()
			if len(k.masters) == 0 && k.resurrectC == nil && k.reap() {
				return k.exit()
			}
		case n, ok := <-notices:
			if !ok {
				// The reader has ended (it said why): no more notices,
				// and no turn of the loop for a closed channel.
				notices = nil
				continue
			}
			k.onNotice(n)
		case r := <-k.stopped:
			k.onStopResult(r)
		}
	}
}

// exit ends the loop: no process of the keeper's tree is left.
func (k *keeper) exit() int {
	k.log.Info("no master left; the keeper exits", "event", "keeper.exit", "status", k.status, "resurrections", k.resurrections)
	k.upstreamStopping("stopped")
	return k.status
}

// reap waits for every child that has exited, and reports whether none is
// left at all: then no master is left either (a new master is re-parented
// to the keeper before its parent's exit is reported).
func (k *keeper) reap() bool {
	for {
		pid, ws, err := k.sys.wait()
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ECHILD) {
			return true
		}
		if err != nil || pid <= 0 {
			return false
		}
		fd, ok := k.masters[pid]
		if !ok {
			k.log.Debug("orphan reaped", "pid", pid, "status", describe(ws))
			continue
		}
		k.sys.closeFD(fd)
		delete(k.masters, pid)
		k.status = exitCode(ws)
		k.log.Info("master exited", "event", "keeper.master_exited", "pid", pid, "status", describe(ws))
		k.dropExited()
		if pid == k.primary || k.primary == 0 {
			k.setPrimary(0, pid)
			for p := range k.masters {
				k.setPrimary(p, pid) // the other live master, if any
				break
			}
		}
		if len(k.masters) == 0 && k.resurrectC == nil && !k.gaveUp {
			k.lastMasterEnded(pid, ws)
		}
	}
}

// setPrimary makes pid the primary (0: none). The control socket was the
// previous primary's: the new one names its own.
func (k *keeper) setPrimary(pid, previous int) {
	if pid != k.primary {
		k.control = ""
	}
	k.primary = pid
	if pid != 0 {
		k.log.Info("primary master", "event", "keeper.primary", "pid", pid, "previous", previous)
	}
}

// exitCode is the shell's view of a wait status.
func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

func describe(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by signal: " + ws.Signal().String()
	}
	return "exit status " + strconv.Itoa(ws.ExitStatus())
}

// onSignal forwards an operator's signal.
func (k *keeper) onSignal(s os.Signal) {
	sig := s.(syscall.Signal)
	for _, st := range stops {
		if s == st {
			k.stop(sig)
			return
		}
	}
	if sig == syscall.SIGUSR1 && k.cfg.Reopen != nil {
		if err := k.cfg.Reopen(); err != nil {
			k.log.Error("log file not reopened", "error", err)
		}
	}
	if k.primary == 0 {
		k.log.Warn("signal not forwarded: no primary master known", "event", "keeper.signal_not_forwarded", "signal", unix.SignalName(sig))
		return
	}
	k.log.Info("forwarding signal to the primary master", "event", "keeper.signal_forwarded", "signal", unix.SignalName(sig), "pid", k.primary)
	if err := k.signal(k.primary, sig); err != nil {
		k.log.Warn("signal not forwarded", "event", "keeper.signal_not_forwarded", "signal", unix.SignalName(sig), "pid", k.primary, "error", err)
	}
}

// signal sends sig to a known master through its pidfd.
func (k *keeper) signal(pid int, sig syscall.Signal) error {
	fd, ok := k.masters[pid]
	if !ok {
		return fmt.Errorf("signal pid %d: not a master the keeper holds", pid)
	}
	if err := k.sys.pidfdSignal(fd, sig); err != nil {
		return fmt.Errorf("signal master %d: %w", pid, err)
	}
	return nil
}

// dropExited forgets masters that have exited but are not the keeper's
// to reap (a new master that died while its parent lived was reaped by
// the parent). The keeper's own children stay until reap has their
// status.
func (k *keeper) dropExited() {
	for pid, fd := range k.masters {
		if !k.sys.exitedElsewhere(fd) {
			continue
		}
		k.sys.closeFD(fd)
		delete(k.masters, pid)
		if pid == k.primary {
			k.setPrimary(0, pid)
		}
	}
}

// exited reports whether the process of a pidfd has exited.
func exited(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, _ := unix.Poll(fds, 0)
	return n > 0
}

// stop stops every generation. TERM and INT (a fast stop) go to every
// master the keeper holds: either one stops both generations. QUIT (a
// graceful stop) is a request to the primary, which the masters carry
// out between them: only they know whether an upgrade is in flight.
func (k *keeper) stop(sig syscall.Signal) {
	k.stopAsked = true
	if k.resurrectC != nil {
		k.resurrectC = nil
		k.log.Info("no master left; none started", "event", "keeper.no_resurrect", "reason", "a stop was asked")
	}
	k.upstreamStopping("stopping")
	k.log.Info("stopping every generation", "event", "keeper.stop", "signal", unix.SignalName(sig), "masters", len(k.masters), "primary", k.primary)
	if sig != syscall.SIGQUIT {
		for p := range k.masters {
			if err := k.signal(p, sig); err != nil {
				k.log.Warn("signal not sent", "event", "keeper.signal_not_forwarded", "signal", unix.SignalName(sig), "pid", p, "error", err)
			}
		}
		return
	}
	switch {
	case k.requesting:
		k.log.Info("graceful stop: a stop request is in flight already", "event", "keeper.stop_pending")
	case k.primary == 0:
		k.log.Warn("graceful stop: no primary master known; nothing to ask", "event", "keeper.stop_failed", "reason", "no primary master")
	case k.control == "":
		k.quitPrimary("the primary named no control socket")
	default:
		k.requesting = true
		path, primary, timeout, request := k.control, k.primary, k.stopTimeout, k.sys.requestStop
		k.log.Info("graceful stop: asking the primary master to stop every generation", "event", "keeper.stop_request", "pid", primary, "path", path)
		// Off the loop: a master slow to answer must not hold up the
		// operator's signals or the reaping.
		go func() {
			k.stopped <- stopResult{primary: primary, path: path, err: request(path, primary, timeout)}
		}()
	}
}

// onStopResult ends a stop request: the masters carry the stop out, or,
// if the primary could not be asked, it gets SIGQUIT.
func (k *keeper) onStopResult(r stopResult) {
	k.requesting = false
	if r.err == nil {
		k.log.Info("graceful stop: the primary master took the request", "event", "keeper.stop_requested", "pid", r.primary, "path", r.path)
		return
	}
	k.quitPrimary(fmt.Sprintf("stop request to master %d on %s: %v", r.primary, r.path, r.err))
}

// quitPrimary is the fallback of a graceful stop: QUIT to the primary.
func (k *keeper) quitPrimary(why string) {
	if k.primary == 0 {
		k.log.Warn("graceful stop: no primary master known; QUIT not sent", "event", "keeper.stop_failed", "reason", why)
		return
	}
	k.log.Warn("graceful stop: sending QUIT to the primary master instead", "event", "keeper.stop_fallback", "pid", k.primary, "reason", why)
	if err := k.signal(k.primary, syscall.SIGQUIT); err != nil {
		k.log.Warn("graceful stop: QUIT not sent", "event", "keeper.stop_failed", "pid", k.primary, "reason", err.Error())
	}
}

// requestStop sends StopAllRequest to the control socket at path, served
// by the master primary (SO_PEERCRED: root or the keeper's uid, and that
// very process), and waits, at most timeout in all, for its final reply.
func requestStop(path string, primary int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	conn, cred, err := ctlclient.Dial(path, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	if int(cred.Pid) != primary {
		return fmt.Errorf("the control socket %s is served by pid %d, not the primary master %d", path, cred.Pid, primary)
	}
	var refused error
	err = ctlclient.Exchange(conn, json.RawMessage(StopAllRequest), time.Until(deadline), func(line []byte) (bool, error) {
		var r struct {
			OK    bool   `json:"ok"`
			Done  bool   `json:"done"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return false, fmt.Errorf("bad reply: %w", err)
		}
		if r.Done && !r.OK {
			refused = fmt.Errorf("refused: %q", r.Error)
		}
		return r.Done, nil
	})
	if err != nil {
		return err
	}
	return refused
}

// readNotify reads the keeper's notify socket and passes on what masters
// send, until read fails (the socket is closed) or done is closed; then
// it closes notices. Every sender is checked here, before anything
// reaches the loop: a flood of strangers' datagrams costs a getsid each
// and a log line per interval, and never queues ahead of the operator's
// signals. Descriptors a stranger passes are closed here at once
// (rejectFDs logs them); those of a master go on to the loop, which
// keeps or closes them.
func (k *keeper) readNotify(read func() (notify.Msg, error), reject, rejectFDs func(pid int, why string), notices chan<- notify.Msg, done <-chan struct{}) {
	defer close(notices)
	for {
		n, err := read()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				k.log.Error("notify socket failed; masters can no longer report", "event", "keeper.notify_failed", "error", err)
			}
			return
		}
		ok, why := k.procs.isMaster(n.Pid)
		if ok && n.Err != nil {
			ok, why = false, n.Err.Error()
		}
		if !ok {
			if len(n.FDs) > 0 || n.FDsDiscarded {
				n.CloseFDs()
				rejectFDs(n.Pid, why)
			} else {
				reject(n.Pid, why)
			}
			continue
		}
		select {
		case notices <- n:
		case <-done:
			n.CloseFDs()
			return
		}
	}
}

// procView is what the keeper reads of the process table to tell its
// masters from everyone else; its functions are a seam for tests.
type procView struct {
	self, sid int                    // the keeper's pid and session
	getsid    func(int) (int, error) // getsid(2)
	parent    func(int) (int, bool)  // the parent pid, false once gone
	children  func(int) []int        // the live children of a pid
}

// liveProcs is the keeper's view of the real process table.
func liveProcs() procView {
	sid, _ := unix.Getsid(0)
	return procView{
		self: os.Getpid(), sid: sid, getsid: unix.Getsid,
		parent:   func(pid int) (int, bool) { p, _, ok := procfs.Parent(pid); return p, ok },
		children: procfs.Children,
	}
}

// isMaster tells a master of this keeper from every other process, by
// what a worker cannot have: masters stay in the keeper's session, while
// every worker starts in a session of its own (setsid) and no process can
// join another session. A pid or uid in a message proves nothing (workers
// may run as the masters' uid), so neither is looked at. The process must
// also be a descendant of the keeper: others may share its session (the
// shell that started it). Workers running as root are trusted: they
// could forge the credentials the kernel passes.
func (v procView) isMaster(pid int) (bool, string) {
	if pid <= 0 || pid == v.self {
		return false, "no sender credentials"
	}
	sid, err := v.getsid(pid)
	if err != nil {
		return false, "sender gone: " + err.Error()
	}
	if sid != v.sid {
		return false, fmt.Sprintf("sender in session %d, not the keeper's (%d): not a master", sid, v.sid)
	}
	p := pid
	for i := 0; i < 64 && p > 1 && p != v.self; i++ {
		ppid, ok := v.parent(p)
		if !ok {
			return false, "sender gone"
		}
		p = ppid
	}
	if p != v.self {
		return false, "sender not in the keeper's process tree"
	}
	return true, ""
}

// holdMaster registers pid as a master: it must be one (isMaster), and
// still be one once the pidfd is open, so that the pidfd holds the
// process that was checked and not one that reused its pid in between.
func (k *keeper) holdMaster(pid int) error {
	if _, ok := k.masters[pid]; ok {
		return nil
	}
	if ok, why := k.procs.isMaster(pid); !ok {
		return errors.New(why)
	}
	fd, err := k.sys.pidfdOpen(pid)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	if ok, why := k.procs.isMaster(pid); !ok {
		k.sys.closeFD(fd)
		return errors.New(why)
	}
	k.masters[pid] = fd
	return nil
}

// onNotice takes a master's message (readNotify checked the sender).
// The descriptors it carries are closed unless the store keeps them.
func (k *keeper) onNotice(n notify.Msg) {
	defer n.CloseFDs()
	msg := n.Fields
	if v, ok := msg.Get("MAINPID"); ok {
		// Only a master may be named: the sender itself, or a master the
		// keeper already holds.
		pid, err := strconv.Atoi(v)
		_, known := k.masters[pid]
		switch {
		case err != nil || pid <= 0:
			err = errors.New("not a pid")
		case pid != n.Pid && !known:
			err = errors.New("names neither the sender nor a master the keeper holds")
		default:
			err = k.holdMaster(pid)
		}
		if err != nil {
			k.log.Warn("MAINPID rejected", "event", "keeper.mainpid_rejected", "pid", n.Pid, "mainpid", v, "reason", err.Error())
		} else if pid != k.primary {
			k.setPrimary(pid, k.primary)
		}
	}
	if isFDStore(&n) {
		if n.Pid == k.primary {
			k.onFDStore(&n)
		} else {
			k.rejectFDs(&n, "not from the primary master")
		}
	}
	if n.Pid != k.primary {
		if _, ok := msg.Get(FieldControlSocket); ok {
			k.log.Warn(FieldControlSocket+" rejected", "event", "keeper.control_rejected", "pid", n.Pid, "reason", "not from the primary master")
		}
		return // an old master retiring, a new one not committed: not the service
	}
	if v, ok := msg.Get(FieldControlSocket); ok {
		if !filepath.IsAbs(v) {
			k.log.Warn(FieldControlSocket+" rejected", "event", "keeper.control_rejected", "pid", n.Pid, "path", v, "reason", "not an absolute path")
		} else if p := filepath.Clean(v); p != k.control {
			k.control = p
			k.log.Debug("the primary's control socket", "event", "keeper.control", "pid", n.Pid, "path", p)
		}
	}
	if msg.Is(FieldSpec, "1") {
		k.onSpec(n.Pid)
	}
	var up []string
	if msg.Is("RELOADING", "1") {
		// CLOCK_MONOTONIC is the machine's: the master's stamp holds.
		mono, _ := msg.Get("MONOTONIC_USEC")
		up = append(up, "RELOADING=1", "MONOTONIC_USEC="+mono)
	}
	if msg.Is("READY", "1") {
		up = append(up, "READY=1")
		if !k.ready {
			k.ready = true
			k.log.Info("the service is ready", "event", "keeper.ready", "master_pid", n.Pid)
		}
	}
	if msg.Is("STOPPING", "1") && !k.stopSent {
		k.stopSent = true
		up = append(up, "STOPPING=1")
	}
	if v, ok := msg.Get("STATUS"); ok {
		up = append(up, "STATUS="+v)
	}
	if len(up) > 0 {
		k.upstreamSend(up...)
	}
}

// upstreamStopping tells systemd, once, that the service stops.
func (k *keeper) upstreamStopping(status string) {
	if k.stopSent {
		k.upstreamSend("STATUS=" + status)
		return
	}
	k.stopSent = true
	k.upstreamSend("STOPPING=1", "STATUS="+status)
}

// upstreamSend relays a message to systemd, if the keeper runs under it,
// without waiting on it.
func (k *keeper) upstreamSend(lines ...string) {
	if k.cfg.Notify == "" {
		return
	}
	if err := worker.NotifyTo(k.cfg.Notify, strings.Join(lines, "\n")); err != nil {
		k.log.Warn("systemd notify socket: message not sent", "error", err)
	}
}

func orStd(f, std *os.File) *os.File {
	if f != nil {
		return f
	}
	return std
}

// startMaster starts the first master with raw descriptors (DESIGN §4:
// an *os.File's Fd would switch a passed socket to blocking mode): stdin,
// stdout, stderr, then the activated sockets at their own numbers, which
// the keeper closes once the master holds them. The master is reaped with
// wait4 in reap, as every other child.
func startMaster(cfg Config, env []string) (int, error) {
	fds := []uintptr{os.Stdin.Fd(), orStd(cfg.Stdout, os.Stdout).Fd(), orStd(cfg.Stderr, os.Stderr).Fd()}
	for i, fd := range cfg.Activated {
		if fd != worker.ListenFDsStart+i {
			return 0, fmt.Errorf("activated descriptor %d is not at position %d", fd, worker.ListenFDsStart+i)
		}
		fds = append(fds, uintptr(fd))
	}
	pid, _, err := syscall.StartProcess(cfg.Path, append([]string{cfg.Path}, cfg.Args...), &syscall.ProcAttr{Env: env, Files: fds})
	runtime.KeepAlive(cfg.Stdout)
	runtime.KeepAlive(cfg.Stderr)
	for _, fd := range cfg.Activated {
		_ = unix.Close(fd)
	}
	return pid, err
}
