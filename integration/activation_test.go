package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Socket activation in: systemd-socket-activate (systemd's own test
// launcher) binds the sockets, waits for the first connection and then
// executes molt in its own process with LISTEN_FDS, LISTEN_PID and
// LISTEN_FDNAMES, as systemd does for a Type=notify service with a
// .socket unit. The process the test starts is therefore molt's (the
// keeper, or with --no-keeper the first master).

// freeAddr returns a 127.0.0.1:port address free a moment ago:
// systemd-socket-activate needs a number, not 0.
func freeAddr(t *testing.T) string {
	t.Helper()
	a, err := test.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return a
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
	tcp := freeAddr(t)
	launcher := activate(t, "web", tcp, sock) // the unix socket is unnamed
	u := start(t, runOpts{Deploy: byRename, Launcher: launcher, Keeper: true,
		Args: []string{"--listen", "adm=unix:" + sock, "--listen", "web=" + tcp, "--workers", "2", "--probation", "300ms"}})
	firstGet(t, u, 2, tcp)
	u.waitServing()
	keeper := u.Pid // the launcher executed molt in its own process
	for _, l := range test.Find(u.log, test.Event("listener.listening")) {
		if l.Str("activated") != "true" || l.Str("inherited") != "false" {
			t.Errorf("listener %s not adopted from socket activation: %s", l.Str("listener"), l.Raw)
		}
	}
	first := u.masterPid()
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
		u.install(bin, byRename)
		if err := syscall.Kill(keeper, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		masters = append(masters, u.waitTakeover(masters[len(masters)-1]))
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
	if code := u.stopKeeper(syscall.SIGQUIT); code != 0 {
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
	u.checkLogs()
	t.Logf("keeper %d kept masters %v on the activated sockets", keeper, masters)
}

// TestActivation_DropOrMoveIsRefused: without a keeper, a reload whose
// configuration drops the activated listener is refused, and an upgrade
// whose configuration moves it rolls back; both name the reason, and the
// activated socket serves throughout. An upgrade that keeps it commits
// and the new master knows the socket is activated.
func TestActivation_DropOrMoveIsRefused(t *testing.T) {
	t.Parallel()
	tcp := freeAddr(t)
	u := start(t, runOpts{Deploy: byRename, Launcher: activate(t, "web", tcp),
		Config: fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", "web="+tcp)})
	conf := u.config
	firstGet(t, u, 1, tcp)
	u.waitServing()
	if u.current() != u.Pid {
		t.Fatalf("pid file names %d, want the process the launcher became (%d)", u.current(), u.Pid)
	}

	writeConfig(t, conf, "listen = [\"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n")
	code, out := ctl(t, u.pidFile, "reload", "--wait")
	if code == 0 || !strings.Contains(out, "listener web ("+tcp+") came from socket activation") {
		t.Errorf("reload dropping the activated listener: exit %d:\n%s", code, out)
	}
	get(t, tcp, "/")

	moved := "web=" + freeAddr(t)
	writeConfig(t, conf, fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", moved))
	code, out = ctl(t, u.pidFile, "upgrade", "--wait")
	if code == 0 || !strings.Contains(out, "rolled back") || !strings.Contains(out, "came from socket activation") {
		t.Errorf("upgrade moving the activated listener: exit %d:\n%s", code, out)
	}
	if pid := u.current(); pid != u.Pid {
		t.Errorf("after the refused upgrade the pid file names %d, want %d", pid, u.Pid)
	}
	get(t, tcp, "/")

	writeConfig(t, conf, fmt.Sprintf("listen = [%q, \"other=127.0.0.1:0\"]\nworkers = 1\nprobation = \"300ms\"\n", "web="+tcp))
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("upgrade keeping the activated listener: exit %d:\n%s", code, out)
	}
	u.waitTakeover(u.Pid)
	if got := activatedListeners(statusOf(t, u.pidFile)); got != "web" {
		t.Errorf("activated listeners after the upgrade %q, want web", got)
	}
	if r := get(t, tcp, "/"); r.Status != 200 {
		t.Errorf("GET after the upgrade: %d", r.Status)
	}
	u.stop(test.Event("reload.refused", "reason", "listeners"),
		test.Event("upgrade.rolled_back"),
		test.Event("upgrade.giving_up"),
		test.Event("upgrade.new_gave_up"))
}

// TestActivation_UnclaimedSocketIsAnError: a passed socket that matches
// no listener would queue connections nobody accepts; molt refuses to
// start (exit 2, from the master through the keeper) and says which.
func TestActivation_UnclaimedSocketIsAnError(t *testing.T) {
	t.Parallel()
	dir := test.ShortTempDir(t)
	tcp := freeAddr(t)
	m := start(t, runOpts{Dir: dir, Launcher: activate(t, "", tcp), Keeper: true,
		Args: []string{"--listen", "unix:" + filepath.Join(dir, "w.sock")}})
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
	// In the master's JSON log line (its stderr is the terminal's, not the
	// log file: its workers inherit that).
	if len(test.Find(m.log, func(l test.Line) bool { return strings.Contains(l.Str("error"), want) })) == 0 {
		b, _ := os.ReadFile(m.log)
		t.Errorf("the log lacks %q:\n%s", want, b)
	}
	if out := m.Log(); !strings.Contains(out, "molt run: the master exited with status 2 before it served") {
		t.Errorf("the terminal was not told:\n%s", out)
	}
	if fileExists(filepath.Join(dir, "w.sock")) {
		t.Error("molt bound its own listener although it refused to start")
	}
}

// unitFile returns the settings of deploy/systemd/NAME (a shipped
// systemd unit), by key.
func unitFile(t *testing.T, name string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "deploy", "systemd", name))
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") && !strings.HasPrefix(line, ";") {
			keys[k] = v
		}
	}
	return keys
}

// localizeUnit moves a shipped unit's paths into dir: the release tree
// /srv/app, the configuration and the runtime directory.
func localizeUnit(s, dir, conf string) string {
	return strings.NewReplacer("/srv/app/", dir+"/", "/etc/molt/app.hcl", conf, "/run/app/", dir+"/").Replace(s)
}

// verifyUnits runs systemd-analyze verify on the shipped units, paths
// moved into dir (it checks that ExecStart's binary exists). It needs no
// running systemd; any complaint, an unknown key among them, fails.
func verifyUnits(t *testing.T, dir, conf string, names ...string) {
	t.Helper()
	sa := test.RequireCommand(t, "systemd-analyze")
	units := filepath.Join(dir, "units")
	if err := os.MkdirAll(units, 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{"verify", "--man=no"}
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join("..", "deploy", "systemd", n))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(units, n), []byte(localizeUnit(string(b), dir, conf)), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, filepath.Join(units, n))
	}
	if code, out := runToEnd(t, units, sa, args...); code != 0 || strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify %v: exit %d:\n%s", names, code, out)
	}
}

