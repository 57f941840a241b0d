package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// Socket activation in: systemd-socket-activate (systemd's own test
// launcher) binds the sockets, waits for the first connection and then
// executes molt in its own process with LISTEN_FDS, LISTEN_PID and
// LISTEN_FDNAMES, as systemd does for a Type=notify service with a
// .socket unit. The process the test starts is therefore molt's (the
// keeper, or with --no-keeper the first master).

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago:
// systemd-socket-activate needs a number, not 0.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// activate is the launcher: systemd-socket-activate listening on addrs,
// with names for the first fds.
func activate(t *testing.T, names string, addrs ...string) []string {
	t.Helper()
	sa := test.RequireCommand(t, "systemd-socket-activate")
	l := []string{sa}
	for _, a := range addrs {
		l = append(l, "--listen="+a)
	}
	if names != "" {
		l = append(l, "--fdname="+names)
	}
	return l
}

// waitLauncher waits until the launcher listens on its n sockets.
func waitLauncher(t *testing.T, m *master, n int) {
	t.Helper()
	test.WaitFor(t, startTimeout, "systemd-socket-activate listening", func() error {
		if got := strings.Count(m.Log(), "Listening on "); got < n {
			return fmt.Errorf("%d of %d sockets:\n%s", got, n, m.Log())
		}
		return nil
	})
}

// firstGet sends the connection that makes the launcher start molt; it is
// queued on the passed socket and must be answered once molt serves.
func firstGet(t *testing.T, m *master, n int, addr string) {
	t.Helper()
	waitLauncher(t, m, n)
	r, err := test.Get(addr, "/", startTimeout)
	if err != nil || r.Status != 200 {
		t.Fatalf("the first request, which started molt: %v, %+v", err, r)
	}
}

// activatedListeners returns the names of the status's listeners that
// came from socket activation.
func activatedListeners(st ctlStatus) string {
	var names []string
	for _, l := range st.Listeners {
		if l.Activated {
			names = append(names, l.Name)
		}
	}
	return strings.Join(names, ",")
}

// TestActivation_KeeperAdoptsTheSocketsAndUpgradesOnThem: molt with its
// keeper under systemd-socket-activate adopts a TCP socket by name and a
// unix socket by address instead of binding, answers the connection that
// started it, and keeps serving on those very sockets over three
// upgrades under load with zero failed requests. At the stop it leaves
// the unix path, which is the launcher's (systemd's), in place.
func TestActivation_KeeperAdoptsTheSocketsAndUpgradesOnThem(t *testing.T) {
	t.Parallel()
	sockDir := test.ShortTempDir(t)
	sock := filepath.Join(sockDir, "adm.sock")
	tcp := "127.0.0.1:" + freePort(t)
	launcher := activate(t, "web", tcp, sock) // the unix socket is unnamed
	u := startUpgradableVia(t, byRename, launcher, nil, func(string) []string {
		return []string{withKeeper, "--listen", "adm=unix:" + sock, "--listen", "web=" + tcp, "--workers", "2", "--probation", "300ms"}
	})
	firstGet(t, u.master, 2, tcp)
	u.waitServing()
	keeper := u.Pid // the launcher executed molt in its own process
	for _, l := range test.Find(u.log, test.Msg("listening")) {
		if l.Str("activated") != "true" || l.Str("inherited") != "false" {
			t.Errorf("listener %s not adopted from socket activation: %s", l.Str("listener"), l.Raw)
		}
	}
	first := u.masterPid(t)
	if ppid, _, _ := test.ProcStat(first); ppid != keeper || first == keeper {
		t.Fatalf("master %d has parent %d, want the keeper %d", first, ppid, keeper)
	}
	if got := activatedListeners(statusOf(t, u.pidFile)); got != "adm,web" {
		t.Errorf("activated listeners %q, want adm,web", got)
	}
	get(t, "unix:"+sock, "/")

	l := startLoad(t, tcp)
	masters := []int{first}
	for i := range 3 {
		bin := bins.molt2
		if i%2 == 1 {
			bin = bins.molt
		}
		u.install(t, bin, byRename)
		if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		masters = append(masters, u.waitTakeover(t, masters[len(masters)-1]))
		if got := activatedListeners(statusOf(t, u.pidFile)); got != "adm,web" {
			t.Errorf("upgrade %d: activated listeners %q, want adm,web", i+1, got)
		}
		get(t, "unix:"+sock, "/")
	}
	got := l.stop(t)
	if len(got) < 2 {
		t.Errorf("requests answered by %d masters, want several: %v", len(got), got)
	}
	checkMasterSocketsNonBlocking(t, masters[len(masters)-1])
	if code := u.stopKeeper(t, syscall.SIGQUIT); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	for _, m := range masters {
		if test.Alive(m) {
			t.Errorf("master %d outlived the keeper's stop", m)
		}
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("the activated unix socket's path was removed by molt: %v", err)
	}
	test.CheckLogs(t, u.log)
	t.Logf("keeper %d kept masters %v on the activated sockets", keeper, masters)
}

