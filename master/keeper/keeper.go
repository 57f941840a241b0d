// Package keeper is molt's stable process: the one pid that outlives every
// upgrade, for systemd (its main pid) and containers (PID 1).
//
// A fork+exec upgrade changes the master's pid: systemd would lose its main
// pid and a container whose PID 1 is the old master would die with it. The
// keeper starts the first master and never re-executes. It is a child
// subreaper, so every master it did not start itself (the new master of an
// upgrade, started by the old one) is re-parented to it when its parent
// exits, and it reaps every orphan, as PID 1 must. It learns which master is
// primary from their notify messages on its own NOTIFY_SOCKET (MAINPID=,
// READY=1, RELOADING=1, STOPPING=1, STATUS=, as systemd would), forwards the
// operator's signals to that master, relays a summary to systemd when it
// runs under it, and exits with the last master's exit status once no
// process of its tree is left.
package keeper

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"
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
}

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
	primary int // the master the operator's signals go to
	// masters are the live masters it knows of, each held as a pidfd
	// opened once the pid was checked (and checked again after the
	// open): a signal sent through it reaches that process or none,
	// never one that reused its pid. Closed when the master is reaped.
	masters  map[int]int
	ready    bool         // READY=1 sent upstream once
	stopping os.Signal    // the stop signal received, if any
	quitSent map[int]bool // masters sent QUIT by a graceful stop
	stopSent bool         // STOPPING=1 sent upstream
	status   int          // exit code of the last master reaped
}

// Run starts the first master and keeps it, and every master after it,
// until none is left. It returns the exit code for the keeper's process.
func Run(cfg Config) int {
	k := &keeper{cfg: cfg, log: cfg.Logger.Named("keeper"), procs: liveProcs(), masters: map[int]int{}, quitSent: map[int]bool{}}
	defer func() {
		for _, fd := range k.masters {
			_ = unix.Close(fd)
		}
	}()
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
	rejected := notify.NewRejected(k.log, sock.Addr, notify.RejectedLogEvery)
	defer rejected.Close()
	notices := make(chan notify.Msg, 64)
	go k.readNotify(sock, rejected, notices)

	sigC := make(chan os.Signal, 16)
	signal.Notify(sigC, append(append([]os.Signal{syscall.SIGCHLD}, forwarded...), stops...)...)
	defer signal.Stop(sigC)

	env := append(append([]string{}, cfg.Env...), "NOTIFY_SOCKET="+sock.Addr, EnvKeeperPID+"="+strconv.Itoa(os.Getpid()))
	pid, err := startMaster(cfg, env)
	if err != nil {
		k.log.Error("cannot start the master", "path", cfg.Path, "error", err)
		return 1
	}
	k.primary = pid
	if fd, err := unix.PidfdOpen(pid, 0); err == nil { // its child, not reaped: the pid is its own
		k.masters[pid] = fd
	} else {
		k.log.Error("cannot hold the master by a pidfd; it cannot be signalled", "pid", pid, "error", err)
	}
	k.log.Info("keeper started the master", "keeper_pid", os.Getpid(), "master_pid", pid)
	k.upstreamSend("STATUS=starting")

	for {
		select {
		case s := <-sigC:
			if s == syscall.SIGCHLD {
				if k.reap() {
					k.log.Info("no master left; the keeper exits", "status", k.status)
					k.upstreamStopping("stopped")
					if !k.ready && k.status != 0 && cfg.Stderr != nil {
						// The master's own error went to the log file; the
						// operator's terminal must learn that it failed.
						fmt.Fprintf(os.Stderr, "molt run: the master exited with status %d before it served; its error is in the log file\n", k.status)
					}
					return k.status
				}
				continue
			}
			k.onSignal(s)
		case n := <-notices:
			k.onNotice(n)
		}
	}
}

// reap waits for every child that has exited, and reports whether none is
// left at all: then no master is left either (a new master is re-parented
// to the keeper before its parent's exit is reported).
func (k *keeper) reap() bool {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ECHILD) {
			return true
		}
		if err != nil || pid <= 0 {
			return false
		}
		code := exitCode(ws)
		if fd, ok := k.masters[pid]; ok {
			_ = unix.Close(fd)
			delete(k.masters, pid)
			k.status = code
			k.log.Info("master exited", "pid", pid, "status", describe(ws))
			k.dropExited()
			if pid == k.primary {
				k.primary = 0
				for p := range k.masters {
					k.primary = p // the other live master, if any
				}
				if k.primary != 0 {
					k.log.Info("primary master", "event", "keeper.primary", "pid", k.primary, "previous", pid)
				}
			}
			k.continueStop(false)
		} else {
			k.log.Debug("orphan reaped", "pid", pid, "status", describe(ws))
		}
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
	if k.primary == 0 {
		k.log.Warn("signal not forwarded: no primary master known", "signal", unix.SignalName(sig))
		return
	}
	if sig == syscall.SIGUSR1 && k.cfg.Reopen != nil {
		if err := k.cfg.Reopen(); err != nil {
			k.log.Error("log file not reopened", "error", err)
		}
	}
	k.log.Info("forwarding signal to the primary master", "event", "keeper.signal_forwarded", "signal", unix.SignalName(sig), "pid", k.primary)
	if err := k.signal(k.primary, sig); err != nil {
		k.log.Warn("signal not forwarded", "signal", unix.SignalName(sig), "pid", k.primary, "error", err)
	}
}

// signal sends sig to a known master through its pidfd.
func (k *keeper) signal(pid int, sig syscall.Signal) error {
	fd, ok := k.masters[pid]
	if !ok {
		return fmt.Errorf("signal pid %d: not a master the keeper holds", pid)
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		return fmt.Errorf("signal master %d: %w", pid, err)
	}
	return nil
}

