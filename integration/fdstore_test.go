package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

// Issue 14, first part: the keeper keeps a copy of every listening socket
// (master/keeper/fdstore.go), pushed by the primary master with
// systemd's fd-store protocol.

// socketsHeld counts, per socket inode, the descriptors pid holds of it,
// and returns how many descriptors it has in all.
func socketsHeld(t *testing.T, pid int) (map[uint64]int, int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("process %d: %v", pid, err)
	}
	out := map[uint64]int{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var ino uint64
		if _, err := fmt.Sscanf(link, "socket:[%d]", &ino); err == nil {
			out[ino]++
		}
	}
	return out, len(ents)
}

// storeMismatch says how the keeper's copies differ from the listeners
// (exactly one descriptor of each) and from the sockets gone (none), ""
// if they do not.
func storeMismatch(t *testing.T, keeper int, listeners map[uint64]string, gone map[uint64]string) string {
	t.Helper()
	held, _ := socketsHeld(t, keeper)
	var bad []string
	for ino, what := range listeners {
		if held[ino] != 1 {
			bad = append(bad, fmt.Sprintf("%d descriptors of listener %s (socket %d), want 1", held[ino], what, ino))
		}
	}
	for ino, what := range gone {
		if held[ino] != 0 {
			bad = append(bad, fmt.Sprintf("%d descriptors of socket %s (%d), want 0", held[ino], what, ino))
		}
	}
	return strings.Join(bad, "; ")
}

// waitStore waits until the keeper holds exactly one copy of each
// listener and none of the sockets gone.
func waitStore(t *testing.T, keeper int, listeners, gone map[uint64]string) {
	t.Helper()
	test.WaitFor(t, stepTimeout, "the keeper to hold exactly the listeners", func() error {
		if bad := storeMismatch(t, keeper, listeners, gone); bad != "" {
			return fmt.Errorf("keeper %d: %s", keeper, bad)
		}
		return nil
	})
}

