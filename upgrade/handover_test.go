package upgrade

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the new master of TestHandover_Fresh: with
// childEnv set it runs freshChild instead of the tests.
const childEnv = "MOLT_UPGRADE_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		if err := freshChild(mode); err != nil {
			fmt.Fprintln(os.Stderr, "fresh child:", err)
			os.Exit(ExitFailure)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// freshChild is a new master started by molt's own handover: it checks
// what it inherited, writes it to the report file and, in mode
// "commit", commits; in mode "exit", it exits 3 first.
func freshChild(mode string) error {
	if mode == "exit" {
		os.Exit(3)
	}
	named := os.Getenv(HandoverEnv)
	h, err := New(nil)
	if err != nil {
		return err
	}
	var report []string
	add := func(format string, a ...any) { report = append(report, fmt.Sprintf(format, a...)) }
	add("parent=%v", h.HasParent())
	add("names=%d", strings.Count(named, ",")+1)
	add("env=%q", os.Getenv(HandoverEnv)+os.Getenv(ParentEnv))
	ln, err := h.InheritedListener("http")
	if err != nil || ln == nil {
		return fmt.Errorf("listener: %v %v", ln, err)
	}
	sa, err := unix.Getsockname(int(ln.Fd()))
	if err != nil {
		return err
	}
	add("http=%d", sa.(*unix.SockaddrInet4).Port)
	lock, err := h.InheritedFile("pidlock")
	if err != nil || lock == nil {
		return fmt.Errorf("pidlock: %v %v", lock, err)
	}
	path, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", lock.Fd()))
	add("pidlock=%s", filepath.Base(path))
	ch, err := h.Parent()
	if err != nil || ch == nil {
		return fmt.Errorf("channel: %v %v", ch, err)
	}
	// Every descriptor the handover named is close-on-exec (or closed):
	// no worker inherits one. (Others, which the test binary inherited
	// from go test, a master marks at its start: closeOnExecAll.)
	for _, item := range strings.Split(named, ",") {
		_, num, _ := strings.Cut(item, ":")
		fd, _ := strconv.Atoi(num)
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			add("inheritable=%s", item)
		}
	}
	if err := os.WriteFile(os.Getenv("MOLT_UPGRADE_TEST_REPORT"), []byte(strings.Join(report, "\n")), 0o600); err != nil {
		return err
	}
	return h.Ready()
}

var (
	testHandOnce sync.Once
	testHand     *Handover
	testHandErr  error
)

// TestHandover_Fresh: a Handover whose tableflip upgrade is spent starts
// the new master by molt's own handover, with the same named files; the
// new master sees a parent, finds its listener and files, none of the
// variables, nothing it could leak to a worker, and its Ready is the
// commit. One that exits first fails as tableflip's would.
func TestHandover_Fresh(t *testing.T) {
	testHandOnce.Do(func() { testHand, testHandErr = New(nil) }) // one per process
	if testHandErr != nil {
		t.Fatal(testHandErr)
	}
	h := testHand
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	if _, _, err := h.Listener("http", func() (*os.File, error) { return lf, nil }); err != nil {
		t.Fatal(err)
	}
	lock, err := os.Create(filepath.Join(t.TempDir(), "molt.pid.lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := h.PassFile("pidlock", lock); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Children(); err != nil {
		t.Fatal(err)
	}
	if err := h.Ready(); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	h.spent = true // as after a commit: tableflip allows no other
	h.mu.Unlock()
	report := filepath.Join(t.TempDir(), "report")
	t.Setenv("MOLT_UPGRADE_TEST_REPORT", report)
	t.Setenv(ParentEnv, "yes") // as in a master tableflip started: never passed on

	t.Setenv(childEnv, "exit")
	var ue *UpgradeError
	if err := h.Upgrade(); !errors.As(err, &ue) || ue.Kind != FailedExit || ue.Code != 3 {
		t.Fatalf("a new master that exits 3: %#v", err)
	}

	t.Setenv(childEnv, "commit")
	if err := h.Upgrade(); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("parent=true\nnames=5\nenv=\"\"\nhttp=%d\npidlock=molt.pid.lock", l.Addr().(*net.TCPAddr).Port)
	if string(b) != want {
		t.Errorf("the new master saw\n%s\nwant\n%s", b, want)
	}
}
