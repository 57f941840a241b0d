package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// dockerfile is what the test takes of deploy/container/Dockerfile.
type dockerfile struct {
	copies     [][2]string // COPY src dest
	runs       []string    // RUN shell commands
	stopSignal string
	entrypoint []string
}

func readDockerfile(t *testing.T) dockerfile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "deploy", "container", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var d dockerfile
	for _, line := range strings.Split(string(b), "\n") {
		word, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
		switch word {
		case "COPY":
			f := strings.Fields(rest)
			if len(f) != 2 {
				t.Fatalf("Dockerfile: %q: want COPY SRC DEST", line)
			}
			d.copies = append(d.copies, [2]string{f[0], f[1]})
		case "RUN":
			d.runs = append(d.runs, rest)
		case "STOPSIGNAL":
			d.stopSignal = rest
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &d.entrypoint); err != nil {
				t.Fatalf("Dockerfile: ENTRYPOINT %s: %v", rest, err)
			}
		}
	}
	if len(d.entrypoint) == 0 || d.stopSignal == "" {
		t.Fatalf("Dockerfile: no ENTRYPOINT or STOPSIGNAL")
	}
	return d
}

// TestContainer_TheDockerfileAsPID1 runs deploy/container/Dockerfile
// without Docker: its COPY and RUN lines lay out the release tree and its
// ENTRYPOINT runs as PID 1 of a new pid namespace (unshare standing in for
// the runtime), with /srv/app and /run moved into the test's directory, a
// free loopback port for :8080, and a log file added. The in-place
// upgrade of docs/deploying.md (a new release directory, current
// re-pointed, the running release's molt ctl upgrade --wait) commits under
// load with zero failed requests and the new version serving; then the
// STOPSIGNAL to PID 1 ends everything with exit 0, well within the
// documented stop timeout of 45 s.
func TestContainer_TheDockerfileAsPID1(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Getuid() == 0, "a new pid namespace needs root")
	unshare := test.RequireCommand(t, "unshare")
	if code, out := runToEnd(t, t.TempDir(), unshare, "--pid", "--fork", "--mount-proc", "true"); code != 0 {
		test.Require(t, "pid namespaces", false, fmt.Sprintf("unshare --pid: exit %d: %s", code, out))
	}
	d := readDockerfile(t)
	sig, ok := map[string]syscall.Signal{"SIGQUIT": syscall.SIGQUIT, "SIGTERM": syscall.SIGTERM, "SIGINT": syscall.SIGINT}[d.stopSignal]
	if !ok || sig != syscall.SIGQUIT {
		t.Fatalf("STOPSIGNAL %s: want SIGQUIT, molt's graceful stop of every generation", d.stopSignal)
	}
	dir := test.ShortTempDir(t)
	if err := os.MkdirAll(filepath.Join(dir, "run"), 0o755); err != nil {
		t.Fatal(err)
	}
	const first = "v1"
	local := strings.NewReplacer("${RELEASE}", first, "/srv/app", filepath.Join(dir, "srv", "app"), "/run/", filepath.Join(dir, "run")+"/").Replace
	for _, c := range d.copies {
		if c[0] != "molt" {
			t.Fatalf("Dockerfile: COPY %s: the test provides molt only", c[0])
		}
		dest := local(c[1])
		if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(bins.molt, dest); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range d.runs {
		if code, out := runToEnd(t, dir, "/bin/sh", "-ec", local(r)); code != 0 {
			t.Fatalf("Dockerfile: RUN %s: exit %d:\n%s", r, code, out)
		}
	}

	addr := freeAddr(t)
	var args []string
	for i, a := range d.entrypoint {
		if i > 0 && d.entrypoint[i-1] == "--listen" && strings.HasPrefix(a, ":") {
			a = addr
		}
		args = append(args, local(a))
	}
	m := &master{t: t, dir: dir, log: filepath.Join(dir, "molt.log")}
	for i, a := range args {
		if a == "--pid-file" && i+1 < len(args) {
			m.pidFile = args[i+1]
		}
	}
	if m.pidFile == "" {
		t.Fatalf("ENTRYPOINT %v: no --pid-file for molt ctl", d.entrypoint)
	}
	args = append(args, "--log-file", m.log, "--log-json")
	m.Proc = test.Start(t, test.Opts{Path: unshare, Dir: dir, Log: filepath.Join(dir, "molt.out"),
		Args: append([]string{"--pid", "--fork", "--mount-proc"}, args...)})
	m.waitServing()
	if v := get(t, addr, "/").Header.Get("X-Molt-Version"); v != version {
		t.Fatalf("serves version %q, want %q", v, version)
	}
	l := startLoad(t, addr)

	// The in-place upgrade of docs/deploying.md.
	app := filepath.Join(dir, "srv", "app")
	if err := os.MkdirAll(filepath.Join(app, "releases", "v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(bins.molt2, filepath.Join(app, "releases", "v2", "molt")); err != nil {
		t.Fatal(err)
	}
	repoint(t, filepath.Join(app, "current"), filepath.Join("releases", "v2"))
	if code, out := runToEnd(t, dir, filepath.Join(app, "releases", first, "molt"), "ctl", "--pid-file", m.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("the in-place upgrade: exit %d:\n%s", code, out)
	}
	if v := get(t, addr, "/").Header.Get("X-Molt-Version"); v != nextVersion() {
		t.Errorf("after the upgrade: version %q, want %q", v, nextVersion())
	}
	l.stop(t)

	// docker stop: the STOPSIGNAL to PID 1, the keeper (unshare's child).
	var pid1 int
	test.WaitFor(t, stepTimeout, "the namespace's PID 1", func() error {
		kids := test.Children(m.Pid)
		if len(kids) != 1 {
			return fmt.Errorf("unshare has children %v, want one", kids)
		}
		pid1 = kids[0]
		return nil
	})
	began := time.Now()
	if err := syscall.Kill(pid1, sig); err != nil {
		t.Fatal(err)
	}
	if code := m.Wait(45 * time.Second); code != 0 {
		t.Errorf("PID 1 exited %d after %s", code, d.stopSignal)
	}
	t.Logf("stopped in %v", time.Since(began).Round(time.Millisecond))
	m.checkLogs()
}