// TestActivation_TheShippedUnitsAsSystemdWouldRunThem runs
// deploy/systemd/app.service, alone and with deploy/systemd/app.socket,
// the way systemd would, as far as that can be done without systemd as
// PID 1. systemd-analyze verify must accept them. The socket unit's
// socket is passed with its FileDescriptorName by systemd-socket-activate;
// ExecStart runs as written (paths moved to the test's directory: the
// stable path is a symlink to a release directory) with a NOTIFY_SOCKET (a
// fake systemd), and $FDSTORE when FileDescriptorStoreMax= is set, and
// must say READY=1 from its own pid (Type=notify); alone, its listener
// reaches systemd's fd store as molt-fdstore.web, and with the socket
// unit nothing does (the socket unit holds it). ExecReload must succeed
// and be followed by READY=1, the unit's deploy (re-point the symlink,
// molt ctl upgrade --wait) must commit the new version under load, and
// the stop (KillSignal to the main pid only: KillMode=mixed) must end
// everything with exit 0 well within TimeoutStopSec, which must leave
// room for the drain timeout.
func TestActivation_TheShippedUnitsAsSystemdWouldRunThem(t *testing.T) {
	t.Parallel()
	for _, activated := range []bool{false, true} {
		name := map[bool]string{false: "service", true: "service_and_socket"}[activated]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testShippedUnits(t, activated)
		})
	}
}

