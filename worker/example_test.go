package worker_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"

	"github.com/molt-server/molt/worker"
)

// A whole worker: under molt (or systemd socket activation) it serves on
// the listener called "web", reports ready, and drains without dropping a
// request when asked to stop. (Compile-only: it needs inherited sockets.)
func ExampleServeHTTP() {
	ln, err := worker.Listener("web")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from worker %d\n", os.Getpid())
	})}
	if err := worker.ServeHTTP(context.Background(), srv, ln); err != nil {
		log.Fatal(err)
	}
}
