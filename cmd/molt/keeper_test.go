package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMasterPath: the keeper starts masters by argv[0] made absolute, a
// bare name found through PATH, and a symlink kept as it is (a USR2 must
// re-execute whatever a deploy put at that path).
func TestMasterPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "release", "molt")
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "molt")
	if err := os.Symlink(bin, link); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	t.Setenv("PATH", dir)
	for arg0, want := range map[string]string{"molt": link, "./molt": link, link: link, "release/molt": bin} {
		got, err := masterPath(arg0)
		if err != nil || got != want {
			t.Errorf("masterPath(%q) = %q, %v; want %q", arg0, got, err, want)
		}
	}
	if _, err := masterPath("no-such-molt"); err == nil {
		t.Error("a name not on PATH was accepted")
	}
}
