package master

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// Hidden roles: a master starts every worker as its own binary
// (/proc/self/exe, so a generation keeps the executable it started with
// even after a deploy replaced the file; DESIGN §4) with envRole set. The
// child fixes LISTEN_PID (and WATCHDOG_PID) to its own pid, which no parent can know before
// fork, and then either becomes the app (roleExec) or returns to its main
// as a worker of the same program (roleWorker).
const (
	envRole     = "MOLT_ROLE"
	envExecPath = "MOLT_EXEC_PATH"
	envUmask    = "MOLT_UMASK"
	roleWorker  = "worker"
	roleExec    = "exec"
)

// ErrManualRole is returned by RunChild when the process carries a hidden
// role but was not started by a master.
var ErrManualRole = errors.New("this is a hidden role of molt, started by a molt master for its workers; it is not for manual use")

// RunChild handles the hidden roles a master starts its own binary in.
// Call it first thing in main, before parsing flags, in every program
// that runs a master (cmd/molt, or a Go program embedding this package).
//
//   - Not started as a worker: returns false, nil; carry on as usual.
//   - A worker of this very program (Config.Command empty): returns
//     true, nil with LISTEN_PID set to this process; run the app.
//   - A worker running another program (Config.Command): never returns
//     on success; the process becomes that program (execve). An error
//     means the exec failed; exit non-zero.
//
// A process whose role variable is set but which has no master's parent
// pipe gets ErrManualRole.
func RunChild() (isWorker bool, err error) {
	role, ok := os.LookupEnv(envRole)
	if !ok {
		return false, nil
	}
	_ = os.Unsetenv(envRole) // the app never sees molt's plumbing
	if !fromMaster() {
		return false, ErrManualRole
	}
	if os.Getenv(worker.EnvListenFDs) != "" {
		_ = os.Setenv(worker.EnvListenPID, strconv.Itoa(os.Getpid()))
	}
	if os.Getenv(worker.EnvWatchdogUSec) != "" {
		_ = os.Setenv(worker.EnvWatchdogPID, strconv.Itoa(os.Getpid()))
	}
	if v, ok := os.LookupEnv(envUmask); ok {
		_ = os.Unsetenv(envUmask)
		if mask, err := strconv.ParseUint(v, 8, 32); err == nil {
			unix.Umask(int(mask))
		}
	}
	switch role {
	case roleWorker:
		return true, nil
	case roleExec:
		path := os.Getenv(envExecPath)
		_ = os.Unsetenv(envExecPath)
		err := unix.Exec(path, os.Args, os.Environ())
		return false, fmt.Errorf("exec %s: %w", path, err)
	}
	return false, fmt.Errorf("%w (unknown role %q)", ErrManualRole, role)
}

// fromMaster reports whether the parent pipe a master passes is there.
func fromMaster() bool {
	fd, err := strconv.Atoi(os.Getenv(worker.EnvParentFD))
	if err != nil || fd < worker.ListenFDsStart {
		return false
	}
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFIFO
}

// workerEnv builds a worker's environment: the master's own, minus every
// variable of systemd, tableflip and molt that describes the master's
// situation rather than the worker's, plus extra.
func workerEnv(base []string, extra ...string) []string {
	strip := map[string]bool{
		worker.EnvListenFDs: true, worker.EnvListenPID: true, worker.EnvListenFDNames: true,
		worker.EnvNotifySocket: true, worker.EnvWatchdogUSec: true, worker.EnvWatchdogPID: true,
		worker.EnvMasterPID: true, worker.EnvWorker: true, worker.EnvStopSignal: true,
		worker.EnvDrainTimeout: true, worker.EnvParentFD: true,
		envRole: true, envExecPath: true, envUmask: true, upgrade.ParentEnv: true,
		keeper.EnvKeeperPID: true,
	}
	env := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !strip[k] {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// signalName returns "TERM" for SIGTERM: the form of MOLT_STOP_SIGNAL.
func signalName(s syscall.Signal) string {
	return strings.TrimPrefix(unix.SignalName(s), "SIG")
}
