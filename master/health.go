package master

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// The active health check (--health-check PATH, --health-check-cmd CMD).
// A new worker that says it is ready (READY=1, or its ready delay) is not
// counted ready yet: a goroutine checks it, bounded by the check's
// timeout, and sends the loop a healthDone. Passed, the worker is marked
// ready as usual; failed, it is treated as a worker not ready in time: it
// is stopped, its slot refilled with the crash-loop backoff, a reload
// fails, and an uncommitted new generation gives up, which rolls the
// upgrade back with the reason. So it gates every new worker: at the
// first start, after a crash, a recycling, a reload and an upgrade.
//
// The GET goes over a socket pair the master makes for each worker: the
// worker gets one end as MOLT_HEALTH_FD (not a listener, not counted in
// LISTEN_FDS), the master keeps the other. No name, no path, nothing in
// the file system: a worker cannot make the master connect anywhere else
// (DESIGN §7a), and each worker answers for itself, not whichever worker
// the shared listener would pick.

// healthSpec is the health check of a worker spec; zero means none.
type healthSpec struct {
	path    string // GET path on the worker's health socket
	cmd     string // run with /bin/sh -c
	timeout time.Duration
}

func (h healthSpec) on() bool { return h.path != "" || h.cmd != "" }

// maxHealthResponse bounds what the master reads of a health answer
// (status line and headers; the body is not read).
const maxHealthResponse = 64 << 10

// maxHealthOutput bounds what the master keeps of a check command's
// output, for the reason of a failure.
const maxHealthOutput = 512

// healthDone is the result of a worker's health check.
type healthDone struct {
	pid  int
	how  string // how it said it was ready (markReady's how)
	what string // the check, for logs: "GET /healthz", "command"
	err  error
	took time.Duration
}

func (e healthDone) String() string { return fmt.Sprintf("health check of pid %d: %v", e.pid, e.err) }

// checkHealthPath checks a --health-check PATH: an absolute path of
// printable ASCII without spaces, so that it forms one request line.
func checkHealthPath(path string) error {
	if path == "" {
		return nil
	}
	if path[0] != '/' || len(path) > 1024 {
		return fmt.Errorf("health check path %q: want an absolute path such as /healthz (at most 1024 bytes)", Printable(path))
	}
	for i := 0; i < len(path); i++ {
		if c := path[i]; c <= ' ' || c >= 0x7f {
			return fmt.Errorf("health check path %q: byte %d is a space, a control or a non-ASCII byte; percent-encode it", Printable(path), i)
		}
	}
	return nil
}

// healthPair makes the socket pair of a new worker's health check: the
// master's end as a net.Conn, the worker's as a file to pass (both
// close-on-exec; the spawn puts the worker's at its fd without it).
func healthPair() (net.Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("health socket pair: %w", err)
	}
	mine := os.NewFile(uintptr(fds[0]), "health")
	c, err := net.FileConn(mine)
	_ = mine.Close()
	if err != nil {
		_ = unix.Close(fds[1])
		return nil, nil, fmt.Errorf("health socket pair: %w", err)
	}
	return c, os.NewFile(uintptr(fds[1]), "health-worker"), nil
}

// startHealthCheck checks p, which said it is ready (how), in a
// goroutine; the loop gets a healthDone.
func (m *Master) startHealthCheck(p *proc, how string) {
	h := p.spec.health
	conn := p.health
	p.health, p.checking = nil, true
	pid, slot := p.pid, p.slot
	cred, dir, env, newPrivs := p.spec.credential, p.spec.dir, p.spec.env, p.spec.newPrivs
	m.log.Debug("health check", "event", "worker.health_check", "worker", slot, "pid", pid, "path", h.path, "command", h.cmd)
	go func() {
		start := time.Now()
		what, err := "", error(nil)
		if h.path != "" {
			what = "GET " + h.path
			if conn == nil {
				err = errors.New("no health socket")
			} else {
				err = getHealth(conn, h.path, h.timeout)
			}
		}
		if conn != nil {
			_ = conn.Close()
		}
		if err == nil && h.cmd != "" {
			what = "command"
			err = runHealthCmd(h.cmd, h.timeout, pid, slot, cred, dir, env, newPrivs)
		}
		m.send(healthDone{pid: pid, how: how, what: what, err: err, took: time.Since(start)})
	}()
}

