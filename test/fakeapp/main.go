// Command fakeapp is the test fixture app: one binary, its mode the first
// argument. It is an app like any other and uses only the worker package.
// Failure modes never accept a connection they will not answer: they
// close their copies of the listeners first, so the tests' "zero failed
// requests" stays exact.
//
//	fakeapp serve [--report DIR] [--tamper] [--no-notify] [--ignore-stop]
//	              [--ready-file PATH] [--hit-file PATH] [--exit-after DUR]
//	              [--misuse shutdown:PATH|blocking:PATH]
//	              [--health-status CODE] [--health-plant] [--status CODE] [--delay DUR]
//	              [--lie-stats 5xx:PATH|fast:PATH]
//	fakeapp crash | exit0 | hang
//
// serve answers GET / with 200 and X-Molt-Worker-Pid, X-Molt-Master-Pid,
// X-Fakeapp-Names (LISTEN_FDNAMES) and the listener name in
// X-Fakeapp-Listener; GET /sleep?ms=N answers after N ms. --report writes
// DIR/<pid>.json (fds, their flags, environment, NoNewPrivs) before
// anything else; --tamper first attacks every file it can write to (see
// tamper) and reports what it did in the report's Tampered;
// --ready-file appends the pid to PATH once ready; --hit-file appends
// "<pid> <path>" when a /sleep request starts; --misuse makes the first
// worker to create PATH, once it serves, shut the shared listening sockets
// down, or switch them to blocking mode every 100 ms for 3 s (other Go
// workers starting would switch it back), and then write "done" to PATH.
// --status answers every request with CODE once ready (a release that
// serves errors), --delay answers every request after DUR (a slow one).
// --health-status answers GET /healthz with CODE (a release whose
// health check fails while it serves everything else); --health-plant
// never serves the master's private health socket (MOLT_HEALTH_FD) and
// instead answers 200 on sockets it binds where a master might look by
// name (beside its notify socket, in its working directory).
// --lie-stats makes the first worker to create PATH a liar about its
// traffic, as a compromised worker would be: it sends no true figures,
// and every second a MOLT_STATS= report of a huge and growing count of
// 5xx, all in the histogram's last bucket (5xx), or of 2xx, all in its
// first (fast); it serves like the others.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet("fakeapp "+mode, flag.ExitOnError)
	report := fs.String("report", "", "write DIR/<pid>.json first")
	noNotify := fs.Bool("no-notify", false, "never send READY=1")
	ignoreStop := fs.Bool("ignore-stop", false, "ignore the stop signal")
	readyFile := fs.String("ready-file", "", "append the pid to PATH when ready")
	hitFile := fs.String("hit-file", "", "append '<pid> <path>' to PATH when /sleep starts")
	exitAfter := fs.Duration("exit-after", 0, "drain and exit 1 after DUR (a worker that dies on its own, without dropping a request)")
	misuse := fs.String("misuse", "", "shutdown:PATH or blocking:PATH: the first worker to create PATH does that to the listeners")
	doTamper := fs.Bool("tamper", false, "forge a molt log line into, and truncate, every file it holds or can open for writing")
	fs.IntVar(&answer.status, "status", 200, "answer every request with this status")
	fs.DurationVar(&answer.delay, "delay", 0, "answer every request after DUR")
	fs.IntVar(&healthStatus, "health-status", 0, "answer GET /healthz with CODE")
	plant := fs.Bool("health-plant", false, "close MOLT_HEALTH_FD and answer 200 on sockets planted by name instead")
	lie := fs.String("lie-stats", "", "5xx:PATH or fast:PATH: the first worker to create PATH reports huge counts of slow 5xx, or of fast 2xx, instead of its figures")
	fs.Parse(os.Args[2:])
	if *lie != "" {
		lieStats(*lie)
	}
	if *plant {
		plantHealth()
	}
	var tampered []string
	if *doTamper {
		tampered = tamper()
	}
	if *report != "" {
		// Before anything else opens an fd: the report is the fd set the
		// process was started with.
		if err := writeReport(*report, tampered); err != nil {
			fmt.Fprintln(os.Stderr, "fakeapp: report:", err)
			os.Exit(3)
		}
	}
	switch mode {
	case "serve":
		os.Exit(serve(*noNotify, *ignoreStop, *readyFile, *hitFile, *misuse, *exitAfter))
	case "crash", "exit0", "hang":
		closeListeners()
		switch mode {
		case "crash":
			fmt.Fprintln(os.Stderr, "fakeapp: crashing on purpose")
			os.Exit(1)
		case "exit0":
			os.Exit(0)
		}
		select {} // hang: never ready, never serving; killed by the master
	}
	usage()
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: fakeapp serve|crash|exit0|hang [flags]")
	os.Exit(2)
}

// closeListeners closes this process's copies of the inherited sockets.
func closeListeners() {
	fs, _ := worker.Files()
	for _, f := range fs {
		f.Close()
	}
}

// fdInfo is one open descriptor of the process at start.
type fdInfo struct {
	FD       int
	Target   string
	NonBlock bool
	CloExec  bool
}

