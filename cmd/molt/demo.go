package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// envDemoLogJSON tells the demo app to log JSON lines like its master.
const envDemoLogJSON = "MOLT_DEMO_LOG_JSON"

// envDemoMaxRequests makes each demo worker ask to be recycled after that
// many requests (worker.RecycleAfter); set it with --env.
const envDemoMaxRequests = "MOLT_DEMO_MAX_REQUESTS"

// maxDemoSleep bounds GET /sleep?ms=N.
const maxDemoSleep = time.Minute

// runDemo is the built-in demo app: what workers run when "molt run" has
// no COMMAND. It serves through the worker package, as any Go app would.
func runDemo(lns ...net.Listener) int {
	log := hclog.New(&hclog.LoggerOptions{
		Name:       fmt.Sprintf("demo.%s", os.Getenv(worker.EnvWorker)),
		Output:     os.Stderr,
		JSONFormat: os.Getenv(envDemoLogJSON) == "1",
	})
	h := demoHandler()
	if v := os.Getenv(envDemoMaxRequests); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			log.Error("bad "+envDemoMaxRequests+"; want a positive number", "event", "demo.refused", "value", v)
			return exitUsage
		}
		h = worker.RecycleAfter(n, h)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if err := worker.ServeHTTP(context.Background(), srv, lns...); err != nil {
		log.Error("demo app stopped", "event", "demo.stopped", "pid", os.Getpid(), "error", err)
		return exitFailure
	}
	return exitOK
}

const demoUsage = `Usage: molt demo --listen ADDR [--reuseport]

Runs the built-in demo app (what workers run without COMMAND) alone, in
this process, without a master: to compare with the same app under molt
(make bench does). Several "molt demo --reuseport" on one address share it
through SO_REUSEPORT. TERM, INT or QUIT drain it and end it.

Flags:
`

// cmdDemo is "molt demo": the demo app on a listener of its own.
func cmdDemo(args []string) int {
	fs := flag.NewFlagSet("molt demo", flag.ContinueOnError)
	addr := fs.String("listen", defaultListen, "`ADDR` to listen on (host:port)")
	reuse := fs.Bool("reuseport", false, "set SO_REUSEPORT, so that several processes listen on one address")
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, demoUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	lc := net.ListenConfig{}
	if *reuse {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt demo:", err)
		return exitBind
	}
	fmt.Fprintf(os.Stderr, "molt demo: pid %d listening on %s\n", os.Getpid(), ln.Addr())
	return runDemo(ln)
}

// demoHandler answers GET / with the worker's identity and GET
// /sleep?ms=N after sleeping N milliseconds (for drain tests).
func demoHandler() http.Handler {
	mux := http.NewServeMux()
	pid := strconv.Itoa(os.Getpid())
	master := os.Getenv(worker.EnvMasterPID)
	identify := func(w http.ResponseWriter) {
		w.Header().Set("X-Molt-Worker-Pid", pid)
		w.Header().Set("X-Molt-Master-Pid", master)
		w.Header().Set("X-Molt-Version", version())
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	}
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		identify(w)
		fmt.Fprintf(w, "molt demo: worker %s of master %s, version %s\n", pid, master, version())
	})
	mux.HandleFunc("GET /sleep", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || time.Duration(ms)*time.Millisecond > maxDemoSleep {
			http.Error(w, "want /sleep?ms=N with 0 <= N <= 60000", http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		identify(w)
		fmt.Fprintf(w, "slept %dms in worker %s\n", ms, pid)
	})
	return mux
}
