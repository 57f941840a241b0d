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
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// EnvKeeperPID tells a master which keeper it runs under (and that it must
// not become a keeper itself). It matches master.EnvKeeperPID.
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
}

// forwarded are the signals the keeper passes on to the primary master.
var forwarded = []os.Signal{
	syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGWINCH, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR1,
}

// stops are the signals that stop every generation.
var stops = []os.Signal{syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGINT}

// keeper is the state of the one loop in Run.
type keeper struct {
	cfg      Config
	log      hclog.Logger
	upstream *net.UnixAddr // systemd's NOTIFY_SOCKET, or nil
	primary  int           // the master the operator's signals go to
	masters  map[int]bool  // live masters it knows of
	ready    bool          // READY=1 sent upstream once
	stopping os.Signal     // the stop signal received, if any
	quitSent map[int]bool  // masters sent QUIT by a graceful stop
	stopSent bool          // STOPPING=1 sent upstream
	status   int           // exit code of the last master reaped
}

// notice is one datagram on the keeper's socket.
type notice struct {
	pid int
	msg worker.Notification
	err error
}

// Run starts the first master and keeps it, and every master after it,
// until none is left. It returns the exit code for the keeper's process.
func Run(cfg Config) int {
	k := &keeper{cfg: cfg, log: cfg.Logger.Named("keeper"), masters: map[int]bool{}, quitSent: map[int]bool{}}
	if cfg.Notify != "" {
		name := cfg.Notify
		if name[0] == '@' {
			name = "\x00" + name[1:]
		}
		k.upstream = &net.UnixAddr{Name: name, Net: "unixgram"}
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		k.log.Error("cannot become a child subreaper", "error", err)
		return 1
	}
	conn, addr, err := listenNotify()
	if err != nil {
		k.log.Error("notify socket", "error", err)
		return 1
	}
	defer conn.Close()
	notices := make(chan notice, 64)
	go readNotices(conn, notices)

	sigC := make(chan os.Signal, 16)
	signal.Notify(sigC, append(append([]os.Signal{syscall.SIGCHLD}, forwarded...), stops...)...)
	defer signal.Stop(sigC)

	env := append(append([]string{}, cfg.Env...), "NOTIFY_SOCKET="+addr, EnvKeeperPID+"="+strconv.Itoa(os.Getpid()))
	p, err := os.StartProcess(cfg.Path, append([]string{cfg.Path}, cfg.Args...), &os.ProcAttr{
		Env:   env,
		Files: []*os.File{os.Stdin, orStd(cfg.Stdout, os.Stdout), orStd(cfg.Stderr, os.Stderr)},
	})
	if err != nil {
		k.log.Error("cannot start the master", "path", cfg.Path, "error", err)
		return 1
	}
	pid := p.Pid
	_ = p.Release() // reaped below with wait4, as every other child
	k.primary, k.masters[pid] = pid, true
	k.log.Info("keeper started the master", "keeper_pid", os.Getpid(), "master_pid", pid)
	k.upstreamSend("STATUS=starting")

	for {
		select {
		case s := <-sigC:
			if s == syscall.SIGCHLD {
				if k.reap() {
					k.log.Info("no master left; the keeper exits", "status", k.status)
					k.upstreamStopping("stopped")
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

// listenNotify opens the keeper's NOTIFY_SOCKET: abstract (nothing to
// clean up), with SO_PASSCRED so each datagram carries its sender's pid.
func listenNotify() (*net.UnixConn, string, error) {
	var b [8]byte
	_, _ = rand.Read(b[:])
	addr := fmt.Sprintf("@molt-keeper/%d/%s", os.Getpid(), hex.EncodeToString(b[:]))
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return nil, "", err
	}
	rc, err := conn.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		conn.Close()
		return nil, "", fmt.Errorf("SO_PASSCRED: %w", err)
	}
	return conn, addr, nil
}

// readNotices reads datagrams until the socket is closed.
func readNotices(conn *net.UnixConn, out chan<- notice) {
	buf := make([]byte, worker.MaxNotifySize+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*253))
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			out <- notice{err: err}
			time.Sleep(10 * time.Millisecond) // a persistent error must not spin
			continue
		}
		out <- parseNotice(buf[:n], oob[:oobn])
	}
}

