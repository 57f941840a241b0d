package procfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Stat is what molt reads of a process from /proc/PID/stat.
type Stat struct {
	State   byte // R, S, D, T (stopped), t (traced), Z (zombie), X...
	PPID    int
	PGRP    int
	Session int
}

// ReadStat reads pid's /proc/PID/stat; ok is false if the process is gone
// (or /proc cannot be read).
func ReadStat(pid int) (st Stat, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, false
	}
	return parseStat(string(b))
}

func parseStat(s string) (st Stat, ok bool) {
	// "pid (comm) state ppid pgrp session ...": comm may hold spaces and
	// parens, so the fields start after the last ')'.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return st, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 4 || len(f[0]) != 1 {
		return st, false
	}
	var errs [3]error
	st.State = f[0][0]
	st.PPID, errs[0] = strconv.Atoi(f[1])
	st.PGRP, errs[1] = strconv.Atoi(f[2])
	st.Session, errs[2] = strconv.Atoi(f[3])
	return st, errs[0] == nil && errs[1] == nil && errs[2] == nil
}

// Children returns the pids of pid's children, from the children lists of
// all its threads (/proc/PID/task/*/children: a child belongs to the
// thread that forked it).
func Children(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// All returns the pid of every process in /proc.
func All() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			out = append(out, pid)
		}
	}
	return out
}

// NewMaster finds the new master an old master (parent) started: its one
// child that is not one of its workers (isWorker), 0 if none. An old
// master uses it for a new master that never said hello; its hello, when
// it comes, is checked the other way round (Parent).
func NewMaster(parent int, isWorker func(pid int) bool) int {
	for _, c := range Children(parent) {
		if !isWorker(c) {
			return c
		}
	}
	return 0
}
