package keeper

import (
	"os"
	"strconv"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// fakeTable is a process table: pid -> (parent, session).
type fakeTable map[int][2]int

func (f fakeTable) view(self, sid int) procView {
	return procView{
		self: self, sid: sid,
		getsid: func(pid int) (int, error) {
			if p, ok := f[pid]; ok {
				return p[1], nil
			}
			return 0, unix.ESRCH
		},
		parent: func(pid int) (int, bool) {
			p, ok := f[pid]
			return p[0], ok
		},
	}
}

// The keeper is pid 10 in session 5 (a shell's, pid 5); its masters stay
// in that session; workers each start a session of their own.
var table = fakeTable{
	5:  {1, 5},   // the shell that started the keeper
	10: {5, 5},   // the keeper
	11: {10, 5},  // the first master
	12: {11, 5},  // a new master, started by the first
	13: {10, 5},  // a committed master, re-parented to the keeper
	20: {11, 20}, // a worker of master 11 (setsid)
	21: {20, 20}, // the worker's child
	22: {11, 20}, // a worker's descendant re-parented... still in session 20
	30: {5, 5},   // another child of the shell, in the keeper's session
	40: {1, 40},  // a stranger
}

func TestIsMaster(t *testing.T) {
	v := table.view(10, 5)
	for _, c := range []struct {
		pid  int
		want bool
	}{
		{11, true},
		{12, true},
		{13, true},
		{20, false}, // a worker: its own session
		{21, false},
		{22, false},
		{30, false}, // the keeper's session, but not its descendant
		{40, false},
		{5, false},
		{10, false}, // the keeper itself
		{99, false}, // gone
		{0, false},
	} {
		ok, why := v.isMaster(c.pid)
		if ok != c.want || (!ok && why == "") {
			t.Errorf("pid %d: %v %q, want %v", c.pid, ok, why, c.want)
		}
	}
}

// TestOnNotice_MainPID: MAINPID= is taken only for a master, the sender
// itself or a master the keeper holds; a worker's pid (or a made-up one)
// never becomes primary. The real process table is used for what is
// checked twice around pidfd_open: this test process is the "master" and
// the keeper at once is faked as its parent.
func TestOnNotice_MainPID(t *testing.T) {
	self := os.Getpid()
	sid, _ := unix.Getsid(0)
	ppid := os.Getppid()
	k := &keeper{
		cfg: Config{}, log: hclog.NewNullLogger(), masters: map[int]int{}, quitSent: map[int]bool{},
		procs: procView{
			self: ppid, sid: sid, getsid: unix.Getsid,
			parent: func(pid int) (int, bool) {
				if pid == self {
					return ppid, true
				}
				return 0, false
			},
		},
	}
	defer func() {
		for _, fd := range k.masters {
			unix.Close(fd)
		}
	}()
	msg := func(from int, text string) notify.Msg {
		f, err := worker.ParseNotify([]byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return notify.Msg{Pid: from, Fields: f}
	}
	// A sender (checked by the reader) names another pid it does not
	// hold: refused.
	k.onNotice(msg(self, "MAINPID=1\nREADY=1"))
	if k.primary != 0 || len(k.masters) != 0 {
		t.Fatalf("MAINPID=1 taken: primary %d, masters %v", k.primary, k.masters)
	}
	// Itself: taken, held by a pidfd.
	k.onNotice(msg(self, "MAINPID="+strconv.Itoa(self)+"\nREADY=1"))
	if k.primary != self || k.masters[self] <= 0 {
		t.Fatalf("MAINPID=self not taken: primary %d, masters %v", k.primary, k.masters)
	}
	if err := k.signal(self, 0); err != nil {
		t.Errorf("signal through the pidfd: %v", err)
	}
	if err := k.signal(12345678, 0); err == nil {
		t.Error("signalled a pid the keeper does not hold")
	}
	for _, bad := range []string{"abc", "-1", "0"} {
		k.onNotice(msg(self, "MAINPID="+bad))
		if k.primary != self {
			t.Fatalf("MAINPID=%s changed the primary to %d", bad, k.primary)
		}
	}
}
