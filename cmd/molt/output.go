package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// outputs is molt run's master.Output: the files workers write to and the
// log files USR1 reopens. Workers never get molt's own log file: a worker
// holding a write descriptor on it could truncate it, or append lines
// that pass for molt's. They get the --worker-log, a file of their own,
// or molt's own stdout and stderr (the journal under systemd).
type outputs struct {
	log     *logFile // --log-file, or nil
	workers *logFile // --worker-log, or nil
}

// Files returns the --worker-log, or molt's stdout and stderr.
func (o *outputs) Files() (stdout, stderr *os.File) {
	if o.workers != nil {
		return o.workers.Files()
	}
	return os.Stdout, os.Stderr
}

// Reopen reopens both files at their paths; a file that cannot be
// reopened stays in use, and the error says which.
func (o *outputs) Reopen() error {
	var errs []error
	if o.log != nil {
		errs = append(errs, o.log.Reopen())
	}
	if o.workers != nil {
		if err := o.workers.Reopen(); err != nil {
			errs = append(errs, fmt.Errorf("--worker-log %s: %w", o.workers.path, err))
		}
	}
	return errors.Join(errs...)
}

// openWorkerLog opens the --worker-log at path as the log file is opened
// (openLogFile); it must not be the log file itself (lf, if not nil).
func openWorkerLog(path string, lf *logFile) (*logFile, error) {
	if lf != nil {
		a, errA := filepath.Abs(path)
		b, errB := filepath.Abs(lf.path)
		if errA == nil && errB == nil && a == b {
			return nil, fmt.Errorf("--worker-log %s: the workers' output must not go to molt's own --log-file", path)
		}
	}
	wl, err := openLogFile(path)
	if err != nil {
		return nil, fmt.Errorf("--worker-log %s: %w", path, err)
	}
	if lf != nil {
		fa, errA := wl.f.Stat()
		fb, errB := lf.f.Stat()
		if errA == nil && errB == nil && os.SameFile(fa, fb) {
			_ = wl.f.Close()
			return nil, fmt.Errorf("--worker-log %s: the same file as --log-file %s; the workers' output must not go to molt's own log", path, lf.path)
		}
	}
	return wl, nil
}
