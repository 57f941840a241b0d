package master

import (
	"os"
	"syscall"
	"time"

	"github.com/molt-server/molt/master/internal/procfs"
	"golang.org/x/sys/unix"
)

// A rollback at the deadline kills the failed new master's whole tree,
// not only the new master and the worker groups it reported: a hung new
// master may have children that never reported (workers being spawned, a
// pre-flight of its own, anything it forked), and they must not outlive
// the rollback, holding the inherited listeners.
//
// Without cgroups there is no freezer, so the tree is frozen with
// SIGSTOP, one process at a time, from the top: a process that has been
// sent SIGSTOP can start no new child (a fork in flight when the signal
// came either is restarted or has linked its child before the process
// stops, so once the process shows as stopped its children list in /proc
// is final). Every stopped process's children are stopped in turn, until
// a pass finds nothing new; then everything is killed with SIGKILL,
// which ends stopped processes too. Workers start in sessions of their
// own (session id == worker pid): every process still in such a session,
// or in a process group the new master reported, is taken as well, which
// finds a worker's children even after their parent died and they were
// re-parented away from the tree.
//
// The old master does not make itself a child subreaper
// (PR_SET_CHILD_SUBREAPER) to keep the tree's orphans: it would adopt
// every orphan of every worker of its own too, and would have to reap
// them, pid by pid, in a master that must never wait4(-1) (tableflip
// and the spawner reap their own children). What is left: a descendant
// of the new master that left both its ancestry (its parent exited
// before the deadline) and the workers' sessions (setsid of its own)
// escapes; only a cgroup would hold it.
//
// Pids are reused: a pid read from a stopped process's children list
// stays that child's until the stopped parent reaps it, which it cannot
// while stopped (but for a parent that ignores SIGCHLD, whose children
// are reaped by the kernel): after SIGSTOP, each process is checked to
// still be what it was found as (the child of that parent, in that
// session); one that is not gets SIGCONT and is left alone.

// Bounds of a tree kill.
const (
	treeStopWait  = time.Second // for the stopped processes to show as stopped, per pass
	treeMaxPasses = 20
)

// treeKiller stops, then kills, one failed new master's tree.
type treeKiller struct {
	self    int
	spare   func(pid int) bool // never touched: this master's own workers
	stopped map[int]bool
	order   []int // in the order stopped
}

// killTree kills root (a child of this master), all its descendants and
// every process in the session of one of them that leads one, or in one
// of pgids; it returns the pids it killed. spare names processes that
// must never be touched (this master's own workers).
func killTree(root int, pgids []int, spare func(pid int) bool) []int {
	k := &treeKiller{self: os.Getpid(), spare: spare, stopped: map[int]bool{}}
	mySid, _ := unix.Getsid(0)
	myPgrp := syscall.Getpgrp()
	groups := map[int]bool{}
	for _, g := range pgids {
		if g > 1 && g != k.self && g != mySid && g != myPgrp && !spare(g) {
			groups[g] = true
		}
	}
	if root > 0 {
		k.stop(root, func(st procfs.Stat) bool { return st.PPID == k.self })
	}
	for pass := 0; pass < treeMaxPasses; pass++ {
		k.waitStopped()
		n := len(k.stopped)
		for _, p := range append([]int(nil), k.order...) {
			for _, c := range procfs.Children(p) {
				parent := p
				k.stop(c, func(st procfs.Stat) bool { return st.PPID == parent })
			}
		}
		// Sessions led by a process of the tree (its workers), and the
		// reported groups: their members that left the tree.
		sessions := map[int]bool{}
		for _, p := range k.order {
			if st, ok := procfs.ReadStat(p); ok && st.Session == p && p != mySid && !spare(p) {
				sessions[p] = true
			}
		}
		if len(sessions) > 0 || len(groups) > 0 {
			in := func(st procfs.Stat) bool { return sessions[st.Session] || groups[st.PGRP] }
			for _, pid := range procfs.All() {
				if st, ok := procfs.ReadStat(pid); ok && !k.stopped[pid] && in(st) {
					k.stop(pid, in)
				}
			}
		}
		if len(k.stopped) == n {
			break
		}
	}
	for i := len(k.order) - 1; i >= 0; i-- {
		_ = syscall.Kill(k.order[i], syscall.SIGKILL)
	}
	return k.order
}

// stop sends pid SIGSTOP and keeps it if it still is what it was found as
// (is); a process that is not (its pid was reused) is continued.
func (k *treeKiller) stop(pid int, is func(procfs.Stat) bool) {
	if pid <= 1 || pid == k.self || k.stopped[pid] || k.spare(pid) {
		return
	}
	if syscall.Kill(pid, syscall.SIGSTOP) != nil {
		return // gone
	}
	st, ok := procfs.ReadStat(pid)
	if !ok {
		return
	}
	if !is(st) {
		_ = syscall.Kill(pid, syscall.SIGCONT)
		return
	}
	k.stopped[pid] = true
	k.order = append(k.order, pid)
}

// waitStopped waits, at most treeStopWait, until every process stopped so
// far shows as stopped (or dead): only then is its children list final. A
// process in an uninterruptible sleep may not stop in time; the next pass
// looks at its children again.
func (k *treeKiller) waitStopped() {
	deadline := time.Now().Add(treeStopWait)
	for _, p := range k.order {
		for {
			st, ok := procfs.ReadStat(p)
			if !ok || st.State == 'T' || st.State == 't' || st.State == 'Z' || st.State == 'X' || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond) // polling /proc: the stop is asynchronous and has no notification
		}
	}
}
