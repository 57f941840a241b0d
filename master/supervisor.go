package master

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// The supervisor is whoever listens on the master's own NOTIFY_SOCKET:
// molt's keeper, or systemd when molt runs with --no-keeper
// (NotifyAccess=all). Each master tells it, in systemd's notify protocol,
// which master is primary and what the service is doing:
//
//	a lone master serving             MAINPID=<self> READY=1 MOLT_CONTROL_SOCKET=... STATUS=...
//	USR2 (after the pre-flight)       RELOADING=1 MONOTONIC_USEC=... MOLT_CONTROL_SOCKET=... STATUS=...
//	the new master's commit           MAINPID=<self> READY=1 MOLT_CONTROL_SOCKET=... STATUS=...   (before tableflip's Ready)
//	a rollback                        READY=1 STATUS=...                  (the old master)
//	a reload starting / ending        RELOADING=1 ... / READY=1 STATUS=...
//	the primary stopping              STOPPING=1 STATUS=...
//
// MOLT_CONTROL_SOCKET= is the absolute path of the sender's control
// socket as it is then (PATH.oldbin while an upgrade is in flight), and
// the READY=1 lines of a rollback and a reload carry it too: the keeper
// sends the primary its stop request there (systemd ignores the field).
//
// An old master retiring after a commit and a new master giving up say
// nothing: they are not the service. The variable stays in the master's
// environment, so that the masters of later upgrades find it too; workers
// never see it (workerEnv).
//
// Under the keeper, the primary also pushes its listening sockets to the
// keeper's fd store (systemd's protocol, sd_notify(3)), one datagram per
// listener, so that the keeper holds a copy of each (keeper/fdstore.go):
//
//	the first master, its listeners bound   FDSTORE=1 FDNAME=<name> + the socket, for each
//	every READY=1 above (commit, reload...)  the same, for the whole current set
//	a listener dropped (reload, commit)      FDSTOREREMOVE=1 FDNAME=<name>
//
// with MOLT_ACTIVATED=1 beside FDSTORE=1 for a socket from socket
// activation (the keeper keeps it out of systemd's own store), and after
// each push of the set MOLT_FDSTORE_SET=<name>:<name>... (the keeper
// forgets any other name). The keeper keeps one copy per name, so
// pushing the set again is cheap.
// With --no-keeper nothing is pushed to systemd's own store: with the
// NotifyAccess=all the masters need there, every worker could push to or
// remove from it too, and socket activation already keeps the sockets
// across restarts of the service (docs/deploying.md).

// monotonicUsec is CLOCK_MONOTONIC in microseconds, for MONOTONIC_USEC=
// (systemd matches RELOADING=1 with it).
func monotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "0"
	}
	return strconv.FormatInt(ts.Nano()/1000, 10)
}

// tellSupervisor sends one message made of lines (empty ones left out),
// without waiting on the supervisor; failures are logged (it may be gone:
// the master serves on).
func (m *Master) tellSupervisor(all ...string) {
	if m.supervisor == "" {
		return
	}
	var lines []string
	for _, l := range all {
		if l != "" {
			lines = append(lines, l)
		}
	}
	if err := worker.NotifyTo(m.supervisor, strings.Join(lines, "\n")); err != nil {
		m.log.Warn("notify socket: message not sent", "error", err, "message", strings.Join(lines, " "))
		return
	}
	m.log.Debug("notify socket: sent", "message", strings.Join(lines, " "))
}

// supervisorStatus is a STATUS= line a human reads in systemctl status.
func (m *Master) supervisorStatus(format string, a ...any) string {
	return fmt.Sprintf("STATUS=gen %d, pid %d, version %s: %s", m.gen, os.Getpid(), m.cfg.Version, fmt.Sprintf(format, a...))
}

// supervisorReady: this master is the primary and serves.
func (m *Master) supervisorReady(format string, a ...any) {
	m.tellSupervisor("MAINPID="+strconv.Itoa(os.Getpid()), "READY=1", m.controlLine(), m.supervisorStatus(format, a...))
	m.storeListeners()
	m.registerSpecLater()
}

