package master

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// spawner starts every worker from one goroutine locked to its OS thread
// for the whole life of the master. Pdeathsig fires when the *thread* that
// forked the child exits, not the process (prctl(2), PR_SET_PDEATHSIG); a
// worker forked from an ordinary goroutine would get its stop signal
// whenever the Go runtime happened to retire that thread (DESIGN §2).
//
// The spawner thread of workers without new privileges (the default) has
// PR_SET_NO_NEW_PRIVS set on it, and children inherit the flag from the
// thread that forks them: a worker starts with it, and a worker of molt's
// own binary need not re-execute itself to set it on every thread (one
// Go start fewer per worker, about 4 ms here, on the path of every
// upgrade). The flag cannot be cleared, so workers allowed new
// privileges are forked from a second spawner (Master.spawnerFor).
type spawner struct {
	reqC chan spawnRequest
	done <-chan struct{}
}

type spawnRequest struct {
	path  string
	argv  []string
	env   []string
	files []*os.File // fd 0, 1, 2, 3, ... in the child
	// pdeathsig reaches the child when the spawner thread ends: when the
	// master dies or its Run returns.
	pdeathsig syscall.Signal
	// dir, if not empty, is the child's working directory.
	dir string
	// credential, if not nil, is the user the child runs as. The kernel
	// keeps the parent-death signal across this setuid (Go sets it after
	// the credentials) and across the exec of a non-setuid binary.
	credential *syscall.Credential
	reply      chan spawnResult
}

type spawnResult struct {
	proc *os.Process
	err  error
}

// errSpawnerStopped is returned by start once the master is shutting down.
var errSpawnerStopped = errors.New("spawner stopped")

// newSpawner starts the spawner goroutine; it ends when done is closed,
// and its thread ends with it (the goroutine never unlocks). With
// noNewPrivs, its thread gets PR_SET_NO_NEW_PRIVS, and so does every
// child it forks.
func newSpawner(done <-chan struct{}, noNewPrivs bool) (*spawner, error) {
	s := &spawner{reqC: make(chan spawnRequest), done: done}
	started := make(chan error)
	go s.run(started, noNewPrivs)
	if err := <-started; err != nil {
		return nil, err
	}
	return s, nil
}

func (s *spawner) run(started chan<- error, noNewPrivs bool) {
	runtime.LockOSThread()
	// No UnlockOSThread: when this goroutine returns, its thread exits, and
	// Pdeathsig reaches every worker still alive. That is the backstop for
	// a master that stops without draining them. (The no_new_privs thread
	// must never run anything else either.)
	if noNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			started <- fmt.Errorf("spawner thread: prctl(PR_SET_NO_NEW_PRIVS): %w", err)
			return
		}
	}
	started <- nil
	for {
		select {
		case r := <-s.reqC:
			r.reply <- startProcess(r)
		case <-s.done:
			return
		}
	}
}

// start forks and executes a child on the spawner thread and returns once
// the exec has happened (or failed). It blocks only for the fork and exec.
func (s *spawner) start(r spawnRequest) (*os.Process, error) {
	r.reply = make(chan spawnResult, 1)
	select {
	case s.reqC <- r:
	case <-s.done:
		return nil, errSpawnerStopped
	}
	res := <-r.reply
	return res.proc, res.err
}

// startProcess passes raw descriptors through syscall.StartProcess. Going
// through os.StartProcess or exec.Cmd.ExtraFiles would call os.File.Fd,
// which switches a shared listening socket to blocking mode in every
// process that holds it, after which Close no longer interrupts accept
// and drains hang (DESIGN §4, "Don't touch the listener's blocking mode").
func startProcess(r spawnRequest) spawnResult {
	fds := make([]uintptr, len(r.files))
	for i, f := range r.files {
		fd, err := rawFD(f)
		if err != nil {
			return spawnResult{err: fmt.Errorf("spawn %s: fd %d: %w", r.path, i, err)}
		}
		fds[i] = uintptr(fd)
	}
	attr := &syscall.ProcAttr{
		Dir:   r.dir,
		Env:   r.env,
		Files: fds,
		Sys: &syscall.SysProcAttr{
			// One session per worker, and so one process group whose
			// id is the worker's pid: signalled as a group, a terminal's
			// Ctrl-C reaches only the master (DESIGN §2), and no process
			// of one worker can join another worker's group or the
			// masters' session (setpgid(2) stays within a session), so
			// the session a notify sender is in names the worker it may
			// speak for. Not with Setpgid: Go would then call setpgid
			// after setsid, which fails with EPERM for a session leader.
			Setsid:     true,
			Pdeathsig:  r.pdeathsig,
			Credential: r.credential,
		},
	}
	pid, _, err := syscall.StartProcess(r.path, r.argv, attr)
	runtime.KeepAlive(r.files) // the numbers above stay valid until the exec
	if err != nil {
		return spawnResult{err: fmt.Errorf("spawn %s: %w", r.path, err)}
	}
	// FindProcess opens a pidfd for our own, not yet reaped child: Wait
	// then reaps exactly this pid, never another (DESIGN §4: never wait4(-1)).
	p, err := os.FindProcess(pid)
	if err != nil {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		return spawnResult{err: fmt.Errorf("spawn %s: find pid %d: %w", r.path, pid, err)}
	}
	return spawnResult{proc: p}
}

// spawnerFor returns the spawner of workers with (newPrivs) or without
// new privileges, made when first needed.
func (m *Master) spawnerFor(newPrivs bool) (*spawner, error) {
	s := &m.spawner
	if newPrivs {
		s = &m.privSpawner
	}
	if *s == nil {
		made, err := newSpawner(m.done, !newPrivs)
		if err != nil {
			return nil, err
		}
		*s = made
	}
	return *s, nil
}
