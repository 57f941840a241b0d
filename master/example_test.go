package master_test

import (
	"context"
	"fmt"
	"net/http"
	"os"

	"github.com/molt-server/molt/master"
	"github.com/molt-server/molt/worker"
)

// A Go program that embeds the master: the same binary is master and, re-
// executed by it, worker. (Compile-only: a process may run one master.)
func Example() {
	isWorker, err := master.RunChild()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(127)
	}
	if isWorker {
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, "hello from worker", os.Getpid())
		})}
		if err := worker.ServeHTTP(context.Background(), srv); err != nil {
			os.Exit(1)
		}
		return
	}
	specs, _ := master.ParseListeners([]string{"127.0.0.1:8080"})
	err = master.Run(context.Background(), master.Config{Listeners: specs, Workers: 2})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
