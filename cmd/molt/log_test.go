package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLogFile_ReportsAFullDiskOnceAndItsEnd: writes that fail (/dev/full
// answers ENOSPC) are told once on the warning writer, and so is the
// first write that works again.
func TestLogFile_ReportsAFullDiskOnceAndItsEnd(t *testing.T) {
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("no /dev/full: %v", err)
	}
	var warn strings.Builder
	l := &logFile{path: "/dev/full", f: full, warn: &warn}
	for range 3 {
		if _, err := l.Write([]byte("line\n")); err == nil {
			t.Fatal("a write to /dev/full succeeded")
		}
	}
	if got := strings.Count(warn.String(), "cannot write the log file /dev/full"); got != 1 || !strings.Contains(warn.String(), "no space left on device") {
		t.Fatalf("warnings: %q", warn.String())
	}
	ok, err := os.Create(filepath.Join(t.TempDir(), "molt.log"))
	if err != nil {
		t.Fatal(err)
	}
	l.f = ok // as a USR1 reopen after space was freed would
	for range 2 {
		if _, err := l.Write([]byte("line\n")); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Count(warn.String(), "is written again"); got != 1 {
		t.Fatalf("warnings: %q", warn.String())
	}
	full.Close()
	ok.Close()
}
