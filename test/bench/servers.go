package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

// budget is the fixed CPU budget: the server processes run on one set of
// CPUs, the load generator on another (taskset -c LIST); both lists are
// taken from the bench's own affinity mask.
type budget struct {
	server, load string // taskset CPU lists; "" when not pinned
	serverCPUs   int    // the CPUs the server may use: runtime.NumCPU() of molt
	note         string // for RESULTS.md
}

func cpuBudget() budget {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return budget{serverCPUs: 1, note: fmt.Sprintf("the affinity mask could not be read (%v): server and load generator share every core, unpinned", err)}
	}
	var cpus []int
	for i := range 8 * 1024 {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return budget{serverCPUs: len(cpus), note: "taskset was not found: server and load generator share every core, unpinned"}
	}
	if len(cpus) < 2 {
		return budget{serverCPUs: len(cpus), note: fmt.Sprintf("the affinity mask allows %d CPU: server and load generator share it, unpinned", len(cpus))}
	}
	b := budget{server: strconv.Itoa(cpus[0]), load: strconv.Itoa(cpus[1]), serverCPUs: 1}
	b.note = fmt.Sprintf("Fixed CPU budget: every server process (molt's keeper, masters and workers; the bare apps; nginx) runs on CPU %s (`taskset -c %s`), the load generator (`molt drill`) and the bench itself on CPU %s (`taskset -c %s`)", b.server, b.server, b.load, b.load)
	if len(cpus) > 2 {
		b.note += fmt.Sprintf("; the other %d CPUs of the affinity mask are left unused", len(cpus)-2)
	}
	return b
}

// pinSelf moves every thread of the bench onto the load generator's CPUs
// (threads started later inherit it), so that its own polling never runs
// on the server's CPU.
func (c budget) pinSelf() {
	if c.load == "" {
		return
	}
	n, _ := strconv.Atoi(c.load)
	var set unix.CPUSet
	set.Set(n)
	tasks, _ := filepath.Glob("/proc/self/task/*")
	for _, t := range tasks {
		if tid, err := strconv.Atoi(filepath.Base(t)); err == nil {
			_ = unix.SchedSetaffinity(tid, &set)
		}
	}
}

// command builds name args pinned to the CPU list cpus (none if "") and
// the line for the results' "how" section.
func command(ctx context.Context, cpus, name string, args ...string) (*exec.Cmd, string) {
	shown := filepath.Base(name) + " " + strings.Join(args, " ")
	if cpus != "" {
		args = append([]string{"-c", cpus, name}, args...)
		name = "taskset"
		shown = "taskset -c " + cpus + " " + shown
	}
	return exec.CommandContext(ctx, name, args...), shown
}

// server is what the bench measures: a molt (keeper or master), bare demo
// processes, or nginx.
type server struct {
	kind    string // "molt", "bare" or "nginx"
	dir     string
	addr    string
	pidFile string // molt and nginx: names the current master
	log     string
	procs   []*exec.Cmd
	keeper  int    // molt with its keeper: the keeper's pid
	metrics string // molt: its --metrics-listen address
}

