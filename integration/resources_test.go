package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/molt-server/molt/test"
)

// Resources (issue 6): a full disk or a read-only directory for the pid
// file or the log file is a clear error at start and a logged, survivable
// error later. The filesystems are small tmpfs mounts made for the test
// (root only), unmounted at its end.

// mountTmpfs mounts a tmpfs of size at a new directory.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	test.Require(t, "root", os.Getuid() == 0, "mounting a small filesystem needs root")
	mount := test.RequireCommand(t, "mount")
	dir := test.ShortTempDir(t)
	if out, err := exec.Command(mount, "-t", "tmpfs", "-o", "size="+size+",mode=0755", "molt-test", dir).CombinedOutput(); err != nil {
		test.Require(t, "mount", false, fmt.Sprintf("mount tmpfs: %v: %s", err, out))
	}
	t.Cleanup(func() {
		// Whatever is mounted there: the tmpfs, and a read-only bind on
		// top of it if the test made one.
		for i := 0; i < 4 && mounted(dir); i++ {
			unmount(t, dir)
		}
		if mounted(dir) {
			t.Errorf("%s is still mounted", dir)
		}
	})
	return dir
}

// mounted reports whether something is mounted at dir.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// unmount detaches the mount on top of dir.
func unmount(t *testing.T, dir string) {
	t.Helper()
	if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
		t.Errorf("umount %s: %v: %s", dir, err, out)
	}
}

// readOnly bind-mounts dir read-only over itself: descriptors already open
// keep writing below, every new open, create or rename fails with EROFS.
func readOnly(t *testing.T, dir string) {
	t.Helper()
	for _, args := range [][]string{{"--bind", dir, dir}, {"-o", "remount,bind,ro", dir}} {
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
}

// fill writes a file in dir until the filesystem is full, and returns it.
func fill(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 64<<10)
	for i := 0; ; i++ {
		if i > 1<<14 { // 1 GiB: not a small tmpfs
			t.Fatal("the filesystem never filled")
		}
		if _, err := f.Write(block); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return path
		}
	}
}

// TestResources_AtStart: a pid file or a log file on a full filesystem,
// and a pid file in a read-only directory, stop molt before it serves,
// with a message that names the file and the cause.
func TestResources_AtStart(t *testing.T) {
	t.Parallel()
	full := mountTmpfs(t, "256k")
	fill(t, full)
	ro := mountTmpfs(t, "256k")
	readOnly(t, ro)
	here := t.TempDir()
	for _, c := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"pid file on a full disk", []string{"--pid-file", filepath.Join(full, "molt.pid")}, 1,
			"write " + filepath.Join(full, "molt.pid") + ": "},
		{"log file on a full disk", []string{"--pid-file", filepath.Join(here, "molt.pid"), "--log-file", filepath.Join(full, "molt.log")}, 2,
			"log file " + filepath.Join(full, "molt.log") + ": no space left on its filesystem"},
		{"pid file in a read-only directory", []string{"--pid-file", filepath.Join(ro, "molt.pid")}, 1,
			"read-only file system"},
		{"log file in a read-only directory", []string{"--pid-file", filepath.Join(here, "molt.pid"), "--log-file", filepath.Join(ro, "molt.log")}, 2,
			"read-only file system"},
	} {
		code, out := runToEnd(t, here, bins.molt, append([]string{"run", "--no-keeper", "--listen", "127.0.0.1:0", "--workers", "1"}, c.args...)...)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, want %d with %q:\n%s", c.name, code, c.code, c.want, out)
		}
		if c.code == 1 && !strings.Contains(out, "no space left on device") && !strings.Contains(out, "read-only") {
			t.Errorf("%s: the cause is not named:\n%s", c.name, out)
		}
	}
}

