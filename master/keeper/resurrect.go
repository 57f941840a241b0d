package keeper

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/master/internal/backoff"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// Resurrection: when no master of the keeper's is left alive (workers do
// not count: orphaned workers drain on their own, reaped by the keeper),
// and the last master's end was a death, not a stop, the keeper starts a
// fresh master from the exec spec of the last known-good master and
// passes it every stored socket (fdstore.go). Connections queue on those
// sockets meanwhile; the old workers answer what they hold.
//
// A death is a kill by a signal, or an exit status other than 0 (a clean
// stop), ExitRefused (the master refused its flags or configuration: it
// would again) and ExitAborted (a new master told to give up). A stop is
// QUIT, TERM or INT to the keeper: after one the keeper resurrects
// nothing. Nor does it before the service was ever ready (READY=1): a
// first master that fails at start is the operator's to see, at once. `molt ctl stop` and QUIT to a master end it with status 0.
//
// Crash loops back off with the workers' backoff (package backoff: the
// first at once, then 100ms doubling up to 10s); after more than
// ResurrectMax deaths within ResurrectWindow the keeper gives up, and
// exits, once its tree is empty, with the last master's status (for
// systemd's Restart=).
//
// The exec spec is the executable (an open descriptor: /proc/<pid>/exe
// is gone once the process is) and argv (with its original argv[0],
// which a later USR2 re-executes) of the last master that registered it:
// a primary sends FieldSpec=1 once it has served for SpecAfter (molt run
// --stable-after) after its
// commit (or its first READY=1). Until one does, the spec is the
// keeper's own Config (its Path opened at start). A release whose master
// dies soon after its commit is thus replaced by the release before it.
// The environment is always Config.Env: every master inherits it from
// the keeper unchanged (an upgrade passes its own on), while a master's
// /proc/<pid>/environ also holds what its parent added for it alone
// (tableflip's state, LISTEN_*), which must not reach a fresh master.

// FieldSpec is the notify field with which a primary master registers
// its exec spec with the keeper (MOLT_SPEC=1; systemd ignores it).
const FieldSpec = "MOLT_SPEC"

// EnvResurrections and EnvResurrectedBecause tell a fresh master how
// many fresh masters the keeper has started so far, itself included, and
// why it started the last one: "molt ctl status" shows them, and the
// masters of later upgrades inherit them with the rest of their master's
// environment. Workers never see them. The keeper drops any it was given
// itself, so that a fresh master's are the keeper's own.
const (
	EnvResurrections      = "MOLT_RESURRECTIONS"
	EnvResurrectedBecause = "MOLT_RESURRECTED_BECAUSE"
)

// MaxResurrectedBecause bounds the reason a fresh master is given (the
// master refuses a longer one).
const MaxResurrectedBecause = 256

// SpecAfter is how long a primary master serves after its commit (or its
// first READY=1) before it registers its exec spec, by default (molt
// run --stable-after).
const SpecAfter = 30 * time.Second

// ResurrectWindow and ResurrectMax: after more than ResurrectMax master
// deaths within ResurrectWindow, the keeper gives up.
const (
	ResurrectWindow = time.Minute
	ResurrectMax    = 5
)

// Statuses after which the keeper resurrects nothing (cmd/molt checks
// they match package upgrade's).
const (
	ExitRefused = 2  // bad flags or a configuration refused
	ExitAborted = 12 // a new master told to give up
)

// execFDMin is the lowest number of the spec's descriptor: above every
// position a master is started with (stdio and the stored sockets) and
// every number syscall.StartProcess moves them through, so that the
// child still has it when it executes /proc/self/fd/<n>.
const execFDMin = 2*(3+FDStoreMax) + 64

// execSpec is how the keeper starts a master afresh.
type execSpec struct {
	fd   int      // the executable, held open; -1: by path (argv[0])
	argv []string // argv[0] as the master had it, then its arguments
	pid  int      // the master that registered it; 0: the keeper's Config
}

// path is what the keeper executes.
func (s execSpec) path() string {
	if s.fd >= 0 {
		return "/proc/self/fd/" + strconv.Itoa(s.fd)
	}
	return s.argv[0]
}