func (s *server) masterPid() int {
	b, _ := os.ReadFile(s.pidFile)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// workerPids are the processes that serve: molt's and nginx's workers
// (the current master's children), or the bare processes.
func (s *server) workerPids() []int {
	if s.kind == "bare" {
		var pids []int
		for _, c := range s.procs {
			pids = append(pids, c.Process.Pid)
		}
		return pids
	}
	return test.Children(s.masterPid())
}

// copyMolt copies the molt binary into a directory of its own (an
// upgrade re-executes that path).
func (b *bench) copyMolt() string {
	dir, err := os.MkdirTemp("", "molt-bench")
	if err != nil {
		fail(err)
	}
	data, err := os.ReadFile(b.molt)
	if err != nil {
		fail(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "molt"), data, 0o755); err != nil {
		fail(err)
	}
	return dir
}

// moltOpts: workers 0 is molt's default count; keeper false runs the
// master alone (--no-keeper).
type moltOpts struct {
	workers   int
	keeper    bool
	probation string // default 200ms
}

// startMolt starts "molt run" with the demo app on a free port, pinned to
// the server's CPUs, and waits until every worker is ready.
func (b *bench) startMolt(o moltOpts) *server {
	dir := b.copyMolt()
	s := &server{kind: "molt", dir: dir, addr: freeAddr(), pidFile: filepath.Join(dir, "molt.pid"), log: filepath.Join(dir, "molt.log")}
	args := []string{"run"}
	if !o.keeper {
		args = append(args, "--no-keeper")
	}
	args = append(args, "--listen", s.addr)
	want := b.cpu.serverCPUs // molt's default: runtime.NumCPU() under its affinity
	if o.workers > 0 {
		args = append(args, "--workers", strconv.Itoa(o.workers))
		want = o.workers
	}
	if o.probation == "" {
		o.probation = "200ms"
	}
	// The metrics endpoint is on, as an operator would run it: the
	// memory figure includes it (the master's loop publishes a snapshot
	// per event; nothing of it is on the request path).
	s.metrics = freeAddr()
	args = append(args, "--pid-file", s.pidFile, "--log-file", s.log, "--log-json", "--probation", o.probation,
		"--metrics-listen", s.metrics)
	cmd, shown := command(context.Background(), b.cpu.server, filepath.Join(dir, "molt"), args...)
	b.note(shown)
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		fail(err)
	}
	s.procs = []*exec.Cmd{cmd}
	if o.keeper {
		s.keeper = cmd.Process.Pid
	}
	s.waitServing(func() error {
		if len(test.Find(s.log, test.Event("master.serving"))) == 0 {
			return errors.New("no master.serving in the log")
		}
		if n := len(s.workerPids()); n != want {
			return fmt.Errorf("%d workers, want %d", n, want)
		}
		return nil
	})
	return s
}

// startBare starts n "molt demo" processes on one port (--reuseport when
// reuse), pinned to the server's CPUs, and waits until each answers.
func (b *bench) startBare(n int, reuse bool) *server {
	s := &server{kind: "bare", addr: freeAddr()}
	args := []string{"demo", "--listen", s.addr}
	if reuse {
		args = []string{"demo", "--reuseport", "--listen", s.addr}
	}
	for range n {
		cmd, shown := command(context.Background(), b.cpu.server, b.molt, args...)
		b.note(shown)
		if err := cmd.Start(); err != nil {
			fail(err)
		}
		s.procs = append(s.procs, cmd)
	}
	// Each process binds its own socket: wait until new connections have
	// reached every one of them (they spread by the client's port).
	seen := map[int]bool{}
	s.waitServing(func() error {
		r, err := test.Get(s.addr, "/", 2*time.Second)
		if err != nil {
			return err
		}
		seen[r.WorkerPid()] = true
		for _, pid := range s.workerPids() {
			if !seen[pid] {
				return fmt.Errorf("process %d has not answered yet", pid)
			}
		}
		return nil
	})
	return s
}

// waitServing waits until GET / answers and ready says so.
func (s *server) waitServing(ready func() error) {
	err := test.Poll(60*time.Second, func() error {
		r, err := test.Get(s.addr, "/", 2*time.Second)
		if err != nil {
			return err
		}
		if r.Status != 200 {
			return fmt.Errorf("status %d", r.Status)
		}
		return ready()
	})
	if err != nil {
		fail(fmt.Errorf("%s on %s not serving after 60s: %w (see %s)", s.kind, s.addr, err, s.dir))
	}
}

