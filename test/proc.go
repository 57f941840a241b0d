package test

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Opts describes a process for Start.
type Opts struct {
	Path string
	Args []string
	// Env is added to the test binary's environment.
	Env []string
	// Dir is the working directory; default the test's temp dir.
	Dir string
	// Log receives stdout and stderr; default Dir/<base of Path>.out. A
	// file, never a pipe: molt's descendants inherit it, and a pipe would
	// keep the test waiting for all of them (STYLE.md §5).
	Log string
	// MayEscalate allows the cleanup to need TERM or KILL without failing
	// the test (for processes that are meant to hang).
	MayEscalate bool
}

// Proc is a process a test started.
type Proc struct {
	Pid     int
	LogPath string
	t       testing.TB
	cmd     *exec.Cmd
	done    chan struct{}
	state   *os.ProcessState
	waitErr error
}

// spawnC runs functions on one goroutine locked to its OS thread for the
// life of the test binary: children get Pdeathsig SIGKILL, which fires
// when the thread that forked them exits, so a test binary that dies
// still takes its first-level children along.
var (
	spawnOnce sync.Once
	spawnC    chan func()
)

func onSpawnThread(f func()) {
	spawnOnce.Do(func() {
		spawnC = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked: see spawnC
			for f := range spawnC {
				f()
			}
		}()
	})
	done := make(chan struct{})
	spawnC <- func() { f(); close(done) }
	<-done
}

// Start runs a process and registers its cleanup: QUIT, a bounded wait,
// then TERM, then SIGABRT (a goroutine dump into its log) and KILL; the
// test fails if the process needed more than QUIT (unless MayEscalate),
// and the tail of its log is printed when the test failed.
func Start(t testing.TB, o Opts) *Proc {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Log == "" {
		o.Log = fmt.Sprintf("%s/%s.out", o.Dir, baseName(o.Path))
	}
	logf, err := os.OpenFile(o.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(o.Path, o.Args...)
	cmd.Dir = o.Dir
	cmd.Env = append(os.Environ(), "GOTRACEBACK=all", "GORACE=halt_on_error=1 atexit_sleep_ms=0")
	cmd.Env = append(cmd.Env, o.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	onSpawnThread(func() { err = cmd.Start() })
	if err != nil {
		t.Fatalf("start %s: %v", o.Path, err)
	}
	p := &Proc{Pid: cmd.Process.Pid, LogPath: o.Log, t: t, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(o.MayEscalate) })
	return p
}

func baseName(path string) string {
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		return path[i+1:]
	}
	return path
}

// Signal sends sig to the process (not its group).
func (p *Proc) Signal(sig syscall.Signal) {
	p.t.Helper()
	if err := syscall.Kill(p.Pid, sig); err != nil && !p.Exited() {
		p.t.Fatalf("signal %v to pid %d: %v", sig, p.Pid, err)
	}
}

// Exited reports whether the process has exited and been reaped.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout (scaled) for the process to exit and returns
// its exit code (-1 if killed by a signal); it fails the test on timeout.
func (p *Proc) Wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(capTimeout(p.t, timeout)):
		p.t.Fatalf("pid %d did not exit within %v", p.Pid, Timeout(timeout))
	}
	return p.state.ExitCode()
}

// Log returns the process's output so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

func (p *Proc) stop(mayEscalate bool) {
	t := p.t
	steps := []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGQUIT, 15 * time.Second}, {syscall.SIGTERM, 5 * time.Second}, {syscall.SIGABRT, 5 * time.Second}, {syscall.SIGKILL, 5 * time.Second}}
	for i, s := range steps {
		if p.Exited() {
			break
		}
		if i > 0 && !mayEscalate {
			t.Errorf("pid %d (%s) did not stop on %v; sending %v", p.Pid, baseName(p.cmd.Path), steps[i-1].sig, s.sig)
		}
		_ = syscall.Kill(p.Pid, s.sig)
		select {
		case <-p.done:
		case <-time.After(Timeout(s.wait)):
		}
	}
	if !p.Exited() {
		t.Errorf("pid %d survived SIGKILL", p.Pid)
	}
	if t.Failed() {
		t.Logf("--- tail of %s:\n%s", p.LogPath, tail(p.Log(), 60))
	}
}

func tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// Track registers a pid the test learned (a worker, a new master) and
// starts a check at cleanup: by then the process must be gone within a
// bounded wait; if not, it is killed by pid and the test fails with
// "leaked process". The process's start time is recorded so that a
// reused pid is not mistaken for it.
func Track(t testing.TB, pid int) {
	t.Helper()
	start, ok := startTime(pid)
	if !ok {
		return // already gone
	}
	t.Cleanup(func() {
		alive := func() error {
			if processAlive(pid, start) {
				return fmt.Errorf("pid %d still running", pid)
			}
			return nil
		}
		if Poll(Timeout(10*time.Second), alive) != nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("leaked process: pid %d outlived the test's cleanup; killed it", pid)
		}
	})
}

// startTime reads field 22 of /proc/pid/stat (the start time in ticks).
func startTime(pid int) (string, bool) {
	f, state, ok := statFields(pid)
	if !ok || state == "Z" || len(f) < 20 {
		return "", false
	}
	return f[19], true
}

// processAlive reports whether pid is the process that started at start
// and is not a zombie. A zombie that is the test binary's child (it was
// re-parented to the subreaper) is reaped.
func processAlive(pid int, start string) bool {
	f, state, ok := statFields(pid)
	if !ok || len(f) < 20 || f[19] != start {
		return false
	}
	if state == "Z" {
		if f[1] == strconv.Itoa(os.Getpid()) {
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
		return false
	}
	return true
}

// statFields returns the fields of /proc/pid/stat after the command name
// (state is f[0], ppid f[1], start time f[19]).
func statFields(pid int) (f []string, state string, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, "", false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil, "", false
	}
	f = strings.Fields(s[i+1:])
	if len(f) == 0 {
		return nil, "", false
	}
	return f, f[0], true
}

// ProcStat returns pid's parent pid and state letter ("Z" for a zombie)
// from /proc; ok is false once it is gone.
func ProcStat(pid int) (ppid int, state string, ok bool) {
	f, state, ok := statFields(pid)
	if !ok || len(f) < 2 {
		return 0, "", false
	}
	ppid, _ = strconv.Atoi(f[1])
	return ppid, state, true
}

// Alive reports whether pid runs (and is not a zombie).
func Alive(pid int) bool {
	_, state, ok := statFields(pid)
	return ok && state != "Z"
}

// StopPID stops a process the test did not start itself but must not
// leave behind (a new master started by an upgrade): QUIT, then TERM,
// then KILL, each with a bounded wait, by pid. It returns the signal that
// finally stopped it (0 if it was already gone). A zombie child of the
// test binary (re-parented to the subreaper) is reaped.
func StopPID(pid int, wait time.Duration) syscall.Signal {
	start, ok := startTime(pid)
	if !ok {
		return 0
	}
	gone := func() error {
		if processAlive(pid, start) {
			return fmt.Errorf("pid %d alive", pid)
		}
		return nil
	}
	for _, sig := range []syscall.Signal{syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGKILL} {
		_ = syscall.Kill(pid, sig)
		if Poll(Timeout(wait), gone) == nil {
			return sig
		}
	}
	return syscall.SIGKILL
}

// CPUTicks returns pid's user plus system CPU time so far, in clock ticks
// (utime + stime of /proc/pid/stat; 100 a second on Linux).
func CPUTicks(pid int) (int, bool) {
	f, _, ok := statFields(pid)
	if !ok || len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.Atoi(f[11])
	s, err2 := strconv.Atoi(f[12])
	return u + s, err1 == nil && err2 == nil
}