// TestActivation_DropOrMoveIsRefused: without a keeper, a reload whose
// configuration drops the activated listener is refused, and an upgrade
// whose configuration moves it rolls back; both name the reason, and the
// activated socket serves throughout. An upgrade that keeps it commits
// and the new master knows the socket is activated.
func TestActivation_DropOrMoveIsRefused(t *testing.T) {
	t.Parallel()
	tcp := "127.0.0.1:" + freePort(t)
	var conf string
	u := startUpgradableVia(t, byRename, activate(t, "web", tcp), nil, func(dir string) []string {
		conf = filepath.Join(dir, "molt.hcl")
		writeConfig(t, conf, fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", "web="+tcp))
		return []string{"--config", conf}
	})
	firstGet(t, u.master, 1, tcp)
	u.waitServing()
	if u.current(t) != u.Pid {
		t.Fatalf("pid file names %d, want the process the launcher became (%d)", u.current(t), u.Pid)
	}

	writeConfig(t, conf, "listen = [\"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n")
	code, out := ctl(t, u.pidFile, "reload", "--wait")
	if code == 0 || !strings.Contains(out, "listener web ("+tcp+") came from socket activation") {
		t.Errorf("reload dropping the activated listener: exit %d:\n%s", code, out)
	}
	get(t, tcp, "/")

	moved := "web=127.0.0.1:" + freePort(t)
	writeConfig(t, conf, fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", moved))
	code, out = ctl(t, u.pidFile, "upgrade", "--wait")
	if code == 0 || !strings.Contains(out, "rolled back") || !strings.Contains(out, "came from socket activation") {
		t.Errorf("upgrade moving the activated listener: exit %d:\n%s", code, out)
	}
	if pid := u.current(t); pid != u.Pid {
		t.Errorf("after the refused upgrade the pid file names %d, want %d", pid, u.Pid)
	}
	get(t, tcp, "/")

	writeConfig(t, conf, fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", "web="+tcp))
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("upgrade keeping the activated listener: exit %d:\n%s", code, out)
	}
	u.waitTakeover(t, u.Pid)
	if got := activatedListeners(statusOf(t, u.pidFile)); got != "web" {
		t.Errorf("activated listeners after the upgrade %q, want web", got)
	}
	if r := get(t, tcp, "/"); r.Status != 200 {
		t.Errorf("GET after the upgrade: %d", r.Status)
	}
	u.stop(t, test.Msg("reload refused: the listeners cannot change so; nothing changed"),
		test.Msg("upgrade failed; rolled back: this generation keeps serving"),
		test.Msg("new generation gives up; handing back to the old one"),
		test.Msg("new generation gave up"))
}

// TestActivation_UnclaimedSocketIsAnError: a passed socket that matches
// no listener would queue connections nobody accepts; molt refuses to
// start (exit 2, from the master through the keeper) and says which.
func TestActivation_UnclaimedSocketIsAnError(t *testing.T) {
	t.Parallel()
	dir := test.ShortTempDir(t)
	tcp := "127.0.0.1:" + freePort(t)
	m := startMoltVia(t, dir, activate(t, "", tcp), bins.molt, nil, withKeeper, "--listen", "unix:"+filepath.Join(dir, "w.sock"))
	waitLauncher(t, m, 1)
	c, err := net.DialTimeout("tcp", tcp, startTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if code := m.Wait(startTimeout); code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	want := fmt.Sprintf(`socket activation passed fd 3 (name "unknown", tcp %s), which matches no listener by name or address`, tcp)
	if b, _ := os.ReadFile(m.log); !strings.Contains(string(b), want) {
		t.Errorf("the log lacks %q:\n%s", want, b)
	}
	if out := m.Log(); !strings.Contains(out, "molt run: the master exited with status 2 before it served") {
		t.Errorf("the terminal was not told:\n%s", out)
	}
	if fileExists(filepath.Join(dir, "w.sock")) {
		t.Error("molt bound its own listener although it refused to start")
	}
}