// onHealthDone applies a health check's result to its worker, if it
// still waits for it.
func (m *Master) onHealthDone(ev healthDone) {
	p := m.procs[ev.pid]
	if p == nil || p.state != workerStarting || !p.checking {
		return // gone, stopping, or not ready in time meanwhile
	}
	p.checking = false
	if ev.err == nil {
		p.healthy = true
		m.log.Info("worker passed its health check", "event", "worker.health_passed", "worker", p.slot, "pid", p.pid, "check", ev.what, "took", ev.took.Round(time.Millisecond).String())
		m.markReady(p, ev.how)
		return
	}
	reason := fmt.Sprintf("health check %s on worker %d (pid %d): %v", ev.what, p.slot, p.pid, ev.err)
	m.log.Error("worker failed its health check; stopping it", "event", "worker.health_failed", "worker", p.slot, "pid", p.pid, "check", ev.what, "error", ev.err.Error(), "reason", reason)
	if s := m.slotOf(p); s != nil && s.pending {
		m.failReload(reason)
		return
	}
	m.stopWorker(p)
	if m.newUncommitted() {
		m.log.Error("upgrade: a new worker failed its health check; the new generation gives up", "event", "upgrade.health_failed", "worker", p.slot, "pid", p.pid, "reason", reason)
	}
	m.workerFailed(ExitHealthFailed, reason)
}

// getHealth sends GET path on conn and reads the answer's status line
// and headers, all within timeout: a 2xx passes.
func getHealth(conn net.Conn, path string, timeout time.Duration) error {
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	req := "GET " + path + " HTTP/1.1\r\nHost: molt-health\r\nUser-Agent: molt-health-check\r\nConnection: close\r\n\r\n"
	closed := errors.New("closed without an answer (does the app serve MOLT_HEALTH_FD? molt's worker.ServeHTTP does)")
	_, err := io.WriteString(conn, req)
	var resp *http.Response
	lr := &io.LimitedReader{R: conn, N: maxHealthResponse}
	if err == nil {
		resp, err = http.ReadResponse(bufio.NewReader(lr), nil)
	}
	switch {
	case err == nil:
	case lr.N == 0:
		return fmt.Errorf("answer longer than %d bytes before its body", maxHealthResponse)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("no answer within %v", timeout)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNRESET):
		return closed
	default:
		return fmt.Errorf("bad answer: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// runHealthCmd runs cmd with /bin/sh -c as the workers' user (cred; the
// check probes an untrusted worker and needs no more than it has), in
// the workers' directory and environment plus MOLT_WORKER_PID,
// MOLT_WORKER and MOLT_MASTER_PID, in a session of its own, bounded by
// timeout (then its whole group is killed). Exit 0 passes. Whatever the
// command left running in its group is killed once it exits: a check
// leaves nothing behind.
func runHealthCmd(cmd string, timeout time.Duration, pid, slot int, cred *syscall.Credential, dir string, env []string, newPrivs bool) error {
	// Pdeathsig and no_new_privs are the forking thread's: this one, kept
	// to itself and ended with the goroutine (no Unlock).
	runtime.LockOSThread()
	if !newPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c := exec.CommandContext(ctx, "/bin/sh", "-c", cmd)
	c.Env = mergeEnv(env, []string{
		"MOLT_WORKER_PID=" + strconv.Itoa(pid),
		worker.EnvWorker + "=" + strconv.Itoa(slot),
		worker.EnvMasterPID + "=" + strconv.Itoa(os.Getpid()),
	})
	c.Dir = dir
	var out limitedBuffer
	c.Stdout, c.Stderr = &out, &out
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: cred, Pdeathsig: syscall.SIGKILL}
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	c.WaitDelay = time.Second
	if err := c.Start(); err != nil {
		return err
	}
	// Wait for the shell's exit without reaping it: while it is a
	// zombie its pid, the group's id, is no one else's, so the kill
	// reaches only what the command left in its group (which would
	// also hold its output open until WaitDelay).
	for {
		var info unix.Siginfo
		if err := unix.Waitid(unix.P_PID, c.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil); err != unix.EINTR {
			break
		}
	}
	_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
	err := c.Wait()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("no result within %v", timeout)
	}
	if o := strings.TrimSpace(out.String()); o != "" {
		return fmt.Errorf("%v: %s", err, Printable(o))
	}
	return err
}

// limitedBuffer keeps the first maxHealthOutput bytes written to it.
type limitedBuffer struct{ b bytes.Buffer }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := maxHealthOutput - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return l.b.String() }