// parseNotice reads the sender's pid and the message; passed fds are
// closed (the keeper keeps none).
func parseNotice(data, oob []byte) notice {
	var nt notice
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return notice{err: fmt.Errorf("control message: %w", err)}
	}
	for _, c := range cmsgs {
		if cred, err := unix.ParseUnixCredentials(&c); err == nil {
			nt.pid = int(cred.Pid)
		} else if fds, err := unix.ParseUnixRights(&c); err == nil {
			for _, fd := range fds {
				_ = unix.Close(fd)
			}
		}
	}
	if nt.pid <= 0 {
		return notice{err: errors.New("datagram without credentials")}
	}
	nt.msg, nt.err = worker.ParseNotify(data)
	return nt
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
		if k.masters[pid] {
			delete(k.masters, pid)
			k.status = code
			k.log.Info("master exited", "pid", pid, "status", describe(ws))
			if pid == k.primary {
				k.primary = 0
				for p := range k.masters {
					k.primary = p // the other live master, if any
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
	k.log.Info("forwarding signal to the primary master", "signal", unix.SignalName(sig), "pid", k.primary)
	if err := unix.Kill(k.primary, sig); err != nil {
		k.log.Warn("signal not forwarded", "signal", unix.SignalName(sig), "pid", k.primary, "error", err)
	}
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
			_ = unix.Kill(p, sig)
		}
		if c := k.uncommittedChild(); c != 0 {
			_ = unix.Kill(c, sig)
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
			_ = unix.Kill(c, syscall.SIGQUIT)
			return
		}
		if !rolledBack {
			return
		}
	}
	if p := k.primary; p != 0 && !k.quitSent[p] {
		k.quitSent[p] = true
		_ = unix.Kill(p, syscall.SIGQUIT)
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
		if ppid, pg, ok := procParent(pid); ok && ppid == k.primary && pg == pgrp {
			return pid
		}
	}
	return 0
}

// procParent reads a process's parent pid and process group.
func procParent(pid int) (ppid, pgrp int, ok bool) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, 0, false
	}
	// pid (comm) state ppid pgrp ...: comm may hold spaces and parens.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 3 {
		return 0, 0, false
	}
	ppid, err1 := strconv.Atoi(f[1])
	pgrp, err2 := strconv.Atoi(f[2])
	return ppid, pgrp, err1 == nil && err2 == nil
}

// onNotice takes a master's message. Only the keeper's descendants count.
func (k *keeper) onNotice(n notice) {
	if n.err != nil {
		k.log.Warn("bad notify message; ignored", "pid", n.pid, "error", n.err)
		return
	}
	if !k.isDescendant(n.pid) {
		k.log.Warn("notify message from a process outside the keeper's tree; ignored", "pid", n.pid)
		return
	}
	if v, ok := n.msg.Get("MAINPID"); ok {
		pid, err := strconv.Atoi(v)
		if err != nil || pid <= 0 || (pid != n.pid && !k.masters[pid]) {
			k.log.Warn("bad MAINPID; ignored", "pid", n.pid, "mainpid", v)
		} else {
			if pid != k.primary {
				k.log.Info("primary master", "pid", pid, "previous", k.primary)
			}
			k.primary, k.masters[pid] = pid, true
			k.continueStop(false)
		}
	}
	if n.pid != k.primary {
		return // an old master retiring, a new one not committed: not the service
	}
	var up []string
	if n.msg.Is("RELOADING", "1") {
		up = append(up, "RELOADING=1", "MONOTONIC_USEC="+monotonicUsec())
	}
	if n.msg.Is("READY", "1") {
		k.continueStop(true)
		up = append(up, "READY=1")
		if !k.ready {
			k.ready = true
			k.log.Info("the service is ready", "master_pid", n.pid)
		}
	}
	if n.msg.Is("STOPPING", "1") && !k.stopSent {
		k.stopSent = true
		up = append(up, "STOPPING=1")
	}
	if v, ok := n.msg.Get("STATUS"); ok {
		up = append(up, "STATUS="+v)
	}
	if len(up) > 0 {
		k.upstreamSend(up...)
	}
}

// isDescendant reports whether pid is in the keeper's process tree.
func (k *keeper) isDescendant(pid int) bool {
	self := os.Getpid()
	for i := 0; i < 64 && pid > 1; i++ {
		if pid == self {
			return true
		}
		ppid, _, ok := procParent(pid)
		if !ok {
			return false
		}
		pid = ppid
	}
	return pid == self
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

// upstreamSend relays a message to systemd, if the keeper runs under it.
func (k *keeper) upstreamSend(lines ...string) {
	if k.upstream == nil {
		return
	}
	c, err := net.DialUnix("unixgram", nil, k.upstream)
	if err == nil {
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, err = c.Write([]byte(strings.Join(lines, "\n") + "\n"))
		_ = c.Close()
	}
	if err != nil {
		k.log.Warn("systemd notify socket: message not sent", "error", err)
	}
}

func monotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "0"
	}
	return strconv.FormatInt(ts.Nano()/1000, 10)
}

func orStd(f, std *os.File) *os.File {
	if f != nil {
		return f
	}
	return std
}