// openExec opens path as the first spec's executable.
func openExec(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	return raiseFD(fd)
}

// raiseFD moves fd to execFDMin or above (closing fd).
func raiseFD(fd int) (int, error) {
	hi, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, execFDMin)
	_ = unix.Close(fd)
	if err != nil {
		return -1, fmt.Errorf("dup above %d: %w", execFDMin, err)
	}
	return hi, nil
}

// openSpec reads the exec spec of the live master pid, held by pidfd:
// its executable and its argv. The pidfd still alive afterwards proves
// that what was read under /proc/<pid> was that process's.
func openSpec(pid, pidfd int) (int, []string, error) {
	dir := "/proc/" + strconv.Itoa(pid)
	fd, err := unix.Open(dir+"/exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("open %s/exe: %w", dir, err)
	}
	if fd, err = raiseFD(fd); err != nil {
		return -1, nil, err
	}
	b, err := os.ReadFile(dir + "/cmdline")
	if err == nil && len(b) == 0 {
		err = errors.New("empty")
	}
	if err == nil && exited(pidfd) {
		err = errors.New("the master exited meanwhile")
	}
	if err != nil {
		_ = unix.Close(fd)
		return -1, nil, fmt.Errorf("read %s/cmdline: %w", dir, err)
	}
	return fd, strings.Split(string(bytes.TrimSuffix(b, []byte{0})), "\x00"), nil
}

// startFresh starts a master with path and argv, and fds at 3, 4, ...
func startFresh(path string, argv, env []string, fds []int, stdout, stderr *os.File) (int, error) {
	files := []uintptr{os.Stdin.Fd(), orStd(stdout, os.Stdout).Fd(), orStd(stderr, os.Stderr).Fd()}
	for _, fd := range fds {
		files = append(files, uintptr(fd))
	}
	pid, _, err := syscall.StartProcess(path, argv, &syscall.ProcAttr{Env: env, Files: files})
	return pid, err
}

// onSpec registers the exec spec of the primary, which sent FieldSpec=1.
func (k *keeper) onSpec(pid int) {
	pidfd, ok := k.masters[pid]
	if !ok {
		k.log.Warn("exec spec not registered", "event", "keeper.spec_rejected", "pid", pid, "reason", "not a master the keeper holds")
		return
	}
	fd, argv, err := k.sys.openSpec(pid, pidfd)
	if err != nil {
		k.log.Warn("exec spec not registered", "event", "keeper.spec_rejected", "pid", pid, "reason", err.Error())
		return
	}
	if k.spec.fd >= 0 {
		k.sys.closeFD(k.spec.fd)
	}
	k.spec = execSpec{fd: fd, argv: argv, pid: pid}
	k.log.Info("exec spec registered", "event", "keeper.spec", "pid", pid, "argv0", argv[0], "args", len(argv)-1)
}

// resurrectable says whether a master's end, with the keeper holding no
// master any more, calls for a fresh one; why is the reason either way.
func (k *keeper) resurrectable(ws unix.WaitStatus) (bool, string) {
	switch {
	case k.stopAsked:
		return false, "a stop was asked"
	case !k.ready:
		return false, "the service never served: the failure is the operator's to see"
	case ws.Signaled():
		return true, "the master was " + describe(ws)
	case ws.ExitStatus() == 0:
		return false, "the master exited cleanly"
	case ws.ExitStatus() == ExitRefused:
		return false, "the master refused its flags or configuration"
	case ws.ExitStatus() == ExitAborted:
		return false, "the master was told to give up"
	}
	return true, "the master failed: " + describe(ws)
}

// lastMasterEnded decides, once the keeper holds no master, whether to
// start a fresh one (after the backoff) or to give up.
func (k *keeper) lastMasterEnded(pid int, ws unix.WaitStatus) {
	if k.adoptMasters() {
		return
	}
	ok, why := k.resurrectable(ws)
	if !ok {
		k.log.Info("no master left; none started", "event", "keeper.no_resurrect", "pid", pid, "reason", why)
		return
	}
	k.death(why)
}

