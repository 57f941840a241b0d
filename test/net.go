package test

import (
	"net"
	"os"
	"os/exec"
	"testing"
)

// Require skips the test with reason when ok is false, unless
// MOLT_TEST_REQUIRE=all (set by CI), in which case it fails it: in CI
// every capability a test probes for must be there.
func Require(t testing.TB, capability string, ok bool, reason string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("MOLT_TEST_REQUIRE") == "all" {
		t.Fatalf("%s is required (MOLT_TEST_REQUIRE=all): %s", capability, reason)
	}
	t.Skipf("no %s: %s", capability, reason)
}

// RequireCommand requires an executable on PATH and returns its path.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	Require(t, name, err == nil, "not on PATH")
	return p
}

// HasIPv6Loopback reports whether [::1] can be bound.
func HasIPv6Loopback() bool {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// ShortTempDir returns a temporary directory whose path is short enough
// for unix-socket paths (sun_path is 108 bytes; t.TempDir's can be
// longer), removed at the test's end.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "molt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// FreeAddr returns a 127.0.0.1:port address that was free a moment ago,
// for a program that needs a port number up front (it cannot take port 0
// and report back), such as systemd-socket-activate.
func FreeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
