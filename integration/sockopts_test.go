package integration

import (
	"net"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// listenBacklog returns the backlog of the TCP listener on port, as ss
// shows it (Send-Q of a listening socket is its backlog).
func listenBacklog(t *testing.T, ss, port string) string {
	t.Helper()
	code, out := runToEnd(t, t.TempDir(), ss, "-ltnH", "sport = :"+port)
	if code != 0 {
		t.Fatalf("ss: exit %d\n%s", code, out)
	}
	f := strings.Fields(out)
	if len(f) < 3 {
		t.Fatalf("ss found no listener on port %s: %q", port, out)
	}
	return f[2]
}

// TestSockopts_BacklogAcrossAReload: --backlog sets the listen backlog of
// every listener, and a reload whose config file changes it applies the
// new one to the kept listener.
func TestSockopts_BacklogAcrossAReload(t *testing.T) {
	t.Parallel()
	ss := test.RequireCommand(t, "ss")
	m := start(t, runOpts{Config: "listen = [\"127.0.0.1:0\"]\nworkers = 1\nbacklog = 7\n"})
	addr := m.addr()
	m.waitServing()
	_, port, _ := net.SplitHostPort(addr)
	if got := listenBacklog(t, ss, port); got != "7" {
		t.Errorf("backlog %s, want 7", got)
	}
	writeConfig(t, m.config, "listen = [\"127.0.0.1:0\"]\nworkers = 1\nbacklog = 9\n")
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	if got := listenBacklog(t, ss, port); got != "9" {
		t.Errorf("backlog after the reload %s, want 9", got)
	}
	m.stop()
}

// TestSockopts_WildcardIPv6IsIPv6Only: a [::] listener is IPv6-only, as
// nginx's ipv6only=on: it answers on [::1] and an IPv4 connection to its
// port is refused (a separate 0.0.0.0 listener may share the port).
func TestSockopts_WildcardIPv6IsIPv6Only(t *testing.T) {
	t.Parallel()
	test.Require(t, "IPv6 loopback", test.HasIPv6Loopback(), "[::1] cannot be bound")
	m := start(t, runOpts{Args: []string{"--listen", "[::]:0", "--workers", "1"}})
	addr := m.addr()
	m.waitServing()
	_, port, _ := net.SplitHostPort(addr)
	if r := get(t, net.JoinHostPort("::1", port), "/"); r.Status != 200 {
		t.Errorf("GET over [::1]: %d", r.Status)
	}
	refused(t, "tcp4", net.JoinHostPort("127.0.0.1", port))
	// The same port on 0.0.0.0 is free for a separate IPv4 listener.
	l4, err := net.Listen("tcp4", "0.0.0.0:"+port)
	if err != nil {
		t.Errorf("0.0.0.0:%s beside the [::] listener: %v", port, err)
	} else {
		l4.Close()
	}
	m.stop()
}