// TestResources_FullDiskLater: the pid file's filesystem fills up while
// molt serves under load: an upgrade then rolls back, saying why, and the
// pid file still names the serving master; the log file's filesystem
// fills up: requests are still answered, stderr says that log lines are
// lost and, once space is freed, that the log is written again.
func TestResources_FullDiskLater(t *testing.T) {
	t.Parallel()
	disk := mountTmpfs(t, "1m")
	dir := t.TempDir()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms", "--pid-file", filepath.Join(disk, "molt.pid")}})
	u.pidFile = filepath.Join(disk, "molt.pid")
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	filler := fill(t, disk)
	code, out := ctl(t, u.pidFile, "upgrade", "--wait")
	if code != 1 || !strings.Contains(out, "rolled back: the new master could not write the pid file") || !strings.Contains(out, "no space left on device") {
		t.Errorf("upgrade on a full disk: exit %d:\n%s", code, out)
	}
	if pid := u.current(); pid != u.Pid {
		t.Errorf("pid file names %d after the rollback, want %d", pid, u.Pid)
	}
	if fileExists(u.pidFile + ".oldbin") {
		t.Error(".oldbin left after the rollback")
	}
	l.stop(t)
	os.Remove(filler)
	u.stop(test.Event("upgrade.rolled_back"),
		test.Event("upgrade.giving_up"),
		test.Event("upgrade.new_gave_up"))

	logDisk := mountTmpfs(t, "1m")
	m := start(t, runOpts{Dir: dir,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "1", "--log-file", filepath.Join(logDisk, "molt.log")}})
	m.log = filepath.Join(logDisk, "molt.log") // the harness's --log-file came first; the last one counts
	addr = m.addr()
	m.waitServing()
	filler = fill(t, logDisk)
	// The log file's last page may still have room: fill it too (non-JSON
	// lines, which the log readers skip), so that molt's next line fails.
	lf, err := os.OpenFile(m.log, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if _, err := lf.WriteString("# the test fills this page\n"); err != nil {
			break
		}
	}
	lf.Close()
	test.WaitFor(t, stepTimeout, "stderr to tell of the lost log lines", func() error {
		get(t, addr, "/") // and a status request: each logs a line
		statusOf(t, m.pidFile)
		if !strings.Contains(m.Log(), "cannot write the log file "+m.log) {
			fi, _ := os.Stat(m.log)
			var st syscall.Statfs_t
			syscall.Statfs(logDisk, &st)
			return fmt.Errorf("stderr: %q, log %d bytes, free blocks %d", m.Log(), fi.Size(), st.Bfree)
		}
		return nil
	})
	os.Remove(filler)
	statusOf(t, m.pidFile)
	test.WaitFor(t, stepTimeout, "stderr to tell that the log works again", func() error {
		if !strings.Contains(m.Log(), "the log file "+m.log+" is written again") {
			return fmt.Errorf("stderr:\n%s", m.Log())
		}
		return nil
	})
	m.stop()
}

// TestResources_ReadOnlyLater: the directory of the pid file and the log
// file turns read-only while molt serves: USR1 cannot reopen the log
// (logged; logging goes on to the open file), an upgrade cannot move the
// pid file aside (refused, nothing changed), and requests are answered
// throughout. Once the directory is writable again, the upgrade works.
func TestResources_ReadOnlyLater(t *testing.T) {
	t.Parallel()
	disk := mountTmpfs(t, "1m")
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms",
			"--pid-file", filepath.Join(disk, "molt.pid"), "--log-file", filepath.Join(disk, "molt.log")}})
	u.pidFile, u.log = filepath.Join(disk, "molt.pid"), filepath.Join(disk, "molt.log")
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	readOnly(t, disk)
	// USR1 opens the log file anew, which a read-only directory refuses.
	u.Signal(syscall.SIGUSR1)
	test.WaitLog(t, u.log, stepTimeout, 1, "the failed reopen", test.Event("log.reopen_failed"))
	code, out := ctl(t, u.pidFile, "upgrade", "--wait")
	if code == 0 || !strings.Contains(out, "upgrade not started") || !strings.Contains(out, "read-only file system") {
		t.Errorf("upgrade in a read-only directory: exit %d:\n%s", code, out)
	}
	if st := statusOf(t, u.pidFile); st.PID != u.Pid || st.State != "serving" {
		t.Errorf("after the refused upgrade: %+v", st)
	}
	unmount(t, disk) // the read-only bind on top; the tmpfs below remains
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 0 {
		t.Fatalf("upgrade once writable: exit %d:\n%s", code, out)
	}
	u.waitTakeover(u.Pid)
	l.stop(t)
	u.stop(test.Event("log.reopen_failed"),
		test.Event("upgrade.not_started"))
}
