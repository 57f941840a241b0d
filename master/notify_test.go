package master

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestSearchable: a directory workers must pass through to reach their
// notify socket is checked for the execute bit that applies to them.
func TestSearchable(t *testing.T) {
	dir, err := os.MkdirTemp("", "molt-searchable-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	closed := filepath.Join(dir, "closed")
	os.Mkdir(closed, 0o700)
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o711)
	other := &syscall.Credential{Uid: 54321, Gid: 54321}
	if err := searchable(open, other); err != nil {
		t.Errorf("0711 under 0755: %v", err)
	}
	if err := searchable(closed, other); err == nil {
		t.Error("a 0700 directory of another user was found searchable")
	}
	if err := searchable(closed, &syscall.Credential{Uid: uint32(os.Getuid()), Gid: 1}); err != nil {
		t.Errorf("its owner: %v", err)
	}
}
