package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/safefile"
	"golang.org/x/sys/unix"
)

// newLogger builds molt's root logger. Everything in molt logs through
// named sub-loggers of it (STYLE.md principle 15).
func newLogger(out io.Writer, level string, json bool) (hclog.Logger, error) {
	lv := hclog.LevelFromString(level)
	if lv == hclog.NoLevel {
		return nil, fmt.Errorf("log level %q: want trace, debug, info, warn or error", level)
	}
	if json {
		// Valid JSON either way; jsonSafe also keeps DEL and the C1
		// controls off a terminal that shows the file (logsafe.go).
		return hclog.New(&hclog.LoggerOptions{Name: "molt", Level: lv, Output: jsonSafe{out}, JSONFormat: true}), nil
	}
	return safeLogger{hclog.New(&hclog.LoggerOptions{Name: "molt", Level: lv, Output: out})}, nil
}

// logFile is the --log-file: the master's log and, as their stdout and
// stderr, the output of workers started while it is open. USR1 reopens it
// at its path, after a rotation moved it away.
type logFile struct {
	path    string
	mu      sync.Mutex
	f       *os.File
	failing bool      // the last write failed
	warn    io.Writer // told when writes start and stop failing
	// shared says who else can write the file's directory, for a
	// warning once the logger exists ("" when nobody else can).
	shared string
}

// openLogFile opens path for appending. A file on a full filesystem is an
// error at start: every line would be lost.
func openLogFile(path string) (*logFile, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	if err := checkSpace(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("log file %s: %w", path, err)
	}
	d, err := safefile.CheckDir(filepath.Dir(path))
	if err != nil { // openAppend has just checked it
		_ = f.Close()
		return nil, fmt.Errorf("log file: %w", err)
	}
	return &logFile{path: path, f: f, warn: os.Stderr, shared: d.Shared}, nil
}

// checkSpace fails if the filesystem of f has no free block for this
// process (root may use the blocks reserved for it).
func checkSpace(f *os.File) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return nil // cannot tell; writes will say
	}
	free := st.Bavail
	if os.Geteuid() == 0 {
		free = st.Bfree
	}
	if free == 0 && st.Blocks > 0 {
		return fmt.Errorf("no space left on its filesystem: %w", unix.ENOSPC)
	}
	return nil
}

// openAppend opens path for appending, creating it 0644: the one place
// molt opens a file it appends to, as root, for itself and its workers.
// It follows safefile's rule (DESIGN §7a): no symlink followed in a
// directory others can write, no file of another user, no directory an
// unknown user owns; the error names the file and why.
func openAppend(path string) (*os.File, error) {
	f, err := safefile.Open(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	return f, nil
}

// Write appends p to the current file. The first failure of a run of
// failed writes (a full disk) and the first success after it are told on
// stderr: the lines in between are lost, and the log cannot say so.
func (l *logFile) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.f.Write(p)
	switch {
	case err != nil && !l.failing:
		l.failing = true
		fmt.Fprintf(l.warn, "molt: cannot write the log file %s (%v); log lines are lost until it works again\n", l.path, err)
	case err == nil && l.failing:
		l.failing = false
		fmt.Fprintf(l.warn, "molt: the log file %s is written again\n", l.path)
	}
	return n, err
}

// Files returns the current file as a worker's stdout and stderr.
func (l *logFile) Files() (stdout, stderr *os.File) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f, l.f
}

// Reopen opens the path anew and switches to it; on error the old file
// stays in use.
func (l *logFile) Reopen() error {
	f, err := openAppend(l.path)
	if err != nil {
		return err
	}
	l.mu.Lock()
	old := l.f
	l.f = f
	l.mu.Unlock()
	return old.Close()
}
