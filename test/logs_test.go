package test

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestWaitLog_ReadsAppendsPartialLinesAndRotations: WaitLog reads a log as
// it grows (a line written in two pieces counts once it is whole) and
// starts over when the file is replaced, as Find would.
func TestWaitLog_ReadsAppendsPartialLinesAndRotations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "molt.log")
	appendTo := func(s string) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	tail := logTail{path: path}
	if lines, reset := tail.next(); len(lines) != 0 || reset {
		t.Fatalf("no file: %v %v", lines, reset)
	}
	appendTo(`{"event":"a.b","n":"1"}` + "\nnot json\n" + `{"event":"a.b",`)
	if lines, _ := tail.next(); len(lines) != 1 || lines[0].Str("n") != "1" {
		t.Fatalf("first look: %v", lines)
	}
	appendTo(`"n":"2"}` + "\n")
	if lines, reset := tail.next(); len(lines) != 1 || lines[0].Str("n") != "2" || reset {
		t.Fatalf("the finished line: %v %v", lines, reset)
	}
	if got := WaitLog(t, path, time.Second, 2, "two lines", Event("a.b")); len(got) != 2 {
		t.Fatalf("WaitLog: %v", got)
	}
	// Rotation: the file renamed away, a new one at the path.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	appendTo(`{"event":"a.b","n":"3"}` + "\n")
	lines, reset := tail.next()
	if !reset || len(lines) != 1 || lines[0].Str("n") != "3" {
		t.Fatalf("after the rotation: %v %v", lines, reset)
	}
	if got := WaitLog(t, path, time.Second, 1, "the new file's line", Event("a.b")); len(got) != 1 || got[0].Str("n") != "3" {
		t.Fatalf("WaitLog after the rotation: %v", got)
	}
	if got, want := len(Find(path, Event("a.b"))), 1; got != want {
		t.Fatalf("Find: %d lines, want %d", got, want)
	}
}
