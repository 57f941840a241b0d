package upgrade

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// molt's own handover: how a master whose tableflip Upgrader is spent
// (it committed one upgrade, then took the service back after its
// successor died) still starts a new master. tableflip (v1.2.3) allows
// one successful upgrade per process; this path gives the new master
// the same named files by molt's own means, and the new master's own
// Upgrader is fresh (it has no tableflip parent), so its next upgrade
// runs on tableflip again. The protocol mirrors tableflip's:
//
//   - the files travel as ExtraFiles, named in HandoverEnv
//     (name:fd,name:fd,...), under the names tableflip would use;
//   - "molt.ready" is the write end of a pipe on which the new master
//     writes one byte where it would call tableflip's Ready: the commit;
//   - "molt.parent" is the read end of a pipe whose write end the old
//     master keeps open until it exits: EOF there is WaitForParent.

// HandoverEnv names the files a master started by molt's own handover
// inherits. Like ParentEnv, it must never reach a worker (a worker's
// environment is an allow-list, master/child.go) and the new master
// removes it from its own environment once read.
const HandoverEnv = "MOLT_HANDOVER_FDS"

// The two pipes of molt's own handover, by name in HandoverEnv.
const (
	readyFile  = "molt.ready"
	parentFile = "molt.parent"
)

// notifyReady is the byte a new master writes on its ready pipe (the
// value tableflip uses on its own).
const notifyReady = 42

// initialWD is the directory a new master starts in, as tableflip does:
// this process's at its start.
var initialWD, _ = os.Getwd()

// ErrHandoverEnv is wrapped by every error about HandoverEnv's value: the
// master refuses to start (a refused configuration's status), and the
// old generation keeps serving.
var ErrHandoverEnv = errors.New("invalid " + HandoverEnv)

// parseHandoverEnv reads HandoverEnv's value: every name one of molt's
// (the two pipes, the channel, molt.listener.<name>, molt.file.<name>),
// none twice, each fd open, the two pipes present. The fds are made
// close-on-exec. Its errors name the variable.
func parseHandoverEnv(val string) (map[string]int, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("upgrade: %w %q: %s", ErrHandoverEnv, val, fmt.Sprintf(format, a...))
	}
	if val == "" {
		return nil, bad("empty")
	}
	files := map[string]int{}
	fds := map[int]string{}
	for _, item := range strings.Split(val, ",") {
		name, num, ok := strings.Cut(item, ":")
		if !ok {
			return nil, bad("%q is not name:fd", item)
		}
		if !knownName(name) {
			return nil, bad("unknown name %q", name)
		}
		fd, err := strconv.Atoi(num)
		if err != nil || fd < 3 || num != strconv.Itoa(fd) {
			return nil, bad("%s: fd %q is not a number from 3 up", name, num)
		}
		if _, dup := files[name]; dup {
			return nil, bad("%s named twice", name)
		}
		if other, dup := fds[fd]; dup {
			return nil, bad("fd %d named twice (%s and %s)", fd, other, name)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, bad("%s: fd %d is not open: %v", name, fd, err)
		}
		files[name], fds[fd] = fd, name
	}
	for _, need := range []string{readyFile, parentFile} {
		if _, ok := files[need]; !ok {
			return nil, bad("no %s", need)
		}
	}
	for _, fd := range files {
		unix.CloseOnExec(fd)
	}
	return files, nil
}

// knownName reports whether name is one molt passes between masters.
func knownName(name string) bool {
	switch name {
	case readyFile, parentFile, channelFile:
		return true
	}
	for _, prefix := range []string{listenerPrefix, filePrefix} {
		if rest, ok := strings.CutPrefix(name, prefix); ok {
			return rest != "" && strings.IndexFunc(rest, func(c rune) bool {
				return !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.')
			}) < 0
		}
	}
	return false
}

// freshParent is a new master's side of molt's own handover.
type freshParent struct {
	ready  *os.File
	result chan error // WaitForParent's, sent once and put back
}

// newFreshParent takes the two pipes out of files and starts waiting
// for the parent's exit.
func newFreshParent(files map[string]int) *freshParent {
	p := &freshParent{
		ready:  os.NewFile(uintptr(files[readyFile]), readyFile),
		result: make(chan error, 1),
	}
	rd := os.NewFile(uintptr(files[parentFile]), parentFile)
	delete(files, readyFile)
	delete(files, parentFile)
	go func() {
		defer rd.Close()
		n, err := io.Copy(io.Discard, rd)
		switch {
		case n != 0:
			err = errors.New("unexpected data from the parent master")
		case err != nil:
			err = fmt.Errorf("waiting for the parent master to exit: %w", err)
		}
		p.result <- err
	}()
	return p
}

