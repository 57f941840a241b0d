package integration

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestPrivilege_WorkersRunAsAnUnprivilegedUser: a root master with
// --user nobody binds the sockets itself and runs every worker as nobody
// (uid, gid and no supplementary group of root's), across a reload too;
// the master stays root and requests are answered.
func TestPrivilege_WorkersRunAsAnUnprivilegedUser(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Getuid() == 0, "running workers as another user needs root")
	nobody, err := user.Lookup("nobody")
	test.Require(t, "user nobody", err == nil, fmt.Sprint(err))
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	// nobody must be able to run the app and write its reports.
	reports := test.ShortTempDir(t)
	os.Chmod(reports, 0o777)
	m, addr, workers := startSteady(t, 2, "--user", "nobody", "--", bins.fakeapp, "serve", "--report", reports)
	reps := waitReports(t, reports, 2)
	for _, w := range workers {
		r, ok := reps[w]
		if !ok {
			t.Errorf("no report from worker %d", w)
			continue
		}
		if r.Uid != uid || r.Gid != gid {
			t.Errorf("worker %d runs as %d:%d, want nobody %d:%d", w, r.Uid, r.Gid, uid, gid)
		}
		for _, g := range r.Groups {
			if g == 0 {
				t.Errorf("worker %d kept root's group 0 among %v", w, r.Groups)
			}
		}
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.Pid)); err != nil || !strings.Contains(string(st), "\nUid:\t0\t") {
		t.Errorf("the master is no longer root (%v)", err)
	}
	if r := get(t, addr, "/"); r.Status != 200 {
		t.Errorf("GET: %d", r.Status)
	}
	if code, out := ctl(t, m.pidFile, "reload", "--wait"); code != 0 {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	for _, w := range m.waitWorkers(2) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w))
		if err != nil || !strings.Contains(string(b), fmt.Sprintf("\nUid:\t%d\t%d\t%d\t%d\n", uid, uid, uid, uid)) {
			t.Errorf("worker %d after the reload is not nobody (%v)", w, err)
		}
	}
	m.stop()
}

// TestPrivilege_RefusedWithoutRoot: a master that is not root refuses
// --user at once, with exit 2 and a message that says why; it starts
// nothing.
func TestPrivilege_RefusedWithoutRoot(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Getuid() == 0, "the test drops to nobody to be a non-root operator")
	setpriv := test.RequireCommand(t, "setpriv")
	pub := test.ShortTempDir(t)
	os.Chmod(pub, 0o777)
	bin := filepath.Join(pub, "molt")
	if b, err := os.ReadFile(bins.molt); err != nil || os.WriteFile(bin, b, 0o755) != nil {
		t.Fatal("copy molt")
	}
	code, out := runToEnd(t, pub, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
		bin, "run", "--listen", "127.0.0.1:0", "--user", "root", "--pid-file", filepath.Join(pub, "molt.pid"))
	if code != 2 || !strings.Contains(out, "needs root; molt runs as uid 65534") {
		t.Errorf("--user as nobody: exit %d\n%s", code, out)
	}
	if fileExists(filepath.Join(pub, "molt.pid")) {
		t.Error("a refused master wrote a pid file")
	}
}