// signalChild sends sig to c, a new master found by uncommittedChild,
// through a pidfd opened and then checked to be still the primary's
// child: never to a process that reused c's pid.
func (k *keeper) signalChild(c int, sig syscall.Signal) {
	fd, err := unix.PidfdOpen(c, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if ppid, _, ok := procfs.Parent(c); !ok || ppid != k.primary {
		return
	}
	_ = unix.PidfdSendSignal(fd, sig, nil, 0)
}

// dropExited forgets masters that have exited but are not the keeper's
// to reap (a new master that died while its parent lived was reaped by
// the parent). The keeper's own children stay until reap has their
// status.
func (k *keeper) dropExited() {
	for pid, fd := range k.masters {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if !errors.Is(err, unix.ECHILD) || !exited(fd) {
			continue
		}
		_ = unix.Close(fd)
		delete(k.masters, pid)
		if pid == k.primary {
			k.primary = 0
		}
	}
}

// exited reports whether the process of a pidfd has exited.
func exited(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, _ := unix.Poll(fds, 0)
	return n > 0
}

// stop stops every live generation. TERM and INT (a fast stop) go to every
// master: either one stops both. QUIT (graceful) is sequenced by
// continueStop.
func (k *keeper) stop(sig syscall.Signal) {
	k.upstreamStopping("stopping")
	k.stopping = sig
	k.log.Info("stopping every generation", "signal", unix.SignalName(sig), "masters", len(k.masters))
	if sig != syscall.SIGQUIT {
		for p := range k.masters {
			_ = k.signal(p, sig)
		}
		if c := k.uncommittedChild(); c != 0 {
			k.signalChild(c, sig)
		}
		return
	}
	k.continueStop(false)
}

// continueStop moves a graceful stop on. QUIT to an old master whose
// upgrade is in flight would commit the upgrade, so a new master not yet
// committed gets QUIT first (it aborts; the old master rolls back and says
// READY=1: rolledBack), then the primary. A master that becomes primary
// later (an upgrade that was already committing) gets its QUIT too.
func (k *keeper) continueStop(rolledBack bool) {
	if k.stopping != syscall.SIGQUIT {
		return
	}
	if c := k.uncommittedChild(); c != 0 {
		if !k.quitSent[c] {
			k.quitSent[c] = true
			k.log.Info("graceful stop: aborting the upgrade in flight first", "new_pid", c)
			k.signalChild(c, syscall.SIGQUIT)
			return
		}
		if !rolledBack {
			return
		}
	}
	if p := k.primary; p != 0 && !k.quitSent[p] {
		k.quitSent[p] = true
		if err := k.signal(p, syscall.SIGQUIT); err != nil {
			k.log.Warn("graceful stop: QUIT not sent", "pid", p, "error", err)
		}
	}
}

// uncommittedChild returns a master started by the primary's upgrade: a
// child of the primary in the keeper's process group (workers and
// pre-flight runs have groups of their own), or 0.
func (k *keeper) uncommittedChild() int {
	if k.primary == 0 {
		return 0
	}
	pgrp := unix.Getpgrp()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, pg, ok := procfs.Parent(pid); ok && ppid == k.primary && pg == pgrp {
			return pid
		}
	}
	return 0
}

// readNotify reads the keeper's notify socket and passes on what masters
// send. Every sender is checked here, before anything reaches the loop:
// a flood of strangers' datagrams costs a getsid each and a log line per
// interval, and never queues ahead of the operator's signals.
func (k *keeper) readNotify(sock *notify.Socket, rejected *notify.Rejected, notices chan<- notify.Msg) {
	for {
		n, err := sock.Read()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				k.log.Error("notify socket failed; masters can no longer report", "error", err)
			}
			return
		}
		if ok, why := k.procs.isMaster(n.Pid); !ok {
			rejected.Add(n.Pid, why)
			continue
		}
		if n.Err != nil {
			rejected.Add(n.Pid, n.Err.Error())
			continue
		}
		notices <- n
	}
}

// procView is what the keeper reads of the process table to tell its
// masters from everyone else; its functions are a seam for tests.
type procView struct {
	self, sid int                    // the keeper's pid and session
	getsid    func(int) (int, error) // getsid(2)
	parent    func(int) (int, bool)  // the parent pid, false once gone
}

// liveProcs is the keeper's view of the real process table.
func liveProcs() procView {
	sid, _ := unix.Getsid(0)
	return procView{
		self: os.Getpid(), sid: sid, getsid: unix.Getsid,
		parent: func(pid int) (int, bool) { p, _, ok := procfs.Parent(pid); return p, ok },
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
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	if ok, why := k.procs.isMaster(pid); !ok {
		_ = unix.Close(fd)
		return errors.New(why)
	}
	k.masters[pid] = fd
	return nil
}

// onNotice takes a master's message (readNotify checked the sender).
func (k *keeper) onNotice(n notify.Msg) {
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
		} else {
			if pid != k.primary {
				k.log.Info("primary master", "event", "keeper.primary", "pid", pid, "previous", k.primary)
			}
			k.primary = pid
			k.continueStop(false)
		}
	}
	if n.Pid != k.primary {
		return // an old master retiring, a new one not committed: not the service
	}
	var up []string
	if msg.Is("RELOADING", "1") {
		// CLOCK_MONOTONIC is the machine's: the master's stamp holds.
		mono, _ := msg.Get("MONOTONIC_USEC")
		up = append(up, "RELOADING=1", "MONOTONIC_USEC="+mono)
	}
	if msg.Is("READY", "1") {
		k.continueStop(true)
		up = append(up, "READY=1")
		if !k.ready {
			k.ready = true
			k.log.Info("the service is ready", "master_pid", n.Pid)
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