// sendReady is the commit: the parent's Upgrade returns nil.
func (p *freshParent) sendReady() error {
	if p.ready == nil {
		return nil
	}
	defer func() { _ = p.ready.Close(); p.ready = nil }()
	if _, err := p.ready.Write([]byte{notifyReady}); err != nil {
		return fmt.Errorf("notify the parent master: %w", err)
	}
	return nil
}

// startFresh starts a new master by molt's own handover with files
// (name to raw fd) and blocks like tableflip's Upgrade: nil once it
// wrote its ready byte (parentW is then kept open until this process
// exits), else how it failed, as an *UpgradeError.
func (h *Handover) startFresh(files map[string]int) error {
	fail := func(kind FailureKind, err error) error { return &UpgradeError{Kind: kind, Err: err} }
	path, err := exec.LookPath(os.Args[0])
	if err != nil {
		return fail(FailedStart, fmt.Errorf("can't start child: %w", err))
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return fail(FailedStart, fmt.Errorf("can't start child: ready pipe: %w", err))
	}
	defer readyR.Close()
	parentR, parentW, err := os.Pipe()
	if err != nil {
		_ = readyW.Close()
		return fail(FailedStart, fmt.Errorf("can't start child: parent pipe: %w", err))
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	passed := []uintptr{0, 1, 2, readyW.Fd(), parentR.Fd()}
	spec := []string{readyFile + ":3", parentFile + ":4"}
	for _, name := range names {
		spec = append(spec, name+":"+strconv.Itoa(len(passed)))
		passed = append(passed, uintptr(files[name]))
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, ParentEnv+"=") && !strings.HasPrefix(kv, HandoverEnv+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, HandoverEnv+"="+strings.Join(spec, ","))
	argv := append([]string{path}, os.Args[1:]...)
	pid, _, err := syscall.StartProcess(path, argv, &syscall.ProcAttr{Dir: initialWD, Env: env, Files: passed})
	_ = readyW.Close()
	_ = parentR.Close()
	if err != nil {
		_ = parentW.Close()
		return fail(FailedStart, fmt.Errorf("can't start child: fork/exec %s: %w", path, err))
	}
	proc, err := os.FindProcess(pid)
	if err != nil { // never on Unix
		_ = parentW.Close()
		return fail(FailedStart, fmt.Errorf("can't start child: find pid %d: %w", pid, err))
	}
	h.log.Info("new master started by molt's own handover (this process's tableflip upgrade is spent)",
		"event", "upgrade.fresh_started", "new_pid", pid, "path", path)
	exited := make(chan error, 1)
	go func() { // reaps it, after the commit too, as tableflip does
		state, err := proc.Wait()
		if err == nil && !state.Success() {
			err = &exec.ExitError{ProcessState: state}
		}
		exited <- err
	}()
	ready := make(chan bool, 1)
	go func() {
		var b [1]byte
		n, _ := readyR.Read(b[:])
		ready <- n == 1 && b[0] == notifyReady
	}()
	for {
		select {
		case err := <-exited:
			if ready != nil && <-ready {
				// It committed, then died at once: the commit stands (the
				// old master follows its successor's death from here).
				h.mu.Lock()
				h.keep = append(h.keep, parentW)
				h.mu.Unlock()
				return nil
			}
			_ = parentW.Close()
			var ee *exec.ExitError
			switch {
			case err == nil:
				return fail(FailedExit, fmt.Errorf("child pid=%d exited", pid))
			case errors.As(err, &ee) && ee.Exited():
				return &UpgradeError{Kind: FailedExit, Code: ee.ExitCode(), Err: fmt.Errorf("child pid=%d exited: %w", pid, err)}
			case errors.As(err, &ee):
				return &UpgradeError{Kind: FailedSignal, Signal: err.Error(), Err: fmt.Errorf("child pid=%d exited: %w", pid, err)}
			}
			return fail(FailedOther, fmt.Errorf("child pid=%d: %w", pid, err))
		case ok := <-ready:
			if !ok {
				ready = nil // closed without the byte: its exit follows
				continue
			}
			h.mu.Lock()
			h.keep = append(h.keep, parentW) // closed by the kernel at this process's exit
			h.mu.Unlock()
			return nil
		}
	}
}