// registerSpecLater: once this master has served for StableAfter since its
// first READY=1 (its commit, or its start), it registers its exec spec
// with the keeper (MOLT_SPEC=1), which will start a fresh master from it
// if every master dies (keeper/resurrect.go). The keeper takes it only
// from the primary: a master retired by then is not heard.
func (m *Master) registerSpecLater() {
	if m.specTimer != nil || !m.underKeeper() {
		return
	}
	m.specTimer = time.AfterFunc(m.cfg.StableAfter, func() { m.tellSupervisor(keeper.FieldSpec + "=1") })
}

// storeWait bounds each fd-store datagram to the keeper: its notify
// queue is short (net.unix.max_dgram_qlen), and a set pushed at once
// may have to wait for the keeper to read.
const storeWait = time.Second

// underKeeper: the supervisor is molt's keeper, which stores sockets.
func (m *Master) underKeeper() bool {
	return m.supervisor != "" && os.Getenv(keeper.EnvKeeperPID) != ""
}

// storeListeners pushes every listener of this master to the keeper's fd
// store (FDSTORE=1, FDNAME=<listener name>, the socket by SCM_RIGHTS).
func (m *Master) storeListeners() {
	if !m.underKeeper() {
		return
	}
	for _, l := range m.listeners {
		fd, err := rawFD(l.file)
		if err == nil {
			msg := "FDSTORE=1\nFDNAME=" + l.spec.Name
			if l.activated {
				msg += "\n" + keeper.FieldActivated + "=1"
			}
			err = worker.NotifyWithFDs(m.supervisor, msg, []int{fd}, storeWait)
		}
		runtime.KeepAlive(l.file)
		if err != nil {
			m.log.Warn("listener not pushed to the keeper's fd store", "event", "listener.store_failed", "listener", l.spec.Name, "error", err)
			continue
		}
		m.log.Debug("listener pushed to the keeper's fd store", "event", "listener.stored", "listener", l.spec.Name)
	}
	// The set, so that the keeper forgets any other name (one a successor
	// that died had added, after a take-back).
	names := make([]string, 0, len(m.listeners))
	for _, l := range m.listeners {
		names = append(names, l.spec.Name)
	}
	set := keeper.FieldStoreSet + "=" + strings.Join(names, ":")
	if len(set) > worker.MaxNotifySize {
		m.log.Warn("listener names too long to send as one set; the keeper's fd store forgets dropped names only by FDSTOREREMOVE", "event", "listener.store_failed", "listener", "", "error", "set too long")
		return
	}
	if err := worker.NotifyWithFDs(m.supervisor, set, nil, storeWait); err != nil {
		m.log.Warn("listener set not sent to the keeper's fd store", "event", "listener.store_failed", "listener", "", "error", err)
	}
}

// unstoreListeners tells the keeper's fd store to forget the listeners
// named, which this master dropped (FDSTOREREMOVE=1), leaving out any
// name it still listens on (a listener moved to another address keeps
// its name: the push of its new socket replaced the old one).
func (m *Master) unstoreListeners(names ...string) {
	if !m.underKeeper() {
		return
	}
	mine := map[string]bool{}
	for _, l := range m.listeners {
		mine[l.spec.Name] = true
	}
	for _, name := range names {
		if mine[name] {
			continue
		}
		if err := worker.NotifyWithFDs(m.supervisor, "FDSTOREREMOVE=1\nFDNAME="+name, nil, storeWait); err != nil {
			m.log.Warn("dropped listener not removed from the keeper's fd store", "event", "listener.store_failed", "listener", name, "error", err)
			continue
		}
		m.log.Debug("listener removed from the keeper's fd store", "event", "listener.unstored", "listener", name)
	}
}

// controlLine is MOLT_CONTROL_SOCKET=<absolute path>, or "" (no line)
// without a control socket.
func (m *Master) controlLine() string {
	if m.control == nil {
		return ""
	}
	path, err := filepath.Abs(m.control.path)
	if err != nil {
		return ""
	}
	return keeper.FieldControlSocket + "=" + path
}