// report is what --report writes.
type report struct {
	Pid    int
	FDs    []fdInfo
	Env    []string
	Cwd    string
	Umask  string // as /proc/self/status shows it, e.g. "0027"
	Uid    int
	Gid    int
	Groups []int
	// NoNewPrivs is /proc/self/status's NoNewPrivs: "1" or "0".
	NoNewPrivs string
	// Tampered is what --tamper did: "fd N TARGET: ..." lines.
	Tampered []string
	// GOMAXPROCS is runtime.GOMAXPROCS(0): what the Go runtime made of
	// the environment.
	GOMAXPROCS int
}

// forged is a line made to pass for one of molt's JSON log lines.
const forged = `{"@level":"info","@message":"serving","@module":"molt.master","event":"fakeapp.forged","forged":"by a worker"}` + "\n"

// tamper attacks, as a compromised worker would, every regular file it
// holds a write descriptor on (its stdout and stderr among them): it
// writes a forged molt log line and truncates it. It also tries to open,
// for writing, each of its own fds' files by path (/proc/self/fd/N) and
// each of the master's (/proc/MASTER/fd/N). It returns what happened.
func tamper() []string {
	var out []string
	try := func(what string, err error) string {
		if err != nil {
			return what + " failed: " + err.Error()
		}
		return what + " ok"
	}
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		var st unix.Stat_t
		if err != nil || unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_ACCMODE == unix.O_RDONLY {
			continue
		}
		_, werr := unix.Write(fd, []byte(forged))
		terr := unix.Ftruncate(fd, 0)
		out = append(out, fmt.Sprintf("fd %d %s: %s, %s", fd, target, try("write", werr), try("truncate", terr)))
	}
	paths, _ := filepath.Glob("/proc/self/fd/*")
	if m := os.Getenv(worker.EnvMasterPID); m != "" {
		more, _ := filepath.Glob("/proc/" + m + "/fd/*")
		paths = append(paths, more...)
	}
	for _, p := range paths {
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, "/") || strings.HasPrefix(target, "/dev/") {
			continue
		}
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err == nil {
			_, err = f.WriteString(forged)
			if err == nil {
				err = f.Truncate(0)
			}
			f.Close()
		}
		out = append(out, fmt.Sprintf("open %s (%s): %s", p, target, try("write and truncate", err)))
	}
	return out
}

func writeReport(dir string, tampered []string) error {
	r := report{Tampered: tampered, GOMAXPROCS: runtime.GOMAXPROCS(0)}
	r.Pid = os.Getpid()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the fd ReadDir itself used, closed by now
		}
		fl, err1 := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		fdfl, err2 := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err1 != nil || err2 != nil {
			continue
		}
		r.FDs = append(r.FDs, fdInfo{FD: fd, Target: target, NonBlock: fl&unix.O_NONBLOCK != 0, CloExec: fdfl&unix.FD_CLOEXEC != 0})
	}
	r.Env = os.Environ()
	r.Cwd, _ = os.Getwd()
	r.Uid, r.Gid = os.Getuid(), os.Getgid()
	r.Groups, _ = os.Getgroups()
	if st, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(line, "Umask:"); ok {
				r.Umask = strings.TrimSpace(v)
			}
			if v, ok := strings.CutPrefix(line, "NoNewPrivs:"); ok {
				r.NoNewPrivs = strings.TrimSpace(v)
			}
		}
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, fmt.Sprintf(".%d.tmp", r.Pid))
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, fmt.Sprintf("%d.json", r.Pid)))
}

// lieStats: if this worker is the first to create PATH of spec
// (KIND:PATH), it turns its true figures off and reports, every second
// from now, 10^12 more requests than the second before (cumulative, so
// the master takes each report): 5xx in the histogram's last bucket, or
// (fast) 2xx in its first.
func lieStats(spec string) {
	kind, path, _ := strings.Cut(spec, ":")
	class, bucket := worker.Class5xx, worker.NumBuckets-1
	switch kind {
	case "5xx":
	case "fast":
		class, bucket = worker.Class2xx, 0
	default:
		fmt.Fprintln(os.Stderr, "fakeapp: --lie-stats wants 5xx:PATH or fast:PATH")
		os.Exit(2)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return
	}
	fmt.Fprintln(f, os.Getpid())
	f.Close()
	os.Setenv(worker.EnvStats, "off")
	go func() {
		var s worker.Stats
		for k := uint64(1); ; k++ {
			s.Classes[class] = k * 1_000_000_000_000
			s.Buckets[bucket] = s.Classes[class]
			_ = worker.Notify(worker.NotifyStatsKey + "=" + s.Format())
			time.Sleep(worker.StatsInterval)
		}
	}()
}

// answer is how serve answers every request (--status, --delay).
var answer struct {
	status int
	delay  time.Duration
}

var appendMu sync.Mutex

func appendLine(path, line string) {
	appendMu.Lock()
	defer appendMu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	f.WriteString(line + "\n")
}