// fdstoreConfig is a config file with these listeners.
// reloadAdmToNew reloads u (started with fdstoreConfig("web=...",
// "adm=unix:SOCK")) into "web" and a new TCP listener "new", and waits
// until the keeper holds exactly the new set (first: the listeners'
// inodes before). It returns the added address, the current inodes and
// those of the sockets gone.
func reloadAdmToNew(t *testing.T, u *master, keeper int, web, sock string, first map[uint64]string) (added string, current, gone map[uint64]string) {
	t.Helper()
	writeConfig(t, u.config, fdstoreConfig("web=127.0.0.1:0", "new=127.0.0.1:0"))
	if code, out := ctl(t, u.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	added = u.addrs(3)["new"]
	test.WaitLog(t, u.log, stepTimeout, 1, "the dropped listener removed", test.Event("keeper.fdstore", "action", "removed", "name", "adm"))
	current = listenerInodes(t, []string{web, added}, nil)
	gone = map[uint64]string{}
	for ino, a := range first {
		if a == sock {
			gone[ino] = "adm"
		}
	}
	waitStore(t, keeper, current, gone)
	return added, current, gone
}

func fdstoreConfig(listen ...string) string {
	return fmt.Sprintf("listen = [\"%s\"]\nworkers = 2\nprobation = \"300ms\"\n", strings.Join(listen, "\", \""))
}

// TestFDStore_KeeperFollowsTheListeners: from the first master's start
// the keeper holds one copy of each listening socket, outside its
// runtime's poller; a reload that adds one and drops one, and an
// upgrade that moves one, leave it holding exactly the current set (no
// duplicate from the sockets each generation pushes again, none of the
// dropped or moved ones); under load nothing fails, and the keeper
// spends no CPU per connection.
func TestFDStore_KeeperFollowsTheListeners(t *testing.T) {
	t.Parallel()
	u, addrs, sock := startWebAndAdm(t)
	keeper := u.Pid
	test.WaitLog(t, u.log, stepTimeout, 2, "both listeners stored", test.Event("keeper.fdstore", "action", "stored"))
	l := startLoad(t, addrs["web"])
	first := listenerInodes(t, []string{addrs["web"]}, []string{sock})
	waitStore(t, keeper, first, nil)
	checkUnpolled(t, "keeper", keeper, first, 2)

	// A reload adds "new" and drops "adm".
	added, reloaded, gone := reloadAdmToNew(t, u, keeper, addrs["web"], sock, first)
	test.WaitLog(t, u.log, stepTimeout, 1, "the added listener stored", test.Event("keeper.fdstore", "action", "stored", "name", "new"))

	// An upgrade moves "new" to another port: the new master pushes its
	// whole set at its commit; the moved socket replaces the old copy.
	target := freeAddr(t)
	writeConfig(t, u.config, fdstoreConfig("web=127.0.0.1:0", "new="+target))
	u.install(bins.molt2, byRename)
	nw := u.upgrade()
	test.WaitLog(t, u.log, stepTimeout, 1, "the moved listener replaced", test.Event("keeper.fdstore", "action", "replaced", "name", "new"))
	if r := get(t, target, "/"); r.Status != 200 || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(nw) {
		t.Errorf("GET on the moved listener: %d from master %s, want %d", r.Status, r.Header.Get("X-Molt-Master-Pid"), nw)
	}
	upgraded := listenerInodes(t, []string{addrs["web"], target}, nil)
	for ino, a := range reloaded {
		if a == added {
			gone[ino] = "new (moved)"
		}
	}
	waitStore(t, keeper, upgraded, gone)
	checkUnpolled(t, "keeper after the upgrade", keeper, upgraded, 2)
	if n := len(test.Find(u.log, test.Event("keeper.fdstore_rejected"))); n != 0 {
		t.Errorf("the keeper rejected %d fd-store lines from its own masters", n)
	}
	l.stop(t)

	spent, took := cpuUnder(t, addrs["web"], pollConns, keeper)
	t.Logf("CPU over %d connections in %v: keeper %d ticks (10 ms each)", pollConns, took.Round(time.Millisecond), spent[0])
	if spent[0] > pollCPUBound {
		t.Errorf("the keeper, holding the listeners, spent %d ticks under the load, want at most %d", spent[0], pollCPUBound)
	}
	if code := u.stopKeeper(quit); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	u.checkLogs()
}

// fdstorePy is a worker that, once GO/go names the keeper's notify
// socket, has a child of its (in the worker's session, a descendant of
// the keeper) push sockets to the keeper's fd store as a master would:
// 100 copies of the worker's own listener (fd 3) under the listener's
// name, a listening socket of its own under a new name, and a removal of
// the real listener. It reports to REPORT/<pid>.json and the worker
// itself serves (fakeapp).
//
//	fdstore.py REPORT FAKEAPP GO
const fdstorePy = `
import array, errno, json, os, socket, sys, time

report, fakeapp, go = sys.argv[1], sys.argv[2], sys.argv[3]

def send(path, data, fds=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([data], anc, 0, path)
        return "sent"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()

if os.fork() == 0:
    end = time.time() + 60
    while not os.path.exists(go) and time.time() < end:
        time.sleep(0.02)
    with open(go) as f:
        keeper = f.read().strip()
    own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    own.bind(("127.0.0.1", 0))
    own.listen(8)
    results = [
        send(keeper, b"FDSTORE=1\nFDNAME=web", [3] * 100),
        send(keeper, b"MAINPID=%d\nFDSTORE=1\nFDNAME=evil" % os.getpid(), [own.fileno()]),
        send(keeper, b"FDSTOREREMOVE=1\nFDNAME=web"),
    ]
    data = {"pid": os.getpid(), "uid": os.getuid(), "results": results,
            "own": os.fstat(own.fileno()).st_ino}
    tmp = os.path.join(report, ".%d.tmp" % os.getpid())
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, os.path.join(report, "%d.json" % os.getpid()))
    os._exit(0)
os.execv(fakeapp, [fakeapp, "serve"])
`

// TestFDStore_NonMastersCannotStore: a worker's process (root, a
// descendant of the keeper in the worker's own session) and a stranger
// push listening sockets to the keeper's fd store: the keeper closes
// every descriptor they pass at once (its descriptor count is back where
// it was), keeps no socket of theirs, keeps its one copy of the real
// listener (their removal is refused too), and logs the rejections; the
// service serves throughout.
func TestFDStore_NonMastersCannotStore(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "the worker must run as the keeper's uid to reach its notify socket at all (0600 in a 0700 directory)")
	python, _, reports := attackScript(t)
	script := filepath.Join(filepath.Dir(reports), "fdstore.py")
	if err := os.WriteFile(script, []byte(fdstorePy), 0o644); err != nil {
		t.Fatal(err)
	}
	goFile := filepath.Join(reports, "go")
	u := start(t, runOpts{Keeper: true, Args: []string{"--listen", "web=127.0.0.1:0", "--workers", "2",
		"--", python, script, reports, bins.fakeapp, goFile}})
	addr := u.addr()
	u.waitServing()
	keeper, m := u.Pid, u.masterPid()
	test.WaitLog(t, u.log, stepTimeout, 1, "the listener stored", test.Event("keeper.fdstore", "action", "stored", "name", "web"))
	web := listenerInodes(t, []string{addr}, nil)
	waitStore(t, keeper, web, nil)
	_, before := socketsHeld(t, keeper)
	l := startLoad(t, addr)

	keeperSock := notifyAddrOf(t, m)
	if err := os.WriteFile(goFile+".tmp", []byte(keeperSock), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(goFile+".tmp", goFile); err != nil {
		t.Fatal(err)
	}
	// A stranger (this test: neither in the keeper's session nor its
	// tree) pushes a listening socket of its own, 50 times over.
	own, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(own)
	if err := unix.Bind(own, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(own, 8); err != nil {
		t.Fatal(err)
	}
	copies := make([]int, 50)
	for i := range copies {
		copies[i] = own
	}
	if err := sendDgram(keeperSock, "FDSTORE=1\nFDNAME=stranger", copies); err != nil {
		t.Fatalf("stranger's push: %v", err)
	}

	strangers := map[uint64]string{}
	var st unix.Stat_t
	if err := unix.Fstat(own, &st); err != nil {
		t.Fatal(err)
	}
	strangers[st.Ino] = "the test's socket"
	var reps []struct {
		Pid     int
		Results []string
		Own     uint64
	}
	test.WaitFor(t, 60*time.Second, "2 reports of fdstore.py", func() error {
		reps = reps[:0]
		ents, _ := os.ReadDir(reports)
		for _, e := range ents {
			if !strings.HasSuffix(e.Name(), ".json") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(reports, e.Name()))
			if err != nil {
				return err
			}
			var r struct {
				Pid     int
				Results []string
				Own     uint64
			}
			if err := json.Unmarshal(b, &r); err != nil {
				return err
			}
			reps = append(reps, r)
		}
		if len(reps) < 2 {
			return fmt.Errorf("%d reports", len(reps))
		}
		return nil
	})
	for _, r := range reps {
		if strings.Join(r.Results, " ") != "sent sent sent" {
			t.Errorf("worker child %d: pushes %v, want all sent (then refused by the keeper)", r.Pid, r.Results)
		}
		strangers[r.Own] = fmt.Sprintf("worker child %d's socket", r.Pid)
	}
	test.WaitLog(t, u.log, stepTimeout, 1, "the pushes rejected", test.Event("keeper.fdstore_rejected"))
	test.WaitFor(t, stepTimeout, "the keeper to hold what it held before", func() error {
		if bad := storeMismatch(t, keeper, web, strangers); bad != "" {
			return fmt.Errorf("keeper %d: %s", keeper, bad)
		}
		if _, n := socketsHeld(t, keeper); n != before {
			return fmt.Errorf("keeper %d holds %d descriptors, %d before the pushes", keeper, n, before)
		}
		return nil
	})
	for _, ln := range test.Find(u.log, test.Event("keeper.fdstore")) {
		if ln.Str("name") != "web" || ln.Str("action") == "removed" {
			t.Errorf("the keeper's store changed for a non-master: %s", ln.Raw)
		}
	}
	for _, ln := range test.Find(u.log, test.Event("keeper.primary")) {
		if p := ln.Str("pid"); p != strconv.Itoa(m) {
			t.Errorf("the keeper took pid %s as primary: %s", p, ln.Raw)
		}
	}
	get(t, addr, "/")
	l.stop(t)
	if code := u.stopKeeper(quit); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	u.checkLogs(test.Event("keeper.fdstore_rejected"), test.Event("notify.rejected"))
}

// sendDgram sends one datagram with fds to the unix datagram socket at
// path.
func sendDgram(path, text string, fds []int) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Sendmsg(fd, []byte(text), unix.UnixRights(fds...), &unix.SockaddrUnix{Name: path}, 0)
}

