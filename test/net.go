package test

import (
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
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
// and report back), such as systemd-socket-activate, or for a test that
// binds an address again after its holder died.
//
// The port is below the kernel's ephemeral range (ip_local_port_range),
// which the kernel hands out for connect(2) and for listening on port 0:
// with the connection churn of parallel tests' loads, a port from that
// range can be taken by some client's connection between its release and
// its next bind (EADDRINUSE). Below the range, only another FreeAddr can
// pick it, at random among thousands.
func FreeAddr() (string, error) {
	const lowest = 10000
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	for range 100 {
		if low-lowest < 1000 {
			break // no room below the range: the kernel's choice
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(lowest+rand.IntN(low-lowest))))
		if err != nil {
			continue // in use
		}
		defer l.Close()
		return l.Addr().String(), nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
