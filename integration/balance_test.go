package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// envTestBalance set to "off" runs TestBalance_* with the workers'
// balancing off (MOLT_ACCEPT_BALANCE=off): the status quo, which these
// tests must fail.
const envTestBalance = "MOLT_TEST_ACCEPT_BALANCE"

// TestBalance_KeepAliveConnectionsSpreadOverWorkers: 16 keep-alive
// connections, each sending one request, arrive while both workers of a
// generation are frozen (SIGSTOP) and pinned to one CPU; then both go on.
// Whichever runs first finds all 16 queued: without balancing it takes
// them all in one go (Go's accept loop drains the queue before the
// scheduler switches; with 32, the switch sometimes comes mid-burst), and
// its sibling none. With it, each worker answers a fair share. The bound
// (a quarter each, where balancing gives 7 to 9) leaves room for a loaded
// machine descheduling one worker for longer than the 20 ms a sibling
// waits for it.
func TestBalance_KeepAliveConnectionsSpreadOverWorkers(t *testing.T) {
	m, addr, workers := startSteady(t, 2, balanceArgs()...)
	checkFair(t, workers, burst(t, addr, workers, 16), 4)
	m.stop()
}

// TestBalance_AfterTTINAndAnUpgrade: a worker added by TTIN gets its
// share, and so do the workers of a new generation (as many: it inherits
// the count), which balance through a table of their own.
func TestBalance_AfterTTINAndAnUpgrade(t *testing.T) {
	m := start(t, runOpts{Deploy: byRename, Args: append([]string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}, balanceArgs()...)})
	addr := m.addr()
	m.waitServing()
	if err := syscall.Kill(m.Pid, syscall.SIGTTIN); err != nil {
		t.Fatal(err)
	}
	workers := m.waitWorkers(3)
	checkFair(t, workers, burst(t, addr, workers, 24), 4)
	nw := m.upgrade()
	waitWorkerCount(t, nw, 3)
	workers = workersOf(nw)
	checkFair(t, workers, burst(t, addr, workers, 24), 4)
	m.stop()
}

// balanceArgs are molt's arguments for these tests: --env
// MOLT_ACCEPT_BALANCE=off with envTestBalance=off.
func balanceArgs() []string {
	args := []string{"--backlog", "128"}
	if os.Getenv(envTestBalance) == "off" {
		args = append(args, "--env", "MOLT_ACCEPT_BALANCE=off")
	}
	return args
}

// burst freezes workers, pinned to one CPU, opens n keep-alive
// connections to addr and sends a request on each, lets the workers go on
// and returns how many connections each worker answered. Every answer
// must be 200 with the connection kept alive.
func burst(t *testing.T, addr string, workers []int, n int) map[int]int {
	t.Helper()
	pinToOneCPU(t, workers)
	for _, w := range workers {
		if err := syscall.Kill(w, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	resumed := false
	resume := func() {
		if resumed {
			return
		}
		resumed = true
		for _, w := range workers {
			_ = syscall.Kill(w, syscall.SIGCONT)
		}
	}
	defer resume()
	cs := make([]net.Conn, n)
	defer func() {
		for _, c := range cs {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i := range cs {
		c, err := net.DialTimeout("tcp", addr, stepTimeout)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		cs[i] = c
		if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: molt-test\r\n\r\n"); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	resume()
	perWorker := map[int]int{}
	for i, c := range cs {
		c.SetDeadline(time.Now().Add(stepTimeout))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Close {
			t.Fatalf("connection %d: %s, close=%v; want 200 kept alive", i, resp.Status, resp.Close)
		}
		pid, _ := strconv.Atoi(resp.Header.Get("X-Molt-Worker-Pid"))
		perWorker[pid]++
	}
	t.Logf("%d connections (one request each) per worker: %v", n, perWorker)
	return perWorker
}

// checkFair fails the test unless each of workers answered at least fair
// connections.
func checkFair(t *testing.T, workers []int, perWorker map[int]int, fair int) {
	t.Helper()
	for _, w := range workers {
		if perWorker[w] < fair {
			t.Errorf("worker %d answered %d keep-alive connections, want at least %d (per worker: %v)", w, perWorker[w], fair, perWorker)
		}
	}
}

// pinToOneCPU moves every thread of each pid to the first CPU this test
// may use, so that the workers take turns on it.
func pinToOneCPU(t *testing.T, pids []int) {
	t.Helper()
	var own, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &own); err != nil {
		t.Fatal(err)
	}
	for cpu := 0; cpu < 1024; cpu++ {
		if own.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	for _, pid := range pids {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
		if err != nil || len(tasks) == 0 {
			t.Fatalf("threads of %d: %v", pid, err)
		}
		for _, task := range tasks {
			tid, _ := strconv.Atoi(filepath.Base(task))
			if err := unix.SchedSetaffinity(tid, &one); err != nil && err != unix.ESRCH {
				t.Fatalf("pin thread %d of %d: %v", tid, pid, err)
			}
		}
	}
}
