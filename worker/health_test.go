package worker

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestServeHTTP_AnswersTheHealthSocket: ServeHTTP serves the private
// health socket (MOLT_HEALTH_FD) with the app's handler, takes the
// variable out of the environment, and still drains cleanly.
func TestServeHTTP_AnswersTheHealthSocket(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	t.Setenv(EnvDrainTimeout, "5s")
	healthOnce = sync.Once{}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	master := os.NewFile(uintptr(fds[0]), "master")
	defer master.Close()
	t.Setenv(EnvHealthFD, strconv.Itoa(fds[1]))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			w.WriteHeader(http.StatusTeapot)
		}
	})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- serveHTTP(ctx, srv, nil, []net.Listener{ln}) }()

	master.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprint(master, "GET /healthz HTTP/1.1\r\nHost: molt-health\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(master), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTeapot {
		t.Errorf("health answer %d, want the handler's 418", resp.StatusCode)
	}
	if _, ok := os.LookupEnv(EnvHealthFD); ok {
		t.Errorf("%s still in the environment", EnvHealthFD)
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeHTTP: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeHTTP did not return after the drain")
	}
}

// TestTakeHealth_NotASocket: a variable naming an fd that is no stream
// socket gives no health listener (and takes nothing over).
func TestTakeHealth_NotASocket(t *testing.T) {
	healthOnce = sync.Once{}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	t.Setenv(EnvHealthFD, strconv.Itoa(int(r.Fd())))
	if ln := takeHealth(); ln != nil {
		t.Errorf("a pipe was taken as the health socket")
	}
	if _, err := r.Stat(); err != nil {
		t.Errorf("the pipe was closed: %v", err)
	}
}
