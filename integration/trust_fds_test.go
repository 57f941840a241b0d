package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestTrust_WorkersGetOnlyTheDocumentedFDsWithEveryFeature: with every
// feature that keeps a descriptor in the master on (the health check's
// socket pairs, its command, the metrics endpoint), workers run as nobody
// start with exactly the documented descriptors, before and after an
// upgrade (whose new master inherits the metrics socket): 0-2, the
// listener at 3, the parent pipe at 4, the accept table at 5 and their
// own health socket at 6 (MOLT_HEALTH_FD), a socket that is neither the
// listener nor the metrics endpoint, different for each worker. Their
// environment names none of molt's plumbing between masters or from the
// keeper. The health command, also as nobody, gets 0-2 only.
func TestTrust_WorkersGetOnlyTheDocumentedFDsWithEveryFeature(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "workers and the health command run as nobody (--user)")
	dir := test.ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	reports := filepath.Join(dir, "reports")
	if err := os.Mkdir(reports, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(reports, 0o777)
	// ls lists its own descriptors: 0-2, and 3 for the directory it reads.
	hc := "ls -l /proc/self/fd/ > " + reports + "/hc.$MOLT_WORKER_PID"
	m := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
		"--health-check", "/healthz", "--health-check-cmd", hc, "--metrics-listen", "127.0.0.1:0", "--probation", "300ms",
		"--", bins.fakeapp, "serve", "--report", reports}})
	addr := m.addr()
	m.waitServing()
	l := startLoad(t, addr)
	first := m.waitWorkers(2)
	nw := m.upgrade()
	waitWorkerCount(t, nw, 2)
	second := workersOf(nw)
	l.more(t, 64)
	l.stop(t)

	inode := func(pid, fd int) string {
		s, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
		return s
	}
	metricsSock := map[string]bool{}
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", m.current()))
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		metricsSock[inode(m.current(), fd)] = true // every socket the master holds; the worker's end is never one
	}
	reps := readReports(t, reports)
	health := map[string]int{}
	for _, pid := range append(first, second...) {
		r, ok := reps[pid]
		if !ok {
			t.Fatalf("no report from worker %d", pid)
		}
		var inheritable []string
		for _, fd := range r.FDs {
			if fd.CloExec {
				continue
			}
			inheritable = append(inheritable, strconv.Itoa(fd.FD))
			if fd.FD == 6 {
				if !strings.HasPrefix(fd.Target, "socket:") || metricsSock[fd.Target] {
					t.Errorf("worker %d: fd 6 is %s, want its own end of a health socket pair", pid, fd.Target)
				}
				if other, dup := health[fd.Target]; dup {
					t.Errorf("workers %d and %d share the health socket %s", other, pid, fd.Target)
				}
				health[fd.Target] = pid
			}
		}
		if got := strings.Join(inheritable, ","); got != "0,1,2,3,4,5,6" {
			t.Errorf("worker %d started with fds %s, want exactly 0,1,2,3,4,5,6", pid, got)
		}
		if v, _ := r.env("MOLT_HEALTH_FD"); v != "6" {
			t.Errorf("worker %d: MOLT_HEALTH_FD=%q, want 6", pid, v)
		}
		if r.Uid != nobodyID {
			t.Errorf("worker %d runs as uid %d, want nobody", pid, r.Uid)
		}
		for _, kv := range r.Env {
			for _, p := range []string{"MOLT_HANDOVER_FDS", "MOLT_RESURRECT", "MOLT_FAULT", "MOLT_ROLE", "MOLT_EXEC_PATH", "TABLEFLIP_", "MOLT_KEEPER", "MOLT_METRICS"} {
				if strings.HasPrefix(kv, p) {
					t.Errorf("worker %d sees %s", pid, kv)
				}
			}
		}
		out, err := os.ReadFile(filepath.Join(reports, "hc."+strconv.Itoa(pid)))
		if err != nil {
			t.Errorf("worker %d: the health command left no listing: %v", pid, err)
			continue
		}
		var fds []string
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) >= 11 && f[len(f)-2] == "->" {
				fds = append(fds, f[len(f)-3])
			}
		}
		if got := strings.Join(fds, ","); got != "0,1,2,3" {
			t.Errorf("the health command of worker %d had fds %s, want 0,1,2 (and ls's own 3):\n%s", pid, got, out)
		}
	}
	m.stop()
}