// supervisorReloading: an upgrade or a reload begins.
func (m *Master) supervisorReloading(what string) {
	m.tellSupervisor("RELOADING=1", "MONOTONIC_USEC="+monotonicUsec(), m.controlLine(), m.supervisorStatus("%s", what))
}

// watchKeeper logs once the keeper (MOLT_KEEPER_PID) has exited: the
// master serves on, unsupervised.
func (m *Master) watchKeeper() {
	v := os.Getenv(keeper.EnvKeeperPID)
	if v == "" {
		return
	}
	pid := keeperPID()
	if pid == 0 {
		m.log.Warn("ignoring a bad "+keeper.EnvKeeperPID, "value", v)
		return
	}
	if !m.watchExit(pid, keeperExited{pid: pid}) {
		m.log.Warn("the keeper is gone; this master serves on without it", "keeper_pid", pid)
	}
}

// resurrections is what "molt ctl status" shows of the keeper's fresh
// masters: how many it started so far, and why it started the last.
type resurrections struct {
	count int
	why   string
}

// maxResurrections bounds the count a master accepts from its
// environment.
const maxResurrections = 1 << 30

// resurrectionsFromEnv reads MOLT_RESURRECTIONS and
// MOLT_RESURRECTED_BECAUSE from the master's own environment: the keeper
// sets them for a fresh master (or the operator for the first), and a
// new master inherits them from the master that started it. Nothing else
// sets a master's environment. Both or neither: a count of decimal digits
// from 1 to maxResurrections, a reason of printable UTF-8 of at most
// keeper.MaxResurrectedBecause bytes; anything else is logged and ignored.
func (m *Master) resurrectionsFromEnv() resurrections {
	n, nSet := os.LookupEnv(keeper.EnvResurrections)
	why, whySet := os.LookupEnv(keeper.EnvResurrectedBecause)
	if !nSet && !whySet {
		return resurrections{}
	}
	r, err := parseResurrections(n, why)
	if err != nil {
		m.log.Warn("ignoring the resurrection variables", "event", "master.env_rejected", "reason", err.Error())
		return resurrections{}
	}
	return r
}

// parseResurrections checks the two variables strictly.
func parseResurrections(n, why string) (resurrections, error) {
	if n == "" || len(n) > 10 || strings.Trim(n, "0123456789") != "" || n[0] == '0' {
		return resurrections{}, fmt.Errorf("%s=%q: want a count from 1 to %d", keeper.EnvResurrections, Printable(n), maxResurrections)
	}
	count, err := strconv.Atoi(n)
	if err != nil || count < 1 || count > maxResurrections {
		return resurrections{}, fmt.Errorf("%s=%q: want a count from 1 to %d", keeper.EnvResurrections, n, maxResurrections)
	}
	if why == "" || len(why) > keeper.MaxResurrectedBecause || !isPrintable(why) {
		return resurrections{}, fmt.Errorf("%s: want printable text of 1 to %d bytes", keeper.EnvResurrectedBecause, keeper.MaxResurrectedBecause)
	}
	return resurrections{count: count, why: why}, nil
}

// keeperPID is the keeper's pid from MOLT_KEEPER_PID; 0 if none or bad.
func keeperPID() int {
	pid, err := strconv.Atoi(os.Getenv(keeper.EnvKeeperPID))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// watchExit sends ev to the loop once process pid has exited; false if
// it cannot be watched (it is gone already, or pidfds are missing).
func (m *Master) watchExit(pid int, ev event) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false
	}
	go func() {
		defer unix.Close(fd)
		// A pidfd polls readable once its process has exited; the timeout
		// only lets this goroutine end with the master.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if n, err := unix.Poll(fds, 1000); n > 0 || (err != nil && err != unix.EINTR) {
				m.send(ev)
				return
			}
			select {
			case <-m.done:
				return
			default:
			}
		}
	}()
	return true
}

// keeperExited reports that the keeper has exited.
type keeperExited struct{ pid int }

func (e keeperExited) String() string { return fmt.Sprintf("keeper %d exited", e.pid) }
