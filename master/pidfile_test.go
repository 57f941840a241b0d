package master

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/molt-server/molt/master/safefile"
)

func TestPIDFile_WriteLockRemove(t *testing.T) {
	path := filepath.Join(t.TempDir(), "molt.pid")
	pf, err := lockPIDFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := pf.write(4242); err != nil {
		t.Fatal(err)
	}
	if got, err := readPID(path); err != nil || got != 4242 {
		t.Fatalf("readPID = %d, %v; want 4242", got, err)
	}
	// A second owner is refused while the lock is held, and told who runs.
	_, err = lockPIDFile(path)
	var le *LockedError
	if !errors.As(err, &le) || le.PID != 4242 {
		t.Fatalf("second lock: %v, want a LockedError naming pid 4242", err)
	}
	if !strings.Contains(err.Error(), "already runs") || !strings.Contains(err.Error(), "--pid-file") {
		t.Errorf("lock error does not tell the operator what to do: %v", err)
	}
	// remove leaves a file that names another process alone.
	if err := pf.write(1); err != nil {
		t.Fatal(err)
	}
	if err := removePIDFile(path, 4242); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("pid file of another pid was removed: %v", err)
	}
	if err := pf.write(4242); err != nil {
		t.Fatal(err)
	}
	if err := removePIDFile(path, 4242); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("own pid file not removed: %v", err)
	}
	pf.close()
	// Once released, the lock is free again and a stale pid file is replaced.
	os.WriteFile(path, []byte("999999\n"), 0o644)
	pf2, err := lockPIDFile(path)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	defer pf2.close()
	if err := pf2.write(7); err != nil {
		t.Fatal(err)
	}
	if got, _ := readPID(path); got != 7 {
		t.Errorf("stale pid file not replaced: %d", got)
	}
}

// TestPIDFile_LockIsHeldByProcessNotPID proves that the lock, not the pid
// in the file, decides: a process holding the lock blocks a new owner even
// though the pid file names another (possibly reused) pid.
func TestPIDFile_LockIsHeldByProcessNotPID(t *testing.T) {
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("flock(1) not installed")
	}
	path := filepath.Join(t.TempDir(), "molt.pid")
	os.WriteFile(path, []byte("1\n"), 0o644)
	cmd := exec.Command("flock", "--nonblock", path+lockSuffix, "sh", "-c", "echo locked; exec sleep 30")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "locked\n" {
		t.Fatalf("flock child: %q, %v", line, err)
	}
	pf, err := lockPIDFile(path)
	var le *LockedError
	if !errors.As(err, &le) || le.PID != 1 {
		if pf != nil {
			pf.close()
		}
		t.Fatalf("lock held by pid %d: got %v, want a LockedError", cmd.Process.Pid, err)
	}
}

func TestWriteFileAtomic_NoTempLeftOnError(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "sub") // a directory: rename over it fails
	os.Mkdir(target, 0o755)
	os.WriteFile(filepath.Join(target, "x"), nil, 0o644)
	if err := writeFileAtomic(target, []byte("1")); err == nil {
		t.Fatal("rename over a non-empty directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

// TestPIDFile_PlantedNamesAreNotFollowed: in a world-writable sticky
// directory, a symlink planted at the lock's name is refused and its
// target untouched; one planted at the pid file's name is replaced by the
// atomic write, not followed; readPID reads through no symlink.
func TestPIDFile_PlantedNamesAreNotFollowed(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "shared")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, []byte("keep\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "molt.pid")
	if err := os.Symlink(target, path+lockSuffix); err != nil {
		t.Fatal(err)
	}
	if _, err := lockPIDFile(path); !errors.Is(err, safefile.ErrSymlink) || !strings.Contains(err.Error(), path+lockSuffix) {
		t.Fatalf("lock through a planted symlink: %v, want safefile.ErrSymlink naming the lock file", err)
	}
	if err := os.Remove(path + lockSuffix); err != nil {
		t.Fatal(err)
	}
	pf, err := lockPIDFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer pf.close()
	if fi, err := os.Stat(path + lockSuffix); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("lock file: %v, %v: want mode 0600", fi.Mode(), err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	if _, err := readPID(path); err == nil {
		t.Fatal("readPID followed a symlink")
	}
	if err := pf.write(4242); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep\n" {
		t.Fatalf("target written through the pid file's symlink: %q", b)
	}
	if got, err := readPID(path); err != nil || got != 4242 {
		t.Fatalf("readPID = %d, %v; want 4242", got, err)
	}
}

// TestPIDFile_MissingAtUpgradeAndRollback: a deleted pid file does not
// stop the rename to .oldbin, and the rollback restores it.
func TestPIDFile_MissingAtUpgradeAndRollback(t *testing.T) {
	path := filepath.Join(t.TempDir(), "molt.pid")
	pf, err := lockPIDFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer pf.close()
	missing, err := pf.toOld(4242)
	if err != nil || !missing {
		t.Fatalf("toOld with no pid file: missing %v, %v; want true, nil", missing, err)
	}
	if got, err := readPID(path + oldSuffix); err != nil || got != 4242 {
		t.Fatalf(".oldbin: %d, %v; want 4242", got, err)
	}
	if err := os.Remove(path + oldSuffix); err != nil {
		t.Fatal(err)
	}
	missing, err = pf.fromOld(4242)
	if err != nil || !missing {
		t.Fatalf("fromOld with no .oldbin: missing %v, %v; want true, nil", missing, err)
	}
	if got, err := readPID(path); err != nil || got != 4242 {
		t.Fatalf("restored pid file: %d, %v; want 4242", got, err)
	}
	if missing, err := pf.toOld(4242); err != nil || missing {
		t.Fatalf("toOld: missing %v, %v; want a plain rename", missing, err)
	}
	if missing, err := pf.fromOld(4242); err != nil || missing {
		t.Fatalf("fromOld: missing %v, %v; want a plain rename", missing, err)
	}
}
