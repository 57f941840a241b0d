package master

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

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
	// envNewPrivs=allow lets a worker gain privileges through exec
	// (Config.AllowNewPrivileges); without it the child sets
	// PR_SET_NO_NEW_PRIVS before it becomes the app.
	envNewPrivs = "MOLT_NEW_PRIVS"
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
// Unless the master allows new privileges (Config.AllowNewPrivileges),
// the worker is made PR_SET_NO_NEW_PRIVS first: no exec it or its
// children do can gain privileges (setuid, setgid, file capabilities).
// The flag is per thread and only threads created after it inherit it, so
// a worker of this program sets it and re-executes itself (once; the Go
// runtime's threads start anew with it), and one running another program
// sets it on the thread that executes the program.
//
// A process whose role variable is set but which has no master's parent
// pipe gets ErrManualRole.
func RunChild() (isWorker bool, err error) {
	role, ok := os.LookupEnv(envRole)
	if !ok {
		return false, nil
	}
	if !fromMaster() {
		_ = os.Unsetenv(envRole)
		return false, ErrManualRole
	}
	// Everything up to the exec on one thread: the flag is the thread's.
	runtime.LockOSThread()
	if os.Getenv(envNewPrivs) != "allow" {
		if err := noNewPrivs(role); err != nil {
			return false, err
		}
	}
	// The app never sees molt's plumbing.
	_ = os.Unsetenv(envRole)
	_ = os.Unsetenv(envNewPrivs)
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
		runtime.UnlockOSThread()
		return true, nil
	case roleExec:
		path := os.Getenv(envExecPath)
		_ = os.Unsetenv(envExecPath)
		err := unix.Exec(path, os.Args, os.Environ())
		return false, fmt.Errorf("exec %s: %w", path, err)
	}
	return false, fmt.Errorf("%w (unknown role %q)", ErrManualRole, role)
}

// noNewPrivs sets PR_SET_NO_NEW_PRIVS on the calling (locked) thread. A
// worker of this program (roleWorker) then re-executes itself, unchanged,
// so that every thread of the process has the flag; the re-executed
// process finds it set and goes on.
func noNewPrivs(role string) error {
	if on, err := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0); err == nil && on == 1 {
		return nil // inherited from the master's spawner thread, or set by the re-exec
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	if role != roleWorker {
		return nil
	}
	err := unix.Exec(selfExe, os.Args, os.Environ())
	return fmt.Errorf("re-exec %s with no_new_privs: %w", selfExe, err)
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

// The worker environment rule (README "The worker protocol"): a worker
// gets, in this order, later entries replacing earlier ones of the same
// name,
//
//  1. of the master's environment only the variables keptEnv names:
//     PATH, the locale (LANG, LANGUAGE, LC_*), TZ, and the Go runtime's
//     settings (goRuntimeEnv); never anything else of it: no secret, no
//     MOLT_KEEPER_PID, no HOME=/root;
//  2. the identity of the user it runs as (identityEnv): HOME, USER,
//     LOGNAME and SHELL;
//  3. Config.Env;
//  4. the protocol's variables (LISTEN_*, NOTIFY_SOCKET, MOLT_*).

// goRuntimeEnv are the variables the Go runtime reads at run time; a
// worker written in Go must keep the ones its master was given.
var goRuntimeEnv = map[string]bool{
	"GOGC": true, "GOMEMLIMIT": true, "GOMAXPROCS": true, "GODEBUG": true,
	"GOTRACEBACK": true, "GORACE": true, "GOCOVERDIR": true,
}

// keptEnv reports whether a variable of the master's environment passes
// to workers by the rule above.
func keptEnv(k string) bool {
	switch k {
	case "PATH", "LANG", "LANGUAGE", "TZ":
		return true
	}
	return strings.HasPrefix(k, "LC_") || goRuntimeEnv[k]
}

// identityVars are the variables that say who a process runs as.
var identityVars = []string{"HOME", "USER", "LOGNAME", "SHELL"}

// identityEnv returns HOME, USER, LOGNAME and SHELL of the user workers
// run as: the master's own values (from base, its environment) when cred
// is nil, else those of cred.Uid's passwd entry (SHELL /bin/sh when the
// entry names none, as login(1) does). A uid without an entry gets none
// of them (Config.Env may set them).
func identityEnv(base []string, cred *syscall.Credential) []string {
	if cred == nil {
		var out []string
		for _, kv := range base {
			k, _, _ := strings.Cut(kv, "=")
			if slices.Contains(identityVars, k) {
				out = append(out, kv)
			}
		}
		return out
	}
	u, err := user.LookupId(strconv.FormatUint(uint64(cred.Uid), 10))
	if err != nil {
		return nil
	}
	return []string{"HOME=" + u.HomeDir, "USER=" + u.Username, "LOGNAME=" + u.Username, "SHELL=" + loginShell(passwdFile, u.Uid)}
}

// passwdFile is where loginShell reads login shells (os/user has none).
var passwdFile = "/etc/passwd"

// loginShell returns the shell field of uid's line in the passwd file at
// path, or /bin/sh if the file has no such line or an empty field (a user
// known only through NSS, e.g. LDAP).
func loginShell(path, uid string) string {
	b, err := os.ReadFile(path)
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Split(line, ":")
			if len(f) == 7 && f[2] == uid && f[6] != "" {
				return f[6]
			}
		}
	}
	return "/bin/sh"
}

// workerEnv builds the part of a worker's environment that does not
// change from one worker to the next (items 1-3 of the rule above): of
// base, the master's environment, only what keptEnv allows; then the
// identity of the user cred (nil: the master's); then env.
func workerEnv(base []string, cred *syscall.Credential, env []string) []string {
	var out []string
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if keptEnv(k) {
			out = append(out, kv)
		}
	}
	out = append(out, identityEnv(base, cred)...)
	return append(out, env...)
}

// mergeEnv returns the variables of lists in order, each name once: a
// later KEY=VALUE replaces an earlier one of the same KEY in place.
func mergeEnv(lists ...[]string) []string {
	var out []string
	at := map[string]int{}
	for _, l := range lists {
		for _, kv := range l {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := at[k]; ok {
				out[i] = kv
				continue
			}
			at[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

// signalName returns "TERM" for SIGTERM: the form of MOLT_STOP_SIGNAL.
func signalName(s syscall.Signal) string {
	return strings.TrimPrefix(unix.SignalName(s), "SIG")
}