// fdRecorder is a fake systemd NOTIFY_SOCKET with an fd store: it
// records each message and keeps the sockets FDSTORE=1 passes, by
// FDNAME, as systemd would (FDSTOREREMOVE=1 drops them).
type fdRecorder struct {
	path  string
	mu    sync.Mutex
	texts []string
	store map[string][]int
}

func startFDRecorder(t *testing.T) *fdRecorder {
	t.Helper()
	r := &fdRecorder{path: filepath.Join(test.ShortTempDir(t), "notify"), store: map[string][]int{}}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: r.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, fds := range r.store {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	})
	go func() {
		buf, oob := make([]byte, 8192), make([]byte, unix.CmsgSpace(4*16))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			text := string(buf[:n])
			var fds []int
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if f, err := unix.ParseUnixRights(&c); err == nil {
						fds = append(fds, f...)
					}
				}
			}
			name := ""
			for _, l := range strings.Split(text, "\n") {
				if v, ok := strings.CutPrefix(l, "FDNAME="); ok {
					name = v
				}
			}
			r.mu.Lock()
			r.texts = append(r.texts, text)
			switch {
			case strings.Contains(text, "FDSTOREREMOVE=1"):
				for _, fd := range r.store[name] {
					unix.Close(fd)
				}
				delete(r.store, name)
			case strings.Contains(text, "FDSTORE=1"):
				r.store[name] = append(r.store[name], fds...)
				fds = nil
			}
			r.mu.Unlock()
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}()
	return r
}

