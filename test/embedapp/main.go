// Command embedapp is a Go program that embeds molt's master: the same
// binary is master and, re-executed by it, worker. The integration tests
// run it to prove that embedding works end to end. It is the one test
// program allowed to import package master.
//
// Usage: embedapp --listen ADDR --pid-file PATH [--workers N] [--probation DUR]
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strconv"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master"
	"github.com/molt-server/molt/worker"
)

func main() {
	isWorker, err := master.RunChild()
	if err != nil {
		fmt.Fprintln(os.Stderr, "embedapp:", err)
		os.Exit(2)
	}
	if isWorker {
		os.Exit(serve())
	}
	listen := flag.String("listen", "127.0.0.1:0", "address")
	pidFile := flag.String("pid-file", "embedapp.pid", "pid file")
	workers := flag.Int("workers", 2, "workers")
	probation := flag.Duration("probation", master.DefaultProbation, "probation of an upgrade")
	flag.Parse()
	specs, err := master.ParseListeners([]string{*listen})
	if err != nil {
		fmt.Fprintln(os.Stderr, "embedapp:", err)
		os.Exit(2)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "embedapp", JSONFormat: true, Output: os.Stderr})
	err = master.Run(context.Background(), master.Config{
		Listeners: specs,
		Workers:   *workers,
		PIDFile:   *pidFile,
		Probation: *probation,
		Logger:    log,
		Version:   "embedapp",
	})
	if err != nil {
		log.Error("embedapp failed", "error", err)
		os.Exit(1)
	}
}

// serve is the worker side: the same program, answering as itself.
func serve() int {
	pid := strconv.Itoa(os.Getpid())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Molt-Worker-Pid", pid)
		w.Header().Set("X-Molt-Master-Pid", os.Getenv(worker.EnvMasterPID))
		w.Header().Set("X-Embedded", "yes")
		fmt.Fprintf(w, "embedapp worker %s\n", pid)
	})}
	if err := worker.ServeHTTP(context.Background(), srv); err != nil {
		fmt.Fprintln(os.Stderr, "embedapp worker:", err)
		return 1
	}
	return 0
}
