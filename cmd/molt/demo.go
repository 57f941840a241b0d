package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/worker"
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
func runDemo() int {
	log := hclog.New(&hclog.LoggerOptions{
		Name:       fmt.Sprintf("demo.%s", os.Getenv(worker.EnvWorker)),
		Output:     os.Stderr,
		JSONFormat: os.Getenv(envDemoLogJSON) == "1",
	})
	h := demoHandler()
	if v := os.Getenv(envDemoMaxRequests); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			log.Error("bad "+envDemoMaxRequests+"; want a positive number", "value", v)
			return exitUsage
		}
		h = worker.RecycleAfter(n, h)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if err := worker.ServeHTTP(context.Background(), srv); err != nil {
		log.Error("demo app stopped", "pid", os.Getpid(), "error", err)
		return exitFailure
	}
	return exitOK
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
