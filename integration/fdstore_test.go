package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
	dir := test.ShortTempDir(t)
	sock := filepath.Join(dir, "adm.sock")
	u := start(t, runOpts{Dir: dir, Deploy: byRename, Keeper: true, Config: fdstoreConfig("web=127.0.0.1:0", "adm=unix:"+sock)})
	addrs := u.addrs(2)
	u.waitServing()
	keeper := u.Pid
	test.WaitLog(t, u.log, stepTimeout, 2, "both listeners stored", test.Event("keeper.fdstore", "action", "stored"))
	l := startLoad(t, addrs["web"])
	first := listenerInodes(t, []string{addrs["web"]}, []string{sock})
	waitStore(t, keeper, first, nil)
	checkUnpolled(t, "keeper", keeper, first, 2)

	// A reload adds "new" and drops "adm".
	writeConfig(t, u.config, fdstoreConfig("web=127.0.0.1:0", "new=127.0.0.1:0"))
	if code, out := ctl(t, u.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	added := u.addrs(3)["new"]
	test.WaitLog(t, u.log, stepTimeout, 1, "the added listener stored", test.Event("keeper.fdstore", "action", "stored", "name", "new"))
	test.WaitLog(t, u.log, stepTimeout, 1, "the dropped listener removed", test.Event("keeper.fdstore", "action", "removed", "name", "adm"))
	reloaded := listenerInodes(t, []string{addrs["web"], added}, nil)
	gone := map[uint64]string{}
	for ino, a := range first {
		if a == sock {
			gone[ino] = "adm"
		}
	}
	waitStore(t, keeper, reloaded, gone)

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
