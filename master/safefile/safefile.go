// Package safefile opens the files molt keeps while it runs as root — the
// pid file's lock, the log file — so that nothing another user can write
// steers where they point (DESIGN §7a).
//
// The rule, for the directory of a file and every directory above it
// (after resolving symlinks):
//
//   - it must be owned by root or by molt's own user, else it is refused:
//     its owner could replace anything below it;
//   - a directory every user can write without the sticky bit is refused:
//     anyone could rename molt's files away and put their own in place;
//   - the file's own directory is "shared" when every user can write it
//     with the sticky bit (like /tmp) or a group other than root's can
//     write it (like Ubuntu's /var/log, root:syslog 0775), and so is the
//     chain when a directory above is writable by such a group without
//     the sticky bit. Shared is allowed, with a warning the caller logs
//     (Dir.Shared says why); a sticky directory above one of root's is
//     not shared: nobody else can rename or replace what root owns in it.
//
// In a shared directory a file is opened with O_NOFOLLOW and must be a
// regular file with one link; in any directory an existing regular file
// must be owned by root or molt's user. A symlink in a directory nobody
// else can write was put there by root or molt's user: it is followed, and
// its target is judged by the same rule. An open never blocks on a FIFO.
package safefile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// maxHops bounds the symlinks followed from one path (as the kernel's 40,
// but molt's files need few).
const maxHops = 8

// Errors wrapped by what Open and CheckDir return, for callers and tests
// that branch on the kind of refusal.
var (
	ErrSymlink   = errors.New("is a symlink in a directory others can write")
	ErrOwner     = errors.New("is owned by another user")
	ErrNotFile   = errors.New("is not a regular file")
	ErrLinks     = errors.New("has more than one hard link")
	ErrSharedDir = errors.New("not safe for molt's files")
)

// Dir is a directory checked by CheckDir.
type Dir struct {
	// Path is the directory with every symlink resolved.
	Path string
	// Shared is empty when only root and molt's user can write Path and
	// the directories above it; otherwise it says who else can, for a
	// warning.
	Shared string
}

// CheckDir resolves dir and checks it and every directory above it under
// the package's rule. It returns an error wrapping ErrSharedDir, naming
// the directory and why, when the rule refuses it.
func CheckDir(dir string) (Dir, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Dir{}, fmt.Errorf("directory %s: %w", dir, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return Dir{}, fmt.Errorf("directory %s: %w", dir, err)
	}
	d := Dir{Path: real}
	euid := os.Geteuid()
	for p := real; ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return Dir{}, fmt.Errorf("directory %s: %w", p, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return Dir{}, fmt.Errorf("directory %s: %w: changed while checked (not a directory now)", p, ErrSharedDir)
		}
		mode := st.Mode & 0o7777
		sticky := mode&unix.S_ISVTX != 0
		switch {
		case st.Uid != 0 && int(st.Uid) != euid:
			return Dir{}, fmt.Errorf("directory %s: %w: it is owned by uid %d, neither root nor molt's user (uid %d), who could replace any file below it; use a directory owned by root",
				p, ErrSharedDir, st.Uid, euid)
		case mode&0o002 != 0 && !sticky:
			return Dir{}, fmt.Errorf("directory %s: %w: every user can write it (mode %04o) and it has no sticky bit, so anyone could replace molt's files in it; use a directory only root can write, such as /run/molt",
				p, ErrSharedDir, mode)
		case d.Shared != "":
		case mode&0o002 != 0 && p == real:
			d.Shared = fmt.Sprintf("%s is writable by every user (mode %04o, sticky)", p, mode)
		case mode&0o020 != 0 && st.Gid != 0 && (p == real || !sticky):
			// Sticky stops the group renaming a directory of molt's
			// below this one, not planting files in this one.
			d.Shared = fmt.Sprintf("%s is writable by group %d (mode %04o)", p, st.Gid, mode)
		}
		if p == "/" || p == "." {
			return d, nil
		}
	}
}

// Open opens path with flag (os.O_* flags; O_CREATE creates it with perm)
// under the package's rule: the directories are checked, a symlink is
// followed only where the rule allows, and the file opened is checked on
// its descriptor (fstat), so a file planted between the checks and the
// open is judged too. The file returned is close-on-exec and in blocking
// mode. Errors name path and wrap one of the Err values or the open's.
func Open(path string, flag int, perm os.FileMode) (*os.File, error) {
	real, shared, err := resolve(path)
	if err != nil {
		return nil, err
	}
	// O_NONBLOCK: opening a FIFO for writing would wait for a reader.
	fd, err := unix.Open(real, flag|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, uint32(perm.Perm()))
	if errors.Is(err, unix.ELOOP) {
		// A symlink planted after resolve looked.
		return nil, fmt.Errorf("refuse %s: it %w (it appeared while molt opened it)", path, ErrSymlink)
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if err := checkFile(path, &st, shared); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		_ = unix.Close(fd)
		return nil, &os.PathError{Op: "fcntl", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// checkFile judges the file open at path by its stat.
func checkFile(path string, st *unix.Stat_t, shared string) error {
	regular := st.Mode&unix.S_IFMT == unix.S_IFREG
	euid := os.Geteuid()
	switch {
	case shared != "" && !regular:
		return fmt.Errorf("refuse %s: it %w (file type %#o) and %s", path, ErrNotFile, st.Mode&unix.S_IFMT, shared)
	case regular && st.Uid != 0 && int(st.Uid) != euid:
		return fmt.Errorf("refuse %s: it %w (uid %d; molt uses only files of root or its own user, uid %d): remove it, or give it to root",
			path, ErrOwner, st.Uid, euid)
	case shared != "" && st.Nlink != 1:
		return fmt.Errorf("refuse %s: it %w (%d) and %s", path, ErrLinks, st.Nlink, shared)
	}
	return nil
}

// resolve checks the directories of path and follows a final symlink
// where the rule allows it. It returns the path to open (its last
// component not a symlink when resolve looked) and whether its directory
// is shared.
func resolve(path string) (real, shared string, err error) {
	p := path
	for hop := 0; ; hop++ {
		d, err := CheckDir(filepath.Dir(p))
		if err != nil {
			return "", "", fmt.Errorf("%s: %w", path, err)
		}
		p = filepath.Join(d.Path, filepath.Base(p))
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			// Missing: the open creates it. Anything else is judged on
			// the open descriptor.
			return p, d.Shared, nil
		}
		if d.Shared != "" {
			return "", "", fmt.Errorf("refuse %s: it %w (%s); molt follows no symlink there: remove it", p, ErrSymlink, d.Shared)
		}
		if hop == maxHops {
			return "", "", &os.PathError{Op: "open", Path: path, Err: unix.ELOOP}
		}
		target, err := os.Readlink(p)
		if err != nil {
			return "", "", err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(d.Path, target)
		}
		p = target
	}
}

// RemoveSocket unlinks a socket file this process bound, if it is still a
// socket: whatever else took its name meanwhile is not molt's to remove.
func RemoveSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s is no longer a socket", path)
	}
	return os.Remove(path)
}
