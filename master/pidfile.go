package master

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/molt-server/molt/master/safefile"
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
// that another process may have open lets two owners lock two inodes. It
// is opened under safefile's rule (no symlink followed where others can
// write, no file of another user) and kept mode 0600: flock needs only
// read access, so a lock file others can read is one any user can hold to
// keep molt from starting.
func lockPIDFile(path string) (*pidFile, error) {
	lockPath := path + lockSuffix
	f, err := safefile.Open(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open pid-file lock: %w", err)
	}
	if err := f.Chmod(0o600); err != nil { // made 0644 by older versions
		_ = f.Close()
		return nil, fmt.Errorf("pid-file lock %s: %w", lockPath, err)
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
func (p *pidFile) write(pid int) error { return p.writeAt(p.path, pid) }

// writeAt writes pid to path (PATH or PATH.oldbin) as write does.
func (p *pidFile) writeAt(path string, pid int) error {
	return writeFileAtomic(path, []byte(strconv.Itoa(pid)+"\n"))
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

// toOld renames the pid file to PATH.oldbin (USR2). A pid file someone
// deleted does not stop the upgrade: PATH.oldbin is written afresh and
// missing is true, for the caller to log. rename(2) follows no symlink;
// whatever was at PATH.oldbin is replaced (the lock makes the name
// molt's).
func (p *pidFile) toOld(pid int) (missing bool, err error) {
	err = os.Rename(p.path, p.path+oldSuffix)
	if errors.Is(err, os.ErrNotExist) {
		return true, p.writeAt(p.path+oldSuffix, pid)
	}
	if err != nil {
		return false, fmt.Errorf("rename pid file to %s: %w", p.path+oldSuffix, err)
	}
	return false, nil
}

// fromOld renames PATH.oldbin back to PATH (rollback), replacing a pid
// file the failed new master may have written. With no PATH.oldbin to
// rename (deleted meanwhile), PATH is written afresh and missing is true.
func (p *pidFile) fromOld(pid int) (missing bool, err error) {
	err = os.Rename(p.path+oldSuffix, p.path)
	if errors.Is(err, os.ErrNotExist) {
		return true, p.write(pid)
	}
	if err != nil {
		return false, fmt.Errorf("rename pid file back from %s: %w", p.path+oldSuffix, err)
	}
	return false, nil
}

// close releases the lock. The lock file stays (see lockPIDFile).
func (p *pidFile) close() error { return p.lock.Close() }

// maxPIDFile bounds what readPID reads: a pid and a newline.
const maxPIDFile = 32

// readPID reads the pid in a pid file. It follows no symlink and reads
// only a regular file with one link, and at most maxPIDFile bytes, which
// it never quotes: as root it must not read (and log) a file someone
// planted or linked there.
func readPID(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 {
		return 0, fmt.Errorf("pid file %s: not a regular file with one link: not read", path)
	}
	b := make([]byte, maxPIDFile+1)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("read pid file %s: %w", path, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if n > maxPIDFile || err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s does not hold a pid", path)
	}
	return pid, nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory and a rename; on any error the temporary file is removed. The
// temporary file is created with O_EXCL under a random name (CreateTemp),
// so a name planted in advance, symlink or not, is never opened; the
// rename replaces whatever is at path and follows no symlink.
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
