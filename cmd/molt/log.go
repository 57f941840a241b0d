package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/hashicorp/go-hclog"
)

// newLogger builds molt's root logger. Everything in molt logs through
// named sub-loggers of it (STYLE.md principle 15).
func newLogger(out io.Writer, level string, json bool) (hclog.Logger, error) {
	lv := hclog.LevelFromString(level)
	if lv == hclog.NoLevel {
		return nil, fmt.Errorf("log level %q: want trace, debug, info, warn or error", level)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:       "molt",
		Level:      lv,
		Output:     out,
		JSONFormat: json,
	}), nil
}

// logFile is the --log-file: the master's log and, as their stdout and
// stderr, the output of workers started while it is open. USR1 reopens it
// at its path, after a rotation moved it away.
type logFile struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

func openLogFile(path string) (*logFile, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	return &logFile{path: path, f: f}, nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	return f, nil
}

// Write appends p to the current file.
func (l *logFile) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Write(p)
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
