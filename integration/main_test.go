// Package integration holds molt's end-to-end tests: real binaries, real
// signals, real sockets on loopback. It imports only the test helpers.
package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/molt-server/molt/test"
)

// bins are the binaries under test, built once by TestMain.
var bins struct {
	dir, molt, fakeapp, embedapp string
	// molt2 is the same molt built as the next version (nextVersion), for
	// upgrades that must show a new version serving.
	molt2 string
	// moltFault is molt built with the tag moltfault (faultVersion): a
	// master of it injects the fault MOLT_FAULT names
	// (cmd/molt/fault_moltfault.go).
	moltFault string
}

// version is what the binaries under test report.
var version = "test-" + fmt.Sprint(os.Getpid())

func TestMain(m *testing.M) {
	if err := test.MainSetup(); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	if v := os.Getenv("MOLT_TEST_VERSION"); v != "" {
		version = v
	}
	dir, err := os.MkdirTemp("", "molt-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	// Workers dropped to another user (--user) run binaries from here.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	// Masters make their notify socket directories here rather than in
	// /tmp: a master a test kills leaves its directory behind, and this
	// one is removed with the binaries. Like /tmp (01777): workers run as
	// another user reach it, and masters run as another user make theirs.
	run := filepath.Join(dir, "run")
	if err := os.Mkdir(run, 0o700); err == nil {
		err = os.Chmod(run, 0o777|os.ModeSticky)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	os.Setenv("RUNTIME_DIRECTORY", run)
	bins.dir = dir
	bins.molt = filepath.Join(dir, "molt")
	bins.fakeapp = filepath.Join(dir, "fakeapp")
	bins.embedapp = filepath.Join(dir, "embedapp")
	bins.molt2 = filepath.Join(dir, "next", "molt")
	bins.moltFault = filepath.Join(dir, "fault", "molt")
	// The three builds run concurrently: each is mostly a link, which
	// go build does on one core.
	var build [3]error
	var wg sync.WaitGroup
	wg.Go(func() {
		build[0] = test.Build(dir, version, map[string]string{
			"molt":     "./cmd/molt",
			"fakeapp":  "./test/fakeapp",
			"embedapp": "./test/embedapp",
		})
	})
	wg.Go(func() {
		build[1] = test.Build(filepath.Join(dir, "next"), nextVersion(), map[string]string{"molt": "./cmd/molt"})
	})
	wg.Go(func() {
		// molt2 with the faults a test injects (MOLT_FAULT), which the
		// release binary never contains.
		build[2] = test.BuildTags(filepath.Join(dir, "fault"), faultVersion(), "moltfault", map[string]string{"molt": "./cmd/molt"})
	})
	wg.Wait()
	err = errors.Join(build[:]...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if leaked := test.MainSweep(); len(leaked) > 0 {
		fmt.Fprintf(os.Stderr, "integration: %d processes outlived their tests (killed):\n", len(leaked))
		for _, l := range leaked {
			fmt.Fprintln(os.Stderr, "  ", l)
		}
		code = 1
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// nextVersion is the version of bins.molt2.
func nextVersion() string { return version + "-next" }

// faultVersion is the version of bins.moltFault.
func faultVersion() string { return version + "-fault" }

// soakCount is how many times a repeated test repeats: def in make test,
// or the number in the environment variable name (make soak sets them).
func soakCount(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive count", name, v)
	}
	t.Logf("%s=%d", name, n)
	return n
}