func serve(noNotify, ignoreStop bool, readyFile, hitFile, misuse string, exitAfter time.Duration) int {
	all, err := worker.Listeners()
	if err != nil || len(all) == 0 {
		fmt.Fprintln(os.Stderr, "fakeapp: no listeners:", err)
		return 1
	}
	pid := strconv.Itoa(os.Getpid())
	handler := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Molt-Worker-Pid", pid)
			w.Header().Set("X-Molt-Master-Pid", os.Getenv(worker.EnvMasterPID))
			w.Header().Set("X-Fakeapp-Names", os.Getenv(worker.EnvListenFDNames))
			w.Header().Set("X-Fakeapp-Listener", name)
			code := answer.status
			if r.URL.Path == "/healthz" && healthStatus != 0 {
				code = healthStatus
			}
			if r.URL.Path == "/sleep" {
				if hitFile != "" {
					appendLine(hitFile, pid+" "+r.URL.String())
				}
				ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
				time.Sleep(time.Duration(ms) * time.Millisecond)
			}
			if answer.delay > 0 {
				time.Sleep(answer.delay)
			}
			w.WriteHeader(code)
			fmt.Fprintf(w, "fakeapp %s\n", pid)
		})
	}
	if noNotify {
		// Serve without ever saying READY=1 (the master's --ready=delay
		// decides), but still drain on the stop signal.
		os.Setenv(worker.EnvNotifySocket, "")
	}
	if ignoreStop {
		signal.Ignore(stopSignal())
		// Serve until killed; the master's drain timeout must do it.
		errC := make(chan error, len(all))
		for name, lns := range all {
			for _, ln := range lns {
				go func(ln net.Listener) { errC <- http.Serve(ln, handler(name)) }(ln)
			}
		}
		if !noNotify {
			worker.Ready()
		}
		markReady(readyFile, pid)
		<-errC
		return 1
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(all))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if exitAfter > 0 {
		// ServeHTTP drains on ctx like on the stop signal: the exit drops
		// nothing, which keeps "zero failed requests" exact.
		time.AfterFunc(exitAfter, cancel)
	}
	for name, lns := range all {
		srv := &http.Server{Handler: handler(name), ReadHeaderTimeout: 10 * time.Second}
		wg.Add(1)
		// One ServeHTTP per listener name; each sends READY=1, and the
		// master counts the first.
		go func(lns []net.Listener) {
			defer wg.Done()
			errs <- worker.ServeHTTP(ctx, srv, lns...)
			cancel() // one server stopping stops them all
		}(lns)
	}
	markReady(readyFile, pid)
	misused := make(chan struct{})
	if misuse != "" {
		go func() {
			defer close(misused)
			misuseListeners(misuse)
		}()
	} else {
		close(misused)
	}
	wg.Wait()
	// A shutdown ends the servers at once: the misuse must still get to
	// write its "done" before the process exits.
	select {
	case <-misused:
	case <-time.After(10 * time.Second):
	}
	close(errs)
	for err := range errs {
		if err != nil {
			fmt.Fprintln(os.Stderr, "fakeapp:", err)
			return 1
		}
	}
	if exitAfter > 0 {
		fmt.Fprintln(os.Stderr, "fakeapp: exiting on purpose after", exitAfter)
		return 1
	}
	return 0
}

// misuseListeners does KIND (shutdown, blocking) to the shared listening
// sockets, if this is the first worker to create PATH (spec KIND:PATH).
func misuseListeners(spec string) {
	kind, path, _ := strings.Cut(spec, ":")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return // another worker did, or will
	}
	defer f.Close()
	fs, _ := worker.Files()
	do := func() {
		for _, lf := range fs {
			raw, err := lf.SyscallConn()
			if err != nil {
				continue
			}
			raw.Control(func(fd uintptr) {
				switch kind {
				case "shutdown":
					unix.Shutdown(int(fd), unix.SHUT_RD)
				case "blocking":
					unix.SetNonblock(int(fd), false)
				}
			})
		}
	}
	do()
	if kind == "blocking" {
		for range 30 {
			time.Sleep(100 * time.Millisecond)
			do()
		}
	}
	fmt.Fprintf(os.Stderr, "fakeapp: did %s to the listeners, on purpose\n", kind)
	f.WriteString("done")
}

func markReady(readyFile, pid string) {
	if readyFile != "" {
		appendLine(readyFile, pid)
	}
}

func stopSignal() os.Signal {
	s, err := worker.StopSignal()
	if err != nil {
		return unix.SIGTERM
	}
	return s
}

// healthStatus is --health-status: GET /healthz answers it (0: as any path).
var healthStatus int

// plantHealth (--health-plant) is a worker that would pass its health
// check by other means: it closes the private socket the master checks it
// on and answers 200 on unix sockets it binds by name instead.
func plantHealth() {
	if fd, err := strconv.Atoi(os.Getenv(worker.EnvHealthFD)); err == nil && fd > 2 {
		unix.Close(fd)
	}
	os.Unsetenv(worker.EnvHealthFD)
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "healthy") })
	for _, dir := range []string{filepath.Dir(os.Getenv(worker.EnvNotifySocket)), "."} {
		if ln, err := net.Listen("unix", filepath.Join(dir, "health")); err == nil {
			go http.Serve(ln, ok)
		}
	}
}