// stop ends the server: QUIT to the keeper or the current master (nginx:
// and an old master still there), TERM to bare processes, and a bounded
// wait for every one of them.
func (s *server) stop() {
	var pids []int
	switch {
	case s.keeper != 0:
		pids = append(pids, s.keeper, s.masterPid())
		_ = syscall.Kill(s.keeper, syscall.SIGQUIT)
	case s.pidFile != "":
		pids = append(pids, s.masterPid())
		if s.kind == "nginx" {
			if b, err := os.ReadFile(s.pidFile + ".oldbin"); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
					pids = append(pids, pid)
				}
			}
		}
		for _, pid := range pids {
			if pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGQUIT)
			}
		}
	default:
		for _, c := range s.procs {
			pids = append(pids, c.Process.Pid)
			_ = c.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, c := range s.procs {
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(40 * time.Second):
			_ = c.Process.Kill()
		}
	}
	for _, pid := range pids { // a master started by an upgrade is not our child
		if pid > 1 && test.Alive(pid) {
			test.StopPID(pid, 40*time.Second)
		}
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// nginxBinary is the nginx to compare with: flag (-nginx) if given, else
// Debian's, if installed.
func nginxBinary(flag string) (string, error) {
	switch flag {
	case "none":
		return "", errors.New("-nginx none")
	case "":
		if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
			return "/usr/sbin/nginx", nil
		}
		if p, err := exec.LookPath("nginx"); err == nil {
			return p, nil
		}
		return "", errors.New("nginx is not installed (Debian: apt-get install nginx-light)")
	}
	if _, err := os.Stat(flag); err != nil {
		return "", fmt.Errorf("-nginx %s: %w", flag, err)
	}
	return flag, nil
}

// nginxConf is the reference server: a fixed answer naming the worker.
const nginxConf = `daemon on;
worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    server {
        listen %[2]s;
        location / {
            add_header X-Nginx-Pid $pid always;
            return 200 "ok\n";
        }
    }
}
`

// startNginx starts nginx (2 workers, its files in a temp dir) pinned to
// the server's CPUs.
func (b *bench) startNginx(bin string) (*server, error) {
	dir, err := os.MkdirTemp("", "molt-bench-nginx")
	if err != nil {
		return nil, err
	}
	s := &server{kind: "nginx", dir: dir, addr: freeAddr(), pidFile: filepath.Join(dir, "nginx.pid"), log: filepath.Join(dir, "error.log")}
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(nginxConf, dir, s.addr)), 0o644); err != nil {
		return nil, err
	}
	// daemon on: the process started forks the master and exits.
	cmd, shown := command(context.Background(), b.cpu.server, bin, "-p", dir, "-c", conf, "-e", s.log)
	b.note(shown + "   # nginx.conf: 2 workers, `add_header X-Nginx-Pid $pid always; return 200 \"ok\\n\";`")
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %w: %s", shown, err, out)
	}
	s.waitServing(func() error {
		if n := len(s.workerPids()); n != 2 {
			return fmt.Errorf("nginx master %d has %d workers, want 2", s.masterPid(), n)
		}
		return nil
	})
	return s, nil
}

// retireOldNginx does the second half of nginx's binary upgrade for each
// USR2 the drill sends, until ctx ends: once the new master's workers
// answer, QUIT the old master, and wait until it is gone (so that the
// next upgrade can happen). It runs in the bench, on the load
// generator's CPU, polling every 2 ms. It returns how many it retired.
func retireOldNginx(ctx context.Context, s *server) (retired int, err error) {
	// poll calls f every 2 ms until it is true, for at most d.
	poll := func(d time.Duration, f func() bool) bool {
		deadline := time.Now().Add(d)
		for ctx.Err() == nil && time.Now().Before(deadline) {
			if f() {
				return true
			}
			time.Sleep(2 * time.Millisecond)
		}
		return false
	}
	for {
		old := s.masterPid()
		var next int
		// Wait for the drill's next USR2: the new master writes its pid.
		for !poll(time.Minute, func() bool { next = s.masterPid(); return next > 1 && next != old }) {
			if ctx.Err() != nil {
				return retired, nil
			}
		}
		serves := poll(10*time.Second, func() bool {
			r, err := test.Get(s.addr, "/", time.Second)
			if err != nil {
				return false
			}
			pid, _ := strconv.Atoi(r.Header.Get("X-Nginx-Pid"))
			for _, w := range test.Children(next) {
				if w == pid {
					return true
				}
			}
			return false
		})
		if !serves {
			return retired, fmt.Errorf("nginx: the new master %d did not serve within 10 s of its start", next)
		}
		_ = syscall.Kill(old, syscall.SIGQUIT)
		if !poll(20*time.Second, func() bool { return !test.Alive(old) }) {
			return retired, fmt.Errorf("nginx: the old master %d still there 20 s after QUIT", old)
		}
		retired++
	}
}