// stored returns the inodes of the sockets stored under name.
func (r *fdRecorder) stored(t *testing.T, name string) []uint64 {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []uint64
	for _, fd := range r.store[name] {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err == nil {
			out = append(out, st.Ino)
		}
	}
	return out
}

// fdStoreMessages returns the fd-store messages received.
func (r *fdRecorder) fdStoreMessages() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, text := range r.texts {
		if strings.Contains(text, "FDSTORE") {
			out = append(out, text)
		}
	}
	return out
}

// serveStore passes the sockets stored under name, once, to whoever
// connects to the unix socket it returns (the launcher of the restart:
// systemd passing its fd store to the service's next start).
func (r *fdRecorder) serveStore(t *testing.T, name string) string {
	t.Helper()
	path := filepath.Join(test.ShortTempDir(t), "store")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	r.mu.Lock()
	fds := append([]int(nil), r.store[name]...)
	r.mu.Unlock()
	go func() {
		_ = ln.SetDeadline(time.Now().Add(startTimeout))
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		_, _, _ = c.WriteMsgUnix([]byte("x"), unix.UnixRights(fds...), nil)
	}()
	return path
}

// launchStoredPy starts molt as systemd starts a service with a stored
// fd store: it fetches the sockets from STORE, puts them at 3, 4, ...
// and sets LISTEN_PID (its own pid: it executes molt), LISTEN_FDS and
// LISTEN_FDNAMES.
//
//	launch.py STORE NAMES MOLT ARGS...
const launchStoredPy = `
import array, fcntl, os, socket, sys
store, names, molt = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(store)
msg, anc, flags, addr = s.recvmsg(16, socket.CMSG_SPACE(4 * 16))
s.close()
fds = []
for level, typ, data in anc:
    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
        a = array.array("i")
        a.frombytes(data[:len(data) - len(data) % 4])
        fds += list(a)
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(molt, [molt] + sys.argv[4:])
`

