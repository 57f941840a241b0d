package main

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestOutputs_WorkersNeverGetTheLogFile: without --worker-log workers get
// molt's stdout and stderr, with it that file; the log file itself, by
// the same path or another (a link), is refused as --worker-log.
func TestOutputs_WorkersNeverGetTheLogFile(t *testing.T) {
	dir := t.TempDir()
	lf, err := openLogFile(filepath.Join(dir, "molt.log"))
	if err != nil {
		t.Fatal(err)
	}
	o := &outputs{log: lf}
	if out, errf := o.Files(); out != os.Stdout || errf != os.Stderr {
		t.Errorf("without --worker-log workers get %s and %s, want molt's stdout and stderr", out.Name(), errf.Name())
	}
	wl, err := openWorkerLog(filepath.Join(dir, "workers.log"), lf)
	if err != nil {
		t.Fatal(err)
	}
	o.workers = wl
	if out, errf := o.Files(); out.Name() != wl.path || errf.Name() != wl.path {
		t.Errorf("workers get %s and %s, want %s", out.Name(), errf.Name(), wl.path)
	}
	if err := os.Rename(wl.path, wl.path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := o.Reopen(); err != nil || !fileExists(wl.path) {
		t.Errorf("reopen: %v; %s exists: %v", err, wl.path, fileExists(wl.path))
	}
	if _, err := openWorkerLog(filepath.Join(dir, ".", "molt.log"), lf); err == nil || !strings.Contains(err.Error(), "must not go to molt's own") {
		t.Errorf("the log file's path as --worker-log: %v", err)
	}
	if err := os.Link(lf.path, filepath.Join(dir, "link.log")); err != nil {
		t.Fatal(err)
	}
	if _, err := openWorkerLog(filepath.Join(dir, "link.log"), lf); err == nil || !strings.Contains(err.Error(), "the same file as --log-file") {
		t.Errorf("a link to the log file as --worker-log: %v", err)
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// TestRunConfig_EnvByName: --env KEY passes molt's own value of KEY, and
// nothing when molt has none.
func TestRunConfig_EnvByName(t *testing.T) {
	t.Setenv("MOLT_TEST_PASSED", "v=1")
	os.Unsetenv("MOLT_TEST_UNSET")
	var f runFlags
	fs := newRunFlagSet(&f, io.Discard)
	if err := fs.Parse([]string{"--env", "MOLT_TEST_PASSED", "--env", "MOLT_TEST_UNSET", "--env", "A=b", "--pid-file", filepath.Join(t.TempDir(), "p")}); err != nil {
		t.Fatal(err)
	}
	cfg, err := f.config(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"MOLT_TEST_PASSED=v=1", "A=b"}
	if !slices.Equal(cfg.Env[:2], want) {
		t.Errorf("env %q, want %q first", cfg.Env, want)
	}
	f.env = []string{"1BAD"}
	if _, err := f.config(nil); err == nil || !strings.Contains(err.Error(), `--env "1BAD"`) {
		t.Errorf("--env 1BAD: %v", err)
	}
}