// adoptMasters holds every master among the keeper's children that it
// does not hold yet, and reports whether there was one: a new master
// whose old master died before its commit is re-parented to the keeper
// before it has said MAINPID=; it commits by itself, and must not be
// joined by a fresh master.
func (k *keeper) adoptMasters() bool {
	if k.procs.children == nil {
		return false
	}
	adopted := false
	for _, c := range k.procs.children(k.procs.self) {
		if _, held := k.masters[c]; held {
			continue
		}
		if ok, _ := k.procs.isMaster(c); !ok {
			continue // a worker, in a session of its own
		}
		if err := k.holdMaster(c); err != nil {
			continue
		}
		adopted = true
		k.log.Info("a master the keeper did not know of yet; no fresh master", "event", "keeper.master_adopted", "pid", c)
		if k.primary == 0 {
			k.setPrimary(c, 0)
		}
	}
	return adopted
}

// death counts a master's death (or a failed start) and schedules a
// fresh master, or gives up.
func (k *keeper) death(why string) {
	now := k.now()
	kept := k.deaths[:0]
	for _, t := range k.deaths {
		if now.Sub(t) < ResurrectWindow {
			kept = append(kept, t)
		}
	}
	k.deaths = append(kept, now)
	k.reason = why
	if len(k.deaths) > ResurrectMax {
		k.gaveUp = true
		k.log.Error("masters keep dying; the keeper gives up", "event", "keeper.resurrect_gave_up",
			"deaths", len(k.deaths), "window", ResurrectWindow.String(), "reason", why, "status", k.status)
		return
	}
	delay := backoff.Delay(len(k.deaths), rand.Float64())
	k.log.Info("no master left; starting a fresh one", "event", "keeper.resurrect_scheduled", "reason", why, "delay", delay.String())
	k.resurrectC = k.after(delay)
}

// resurrect starts a fresh master from the spec, with every stored
// socket, named StoredNamePrefix+<name> (socket-activated ones keep their
// name), and LISTEN_PID the keeper's: the master accepts its parent's.
func (k *keeper) resurrect() {
	k.resurrectC = nil
	if k.stopAsked || k.gaveUp || len(k.masters) > 0 || k.adoptMasters() {
		return
	}
	fds, names := k.store.listenFDs()
	why := k.reason
	if len(why) > MaxResurrectedBecause {
		why = why[:MaxResurrectedBecause]
	}
	env := append(k.env[:len(k.env):len(k.env)], EnvResurrections+"="+strconv.Itoa(k.resurrections+1),
		EnvResurrectedBecause+"="+strings.ToValidUTF8(why, "?"))
	if len(fds) > 0 {
		env = append(env[:len(env):len(env)], worker.EnvListenPID+"="+strconv.Itoa(k.procs.self),
			worker.EnvListenFDs+"="+strconv.Itoa(len(fds)), worker.EnvListenFDNames+"="+strings.Join(names, ":"))
	}
	path := k.spec.path()
	pid, err := k.sys.startMaster(path, k.spec.argv, env, fds)
	if err != nil {
		k.log.Error("fresh master not started", "event", "keeper.resurrect_failed", "path", path, "argv0", k.spec.argv[0], "error", err)
		k.death("start failed: " + err.Error())
		return
	}
	k.resurrections++
	if fd, err := k.sys.pidfdOpen(pid); err == nil { // its child, not reaped: the pid is its own
		k.masters[pid] = fd
	} else {
		k.log.Error("cannot hold the master by a pidfd; it cannot be signalled", "pid", pid, "error", err)
	}
	k.setPrimary(pid, 0)
	k.upstreamSend(fmt.Sprintf("STATUS=fresh master %d started (%d so far): %s", pid, k.resurrections, k.reason))
	k.log.Warn("fresh master started", "event", "keeper.resurrect", "pid", pid, "reason", k.reason,
		"count", k.resurrections, "spec_pid", k.spec.pid, "argv0", k.spec.argv[0], "sockets", strings.Join(names, " "))
}

// listenEnvDropped is env without LISTEN_ variables and the
// resurrection's (a fresh master gets its own).
func listenEnvDropped(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(kv, "LISTEN_") && k != EnvResurrections && k != EnvResurrectedBecause {
			out = append(out, kv)
		}
	}
	return out
}
