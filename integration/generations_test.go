package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// Upgrades need the binary at a path of the test's own: a deploy replaces
// the file there (or re-points a symlink), and USR2 re-executes the path.

// deploy is how a test puts a new binary in place.
type deploy int

const (
	byRename  deploy = iota // a new file renamed over the path
	bySymlink               // the path is a symlink, re-pointed to a new release
)

// upgradable is a master started from a deployable path.
type upgradable struct {
	*master
	path     string // what the master was started as (argv[0])
	releases int
}

// startUpgradable installs bins.molt at dir/molt (as a file, or as a
// symlink to a release directory) and starts "molt run" from that path.
func startUpgradable(t *testing.T, how deploy, args ...string) *upgradable {
	t.Helper()
	return startUpgradableIn(t, how, nil, func(string) []string { return args })
}

// startUpgradableWith is startUpgradable (byRename) with the arguments
// made by args in the master's directory (e.g. a config file there).
func startUpgradableWith(t *testing.T, args func(dir string) []string) *upgradable {
	t.Helper()
	return startUpgradableIn(t, byRename, nil, args)
}

// startUpgradableIn is the general form: env is added to molt's
// environment, args made in the master's directory.
func startUpgradableIn(t *testing.T, how deploy, env []string, args func(dir string) []string) *upgradable {
	t.Helper()
	return startUpgradableVia(t, how, nil, env, args)
}

// startUpgradableVia is startUpgradableIn through launcher (startMoltVia).
func startUpgradableVia(t *testing.T, how deploy, launcher, env []string, args func(dir string) []string) *upgradable {
	t.Helper()
	dir := test.ShortTempDir(t)
	u := &upgradable{path: filepath.Join(dir, "molt")}
	u.master = &master{t: t, dir: dir}
	u.install(t, bins.molt, how)
	u.master = startMoltVia(t, dir, launcher, u.path, env, args(dir)...)
	t.Cleanup(u.stopGenerations)
	return u
}

// install puts bin at u.path, atomically, the way a deploy does: a new
// file renamed over the path, or a new release directory and the path
// (a symlink) re-pointed to it, also by rename. Never cp onto the path:
// that fails with ETXTBSY on a running binary (golang/go#22315).
func (u *upgradable) install(t *testing.T, bin string, how deploy) {
	t.Helper()
	target := u.path
	if how == bySymlink {
		u.releases++
		rel := filepath.Join(u.dir, "releases", strconv.Itoa(u.releases))
		if err := os.MkdirAll(rel, 0o755); err != nil {
			t.Fatal(err)
		}
		target = filepath.Join(rel, "molt")
	}
	tmp := target + ".tmp"
	if err := os.Link(bin, tmp); err != nil {
		t.Fatalf("install %s: %v", bin, err)
	}
	if how == bySymlink {
		if err := os.Rename(tmp, target); err != nil {
			t.Fatal(err)
		}
		tmp = u.path + ".tmp"
		if err := os.Symlink(target, tmp); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(tmp, u.path); err != nil {
		t.Fatal(err)
	}
}

// deployFile puts an arbitrary file (a broken "new version") at the path.
func (u *upgradable) deployFile(t *testing.T, content string, mode os.FileMode) {
	t.Helper()
	tmp := u.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(tmp, mode)
	if err := os.Rename(tmp, u.path); err != nil {
		t.Fatal(err)
	}
}

// current returns the pid in the pid file.
func (u *upgradable) current(t *testing.T) int {
	t.Helper()
	return readPID(t, u.pidFile)
}

// upgrade sends USR2 to the current master and waits until a new master
// has taken over: the pid file names it, the old master is gone, and no
// .oldbin is left. It returns the new pid.
func (u *upgradable) upgrade(t *testing.T) int {
	t.Helper()
	old := u.current(t)
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	return u.waitTakeover(t, old)
}

// waitTakeover waits until a master other than old owns the pid file and
// old is gone.
func (u *upgradable) waitTakeover(t *testing.T, old int) int {
	t.Helper()
	var pid int
	test.WaitFor(t, 60*time.Second, fmt.Sprintf("a new master to take over from %d", old), func() error {
		b, err := os.ReadFile(u.pidFile)
		if err != nil {
			return err
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == old {
			return fmt.Errorf("pid file names %q", b)
		}
		if test.Alive(old) {
			return fmt.Errorf("old master %d still running", old)
		}
		if fileExists(u.pidFile + ".oldbin") {
			return fmt.Errorf(".oldbin still there")
		}
		return nil
	})
	test.Track(t, pid)
	return pid
}

// stop sends QUIT to the current master and waits for it to be gone (it
// is not the test's own child once the first master has exited), then
// checks the log.
func (u *upgradable) stop(t *testing.T, allow ...func(test.Line) bool) {
	t.Helper()
	pid := u.current(t)
	if pid == u.Pid {
		u.master.stop(allow...)
		return
	}
	if sig := test.StopPID(pid, 20*time.Second); sig != syscall.SIGQUIT {
		t.Errorf("master %d needed %v to stop", pid, sig)
	}
	u.checkLogs(allow...)
}

// stopGenerations stops every master named by the pid files other than
// the first one (which test.Start stops), at cleanup.
func (u *upgradable) stopGenerations() {
	for _, f := range []string{u.pidFile, u.pidFile + ".oldbin"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == u.Pid {
			continue
		}
		if sig := test.StopPID(pid, 20*time.Second); sig != 0 && sig != syscall.SIGQUIT {
			u.t.Errorf("master %d needed %v to stop", pid, sig)
		}
	}
}

func (d deploy) String() string {
	return map[deploy]string{byRename: "new file", bySymlink: "re-pointed symlink"}[d]
}
