package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// MainSetup makes the test binary a child subreaper: processes orphaned
// by the processes under test (workers of a killed master) re-parent to
// it, so MainSweep can find them. Call it first in TestMain.
func MainSetup() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err)
	}
	return nil
}

// MainSweep kills (SIGKILL, by pid) and reaps every remaining child of the
// test binary and returns their pids with their command lines. Call it
// after m.Run: a non-empty result means some test leaked processes.
func MainSweep() []string {
	var leaked []string
	for round := 0; round < 10; round++ { // a killed child's orphans re-parent to us in turn
		pids := children()
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			// A zombie is an orphan that exited (a killed master's worker
			// that drained, re-parented to this subreaper): reap it, it
			// did not leak.
			if _, state, ok := statFields(pid); ok && state != "Z" {
				cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				leaked = append(leaked, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")))
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(pid, &ws, 0, nil)
		}
	}
	return leaked
}

// children lists this process's children.
func children() []int { return Children(os.Getpid()) }

// Children returns the pids of pid's children (its workers, for a molt
// master), from /proc/<pid>/task/*/children.
func Children(pid int) []int {
	var pids []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(f); err == nil {
				pids = append(pids, p)
			}
		}
	}
	return pids
}