// TestFDStore_SystemdStoreKeepsTheSocketsAcrossARestart: under systemd
// with an fd store ($FDSTORE), the keeper forwards each stored socket to
// it, named molt-fdstore.<name>. After a stop of the whole service the
// socket still queues connections (systemd holds it); the next start
// gets it back in LISTEN_FDS, the keeper stores it again, the master
// adopts it as its own listener (not as socket-activated), and the
// connection that queued meanwhile is answered.
func TestFDStore_SystemdStoreKeepsTheSocketsAcrossARestart(t *testing.T) {
	t.Parallel()
	python, _, reports := attackScript(t)
	launcher := filepath.Join(filepath.Dir(reports), "launch.py")
	if err := os.WriteFile(launcher, []byte(launchStoredPy), 0o644); err != nil {
		t.Fatal(err)
	}
	sd := startFDRecorder(t)
	args := []string{"--listen", "web=127.0.0.1:0", "--workers", "2"}
	u := start(t, runOpts{Keeper: true, Env: []string{"NOTIFY_SOCKET=" + sd.path, "FDSTORE=16"}, Args: args})
	addr := u.addr()
	u.waitServing()
	web := listenerInodes(t, []string{addr}, nil)
	test.WaitFor(t, stepTimeout, "the keeper to pass the listener to systemd's store", func() error {
		got := sd.stored(t, "molt-fdstore.web")
		if len(got) != 1 || web[got[0]] == "" {
			return fmt.Errorf("systemd's store holds %v under molt-fdstore.web, want the listener %v; messages %q", got, web, sd.fdStoreMessages())
		}
		return nil
	})
	if code := u.stopKeeper(quit); code != 0 {
		t.Fatalf("keeper exit %d after QUIT", code)
	}
	u.checkLogs()

	// The service is down; systemd's store holds the socket: a client's
	// connection queues.
	c, err := net.DialTimeout("tcp", addr, reqTimeout)
	if err != nil {
		t.Fatalf("connect while the service is down: %v (the stored socket does not listen)", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")); err != nil {
		t.Fatal(err)
	}

	sd2 := startFDRecorder(t)
	store := sd.serveStore(t, "molt-fdstore.web")
	r := start(t, runOpts{Keeper: true, Env: []string{"NOTIFY_SOCKET=" + sd2.path, "FDSTORE=16"},
		Launcher: []string{python, launcher, store, "molt-fdstore.web"}, Args: args})
	test.WaitLog(t, r.log, startTimeout, 1, "the stored socket back in the keeper's store", test.Event("keeper.fdstore", "action", "restored", "name", "web"))
	ln := test.WaitLog(t, r.log, startTimeout, 1, "the listener", test.Event("listener.listening", "listener", "web"))[0]
	if got := ln.Str("addr"); got != addr || ln.Raw == "" || strings.Contains(ln.Raw, `"activated":true`) {
		t.Errorf("the restarted master listens %s on %s, want the stored socket on %s, not as an activated one", ln.Raw, got, addr)
	}
	_ = c.SetDeadline(time.Now().Add(reqTimeout))
	resp, err := io.ReadAll(c)
	if err != nil || !strings.HasPrefix(string(resp), "HTTP/1.1 200") {
		t.Errorf("the connection queued while the service was down: %q, %v; want a 200", resp, err)
	}
	r.waitServing()
	test.WaitLog(t, r.log, stepTimeout, 1, "the master's push of the same socket", test.Event("keeper.fdstore", "action", "unchanged", "name", "web"))
	if msgs := sd2.fdStoreMessages(); len(msgs) != 0 {
		t.Errorf("the keeper passed systemd's own socket back to it: %q", msgs)
	}
	st := statusOf(t, r.pidFile)
	if a := activatedListeners(st); a != "" {
		t.Errorf("listeners marked socket-activated: %s; the stored socket is molt's own", a)
	}
	if code := r.stopKeeper(quit); code != 0 {
		t.Errorf("keeper exit %d after QUIT", code)
	}
	r.checkLogs()
}

// startWebAndAdm starts molt under its keeper with two listeners, web
// (TCP on loopback) and adm (a unix socket under a short temporary
// directory), and waits until it serves; it returns the addresses by name
// and adm's path.
func startWebAndAdm(t *testing.T) (*master, map[string]string, string) {
	t.Helper()
	dir := test.ShortTempDir(t)
	sock := filepath.Join(dir, "adm.sock")
	u := start(t, runOpts{Dir: dir, Deploy: byRename, Keeper: true, Config: fdstoreConfig("web=127.0.0.1:0", "adm=unix:"+sock)})
	addrs := u.addrs(2)
	u.waitServing()
	return u, addrs, sock
}