func testShippedUnits(t *testing.T, activated bool) {
	svc := unitFile(t, "app.service")
	sockUnit := unitFile(t, "app.socket")
	if svc["Type"] != "notify" || svc["KillMode"] != "mixed" || svc["KillSignal"] != "SIGQUIT" {
		t.Fatalf("app.service: Type=%s KillMode=%s KillSignal=%s, want notify, mixed, SIGQUIT", svc["Type"], svc["KillMode"], svc["KillSignal"])
	}
	stopTimeout, err := time.ParseDuration(svc["TimeoutStopSec"])
	if err != nil || stopTimeout < 30*time.Second+time.Second+5*time.Second {
		t.Fatalf("TimeoutStopSec=%q leaves no room for the 30s drain and the 1s QUIT settle window", svc["TimeoutStopSec"])
	}
	if !strings.HasPrefix(svc["ExecStart"], "/srv/app/current/molt run ") {
		t.Fatalf("ExecStart=%q: want the stable path /srv/app/current/molt", svc["ExecStart"])
	}
	if sockUnit["ListenStream"] == "" || sockUnit["FileDescriptorName"] == "" {
		t.Fatalf("app.socket: %v", sockUnit)
	}
	fdName := sockUnit["FileDescriptorName"]

	sd := startFakeSystemd(t)
	dir := test.ShortTempDir(t)
	tcp := "127.0.0.1:0"
	if activated {
		tcp = freeAddr(t) // ListenStream, on loopback only
	}
	conf := filepath.Join(dir, "app.hcl")
	writeConfig(t, conf, fmt.Sprintf("listen = [%q]\nworkers = 2\nprobation = \"300ms\"\nlog_file = %q\nworker_log = %q\nlog_json = true\n",
		fdName+"="+tcp, filepath.Join(dir, "molt.log"), filepath.Join(dir, "workers.log")))
	// The release tree of the unit: current -> releases/<version>.
	release := func(v, bin string) {
		rel := filepath.Join(dir, "releases", v)
		if err := os.MkdirAll(rel, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(bin, filepath.Join(rel, "molt")); err != nil {
			t.Fatal(err)
		}
		repoint(t, filepath.Join(dir, "current"), filepath.Join("releases", v))
	}
	release("1", bins.molt)
	names := []string{"app.service"}
	if activated {
		names = append(names, "app.socket")
	}
	verifyUnits(t, dir, conf, names...)

	// Not start: the command line is the unit's, with none of the
	// harness's default arguments.
	u := &master{t: t, dir: dir, pidFile: filepath.Join(dir, "molt.pid"), log: filepath.Join(dir, "molt.log"), workerLog: filepath.Join(dir, "workers.log"),
		path: filepath.Join(dir, "current", "molt")}
	t.Cleanup(u.stopGenerations)
	localize := func(cmdline string) []string { return strings.Fields(localizeUnit(cmdline, dir, conf)) }
	start := localize(svc["ExecStart"])
	env := []string{"NOTIFY_SOCKET=" + sd.path}
	if svc["FileDescriptorStoreMax"] != "" {
		env = append(env, "FDSTORE="+svc["FileDescriptorStoreMax"])
	}
	if activated {
		// systemd-socket-activate passes on only the variables -E names.
		launcher := activate(t, fdName, tcp)
		for _, e := range env {
			launcher = append(launcher, "-E", e)
		}
		u.Proc = test.Start(t, test.Opts{Path: launcher[0], Args: append(launcher[1:], start...), Dir: dir,
			Log: filepath.Join(dir, "molt.out")})
		firstGet(t, u, 1, tcp)
	} else {
		u.Proc = test.Start(t, test.Opts{Path: start[0], Args: start[1:], Env: env, Dir: dir, Log: filepath.Join(dir, "molt.out")})
		tcp = u.addr()
	}
	main := u.Pid // Type=notify: the process systemd started is the main pid
	sd.waitFor(t, "READY=1 from the main pid", 1, func(r notifyRecord) bool { return r.pid == main && r.has("READY=1") })
	want := ""
	if activated {
		want = fdName
	}
	if got := activatedListeners(statusOf(t, u.pidFile)); got != want {
		t.Errorf("activated listeners %q, want %q", got, want)
	}
	stored := func(r notifyRecord) bool {
		return r.pid == main && r.has("FDSTORE=1") && r.get("FDNAME") == "molt-fdstore."+fdName
	}
	if !activated {
		sd.waitFor(t, "the listener in systemd's fd store", 1, stored)
	}

	l := startLoad(t, tcp)
	reload := localize(svc["ExecReload"])
	if code, out := runToEnd(t, dir, reload[0], reload[1:]...); code != 0 {
		t.Fatalf("ExecReload: exit %d:\n%s", code, out)
	}
	sd.waitFor(t, "READY=1 after the reload", 2, func(r notifyRecord) bool { return r.pid == main && r.has("READY=1") })
	old := u.current()
	release("2", bins.molt2) // the unit's deploy: a release directory, the symlink re-pointed
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("upgrade: exit %d:\n%s", code, out)
	}
	u.waitTakeover(old)
	sd.waitFor(t, "READY=1 after the upgrade", 3, func(r notifyRecord) bool { return r.pid == main && r.has("READY=1") })
	if v := get(t, tcp, "/").Header.Get("X-Molt-Version"); v != nextVersion() {
		t.Errorf("after the upgrade: version %q, want %q", v, nextVersion())
	}
	l.stop(t)

	began := time.Now()
	if err := syscall.Kill(main, syscall.SIGQUIT); err != nil { // KillMode=mixed: the main pid only
		t.Fatal(err)
	}
	if code := u.Wait(stopTimeout); code != 0 {
		t.Errorf("the main pid exited %d after SIGQUIT", code)
	}
	t.Logf("stopped in %v (TimeoutStopSec=%v)", time.Since(began).Round(time.Millisecond), stopTimeout)
	sd.waitFor(t, "STOPPING=1", 1, func(r notifyRecord) bool { return r.pid == main && r.has("STOPPING=1") })
	for _, r := range sd.records() {
		if r.pid != main {
			t.Errorf("a message from pid %d, not the main pid %d (NotifyAccess=main would drop it): %v", r.pid, main, r)
		}
		if activated && r.has("FDSTORE=1") {
			t.Errorf("a socket of the socket unit passed to systemd's fd store: %v", r)
		}
	}
	u.checkLogs()
}
