package safefile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
	"golang.org/x/sys/unix"
)

const nobody = 65534

// sharedDir makes a world-writable sticky directory (as /tmp) under a
// private temp dir.
func sharedDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "shared")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	return dir
}

func requireRoot(t *testing.T) {
	t.Helper()
	test.Require(t, "root", os.Geteuid() == 0, "the test gives files to nobody (chown)")
}

const flags = os.O_WRONLY | os.O_APPEND | os.O_CREATE

func TestOpen_CreatesAndAppendsInAPrivateDir(t *testing.T) {
	path := filepath.Join(t.TempDir(), "molt.log")
	for range 2 {
		f, err := Open(path, flags, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString("x\n"); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if b, _ := os.ReadFile(path); string(b) != "x\nx\n" {
		t.Fatalf("content %q", b)
	}
	d, err := CheckDir(filepath.Dir(path))
	if err != nil || d.Shared != "" {
		t.Fatalf("CheckDir: %+v, %v: want a private dir", d, err)
	}
}

func TestOpen_RefusesASymlinkInASharedDir(t *testing.T) {
	dir := sharedDir(t)
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "molt.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	_, err := Open(link, flags, 0o644)
	if !errors.Is(err, ErrSymlink) || !strings.Contains(err.Error(), link) {
		t.Fatalf("Open: %v, want ErrSymlink naming %s", err, link)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("target changed: %q", b)
	}
	// A dangling one (the target would be created) too.
	link2 := filepath.Join(dir, "molt.pid.lock")
	if err := os.Symlink(filepath.Join(t.TempDir(), "new"), link2); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link2, os.O_RDWR|os.O_CREATE, 0o600); !errors.Is(err, ErrSymlink) {
		t.Fatalf("Open dangling symlink: %v, want ErrSymlink", err)
	}
}

func TestOpen_FollowsASymlinkInAPrivateDirAndChecksItsTarget(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(t.TempDir(), "real.log")
	link := filepath.Join(dir, "molt.log")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	f, err := Open(link, flags, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := os.Stat(real); err != nil {
		t.Fatalf("target not created: %v", err)
	}
	// A private symlink into a shared dir: the target is judged there.
	shared := sharedDir(t)
	if err := os.Symlink(filepath.Join(t.TempDir(), "x"), filepath.Join(shared, "hop")); err != nil {
		t.Fatal(err)
	}
	link2 := filepath.Join(dir, "molt2.log")
	if err := os.Symlink(filepath.Join(shared, "hop"), link2); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link2, flags, 0o644); !errors.Is(err, ErrSymlink) {
		t.Fatalf("Open through a shared dir's symlink: %v, want ErrSymlink", err)
	}
}

func TestOpen_RefusesAFileOfAnotherUser(t *testing.T) {
	requireRoot(t)
	for _, dir := range []string{t.TempDir(), sharedDir(t)} {
		path := filepath.Join(dir, "molt.pid.lock")
		if err := os.WriteFile(path, nil, 0o666); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, nobody, nobody); err != nil {
			t.Fatal(err)
		}
		_, err := Open(path, os.O_RDWR|os.O_CREATE, 0o600)
		if !errors.Is(err, ErrOwner) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "uid 65534") {
			t.Fatalf("Open %s: %v, want ErrOwner naming it and uid 65534", path, err)
		}
	}
}

func TestOpen_RefusesAFIFOAndAHardLinkInASharedDir(t *testing.T) {
	dir := sharedDir(t)
	fifo := filepath.Join(dir, "molt.log")
	if err := unix.Mkfifo(fifo, 0o666); err != nil {
		t.Fatal(err)
	}
	// Without O_NONBLOCK this open would wait for a reader forever; with
	// it, the kernel says ENXIO (no reader).
	if _, err := Open(fifo, flags, 0o644); !errors.Is(err, unix.ENXIO) {
		t.Fatalf("Open FIFO for writing: %v, want ENXIO", err)
	}
	if _, err := Open(fifo, os.O_RDWR|os.O_CREATE, 0o600); !errors.Is(err, ErrNotFile) {
		t.Fatalf("Open FIFO: %v, want ErrNotFile", err)
	}
	orig := filepath.Join(dir, "orig")
	if err := os.WriteFile(orig, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(dir, "molt.pid.lock")
	if err := os.Link(orig, hard); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(hard, os.O_RDWR|os.O_CREATE, 0o600); !errors.Is(err, ErrLinks) {
		t.Fatalf("Open hard link: %v, want ErrLinks", err)
	}
}

func TestCheckDir(t *testing.T) {
	sticky := sharedDir(t)
	d, err := CheckDir(sticky)
	if err != nil || !strings.Contains(d.Shared, "writable by every user") {
		t.Fatalf("sticky world-writable: %+v, %v: want shared with a reason", d, err)
	}
	// A private dir inside a sticky one is private: nobody can rename it.
	inner := filepath.Join(sticky, "private")
	if err := os.Mkdir(inner, 0o700); err != nil {
		t.Fatal(err)
	}
	if d, err := CheckDir(inner); err != nil || d.Shared != "" {
		t.Fatalf("private dir in a sticky one: %+v, %v", d, err)
	}
	open := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{open, filepath.Join(open, "sub")} {
		_ = os.Mkdir(dir, 0o700)
		if _, err := CheckDir(dir); !errors.Is(err, ErrSharedDir) || !strings.Contains(err.Error(), open) || !strings.Contains(err.Error(), "0777") {
			t.Fatalf("CheckDir(%s) under a world-writable dir without sticky bit: %v, want ErrSharedDir naming %s", dir, err, open)
		}
	}
	if _, err := Open(filepath.Join(open, "molt.log"), flags, 0o644); !errors.Is(err, ErrSharedDir) {
		t.Fatalf("Open in it: %v, want ErrSharedDir", err)
	}
	if os.Geteuid() == 0 {
		theirs := filepath.Join(t.TempDir(), "theirs")
		if err := os.Mkdir(theirs, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, nobody, nobody); err != nil {
			t.Fatal(err)
		}
		if _, err := CheckDir(theirs); !errors.Is(err, ErrSharedDir) || !strings.Contains(err.Error(), "uid 65534") {
			t.Fatalf("CheckDir of nobody's dir: %v, want ErrSharedDir naming uid 65534", err)
		}
	}
}

func TestCheckDir_GroupWritable(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "group")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 0, nobody); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []os.FileMode{0o775, os.ModeSticky | 0o775} {
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		d, err := CheckDir(dir)
		if err != nil || !strings.Contains(d.Shared, "writable by group 65534") {
			t.Fatalf("mode %v: %+v, %v: want shared, naming the group", mode, d, err)
		}
	}
	if err := os.Chown(dir, 0, 0); err != nil {
		t.Fatal(err)
	}
	if d, err := CheckDir(dir); err != nil || d.Shared != "" {
		t.Fatalf("writable by root's group: %+v, %v: want private", d, err)
	}
}
