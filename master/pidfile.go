package master

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// LockedError reports that another master holds the pid file's lock.
type LockedError struct {
	PIDFile string
	// PID is the pid the pid file names, or 0 if it could not be read.
	PID int
}

func (e *LockedError) Error() string {
	who := "another molt master"
	if e.PID > 0 {
		who = fmt.Sprintf("molt master pid %d", e.PID)
	}
	return fmt.Sprintf("%s already runs with pid file %s (its lock %s is held): stop it first, or use another --pid-file",
		who, e.PIDFile, e.PIDFile+lockSuffix)
}

// lockSuffix names the lock file beside the pid file. The lock, not the pid
// in the file, decides whether a master runs: a pid can be reused by an
// unrelated process, a flock dies with the last process holding it.
const lockSuffix = ".lock"

// pidFile is a pid file plus the flock that proves its owner is alive.
type pidFile struct {
	path string
	lock *os.File
}

// lockPIDFile takes the exclusive lock beside path, without blocking. The
// lock file is created if needed and never removed: unlinking a lock file
// that another process may have open lets two owners lock two inodes.
func lockPIDFile(path string) (*pidFile, error) {
	lockPath := path + lockSuffix
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open pid-file lock: %w", err)
	}
	if err := flock(f); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			pid, _ := readPID(path)
			return nil, &LockedError{PIDFile: path, PID: pid}
		}
		return nil, fmt.Errorf("lock %s: %w", lockPath, err)
	}
	return &pidFile{path: path, lock: f}, nil
}

func flock(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := raw.Control(func(fd uintptr) {
		ferr = unix.Flock(int(fd), unix.LOCK_EX|unix.LOCK_NB)
	}); err != nil {
		return err
	}
	return ferr
}

// write replaces the pid file atomically (temp file in the same directory,
// then rename), so a reader never sees a partial pid.
func (p *pidFile) write(pid int) error {
	return writeFileAtomic(p.path, []byte(strconv.Itoa(pid)+"\n"))
}

// removePIDFile deletes the pid file at path if it still names pid; a file
// that names another process belongs to it.
func removePIDFile(path string, pid int) error {
	got, err := readPID(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if got != pid {
		return nil
	}
	return os.Remove(path)
}

// oldSuffix marks the pid file of an old master during an upgrade, as
// nginx's: molt.pid.oldbin.
const oldSuffix = ".oldbin"

// toOld renames the pid file to PATH.oldbin (USR2).
func (p *pidFile) toOld() error {
	if err := os.Rename(p.path, p.path+oldSuffix); err != nil {
		return fmt.Errorf("rename pid file to %s: %w", p.path+oldSuffix, err)
	}
	return nil
}

// fromOld renames PATH.oldbin back to PATH (rollback), replacing a pid
// file the failed new master may have written.
func (p *pidFile) fromOld() error {
	if err := os.Rename(p.path+oldSuffix, p.path); err != nil {
		return fmt.Errorf("rename pid file back from %s: %w", p.path+oldSuffix, err)
	}
	return nil
}

// close releases the lock. The lock file stays (see lockPIDFile).
func (p *pidFile) close() error { return p.lock.Close() }

// readPID reads the pid in a pid file.
func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: %q is not a pid", path, strings.TrimSpace(string(b)))
	}
	return pid, nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory and a rename; on any error the temporary file is removed.
func writeFileAtomic(path string, data []byte) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
