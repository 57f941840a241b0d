package keeper

import (
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// started records the masters a keeper started afresh.
type started struct {
	path       string
	argv, env  []string
	fds        []int
	pid        int
	err        error
	specOpened []int // pids whose spec was read
	children   []int // the keeper's live children
}

// resurrectKeeper is testKeeper with a served service, a fake start
// (pids 50, 51, ...), a fake spec reader and a clock under the test's
// control; delays records every backoff.
func resurrectKeeper(t *testing.T, f *fakeSys) (*keeper, *logBuf, *started, *[]time.Duration, *time.Time) {
	t.Helper()
	st := &started{pid: 49}
	ops := f.ops(nil)
	ops.startMaster = func(path string, argv, env []string, fds []int) (int, error) {
		if st.err != nil {
			return 0, st.err
		}
		st.pid++
		st.path, st.argv, st.env, st.fds = path, argv, env, fds
		return st.pid, nil
	}
	ops.openSpec = func(pid, pidfd int) (int, []string, error) {
		st.specOpened = append(st.specOpened, pid)
		return 400 + pid, []string{"/usr/bin/molt-v2", "run", "--config", "/etc/molt.hcl"}, nil
	}
	k, lb := testKeeper(t, f, nil)
	k.sys = ops
	k.procs.children = func(int) []int { return st.children }
	k.ready = true
	k.spec = execSpec{fd: 300, argv: []string{"/usr/bin/molt", "run"}}
	k.env = []string{"HOME=/root", "NOTIFY_SOCKET=/tmp/k/notify"}
	clock := time.Unix(1000, 0)
	k.now = func() time.Time { return clock }
	var delays []time.Duration
	k.after = func(d time.Duration) <-chan time.Time {
		delays = append(delays, d)
		return make(chan time.Time)
	}
	return k, lb, st, &delays, &clock
}

// TestResurrect_Rule: a death calls for a fresh master; a stop, a clean
// exit, a refused configuration, an aborted new master, or a service
// that never served do not.
func TestResurrect_Rule(t *testing.T) {
	for _, c := range []struct {
		name     string
		ws       unix.WaitStatus
		stop     bool
		notReady bool
		want     bool
	}{
		{"SIGKILL", killedBy(syscall.SIGKILL), false, false, true},
		{"SIGSEGV", killedBy(syscall.SIGSEGV), false, false, true},
		{"exit 1", exitedWith(1), false, false, true},
		{"exit 3 (bind)", exitedWith(3), false, false, true},
		{"exit 0", exitedWith(0), false, false, false},
		{"exit 2 (configuration refused)", exitedWith(ExitRefused), false, false, false},
		{"exit 12 (aborted)", exitedWith(ExitAborted), false, false, false},
		{"SIGTERM after a stop to the keeper", killedBy(syscall.SIGTERM), true, false, false},
		{"exit 1 after a stop to the keeper", exitedWith(1), true, false, false},
		{"SIGKILL before the service ever served", killedBy(syscall.SIGKILL), false, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeSys{waits: []waitResult{{pid: 11, ws: c.ws}, {pid: 0}}}
			k, lb, _, delays, _ := resurrectKeeper(t, f)
			k.ready = !c.notReady
			if c.stop {
				k.stop(syscall.SIGTERM)
			}
			if done := k.reap(); done {
				t.Fatal("reap: no child left, want the workers still there")
			}
			if got := k.resurrectC != nil; got != c.want {
				t.Fatalf("fresh master scheduled %v, want %v; events %v", got, c.want, lb.events())
			}
			want := "keeper.no_resurrect"
			if c.want {
				want = "keeper.resurrect_scheduled"
				if len(*delays) != 1 || (*delays)[0] != 0 {
					t.Errorf("first delay %v, want 0 (at once)", *delays)
				}
			}
			if !slices.Contains(lb.events(), want) {
				t.Errorf("events %v, want %s", lb.events(), want)
			}
		})
	}
}

// TestResurrect_StartsFromSpec: the fresh master runs the spec's
// executable through its descriptor, with its argv, the keeper's
// environment and every stored socket named for adoption, and becomes
// the primary the keeper holds.
func TestResurrect_StartsFromSpec(t *testing.T) {
	f := &fakeSys{waits: []waitResult{{pid: 11, ws: killedBy(syscall.SIGKILL)}, {pid: 0}}}
	k, lb, st, _, _ := resurrectKeeper(t, f)
	k.store.fds["http"] = storedFD{fd: 200}
	k.store.fds["admin"] = storedFD{fd: 201, activated: true}
	k.reap()
	k.resurrect()
	if st.pid != 50 || st.path != "/proc/self/fd/300" || !slices.Equal(st.argv, []string{"/usr/bin/molt", "run"}) {
		t.Fatalf("started pid %d path %q argv %q", st.pid, st.path, st.argv)
	}
	if !slices.Equal(st.fds, []int{201, 200}) {
		t.Errorf("fds %v, want the store's in name order", st.fds)
	}
	for _, kv := range []string{"HOME=/root", "NOTIFY_SOCKET=/tmp/k/notify", "LISTEN_PID=10", "LISTEN_FDS=2", "LISTEN_FDNAMES=admin:molt-fdstore.http",
		EnvResurrections + "=1", EnvResurrectedBecause + "=" + k.reason} {
		if !slices.Contains(st.env, kv) {
			t.Errorf("env %q lacks %s", st.env, kv)
		}
	}
	if k.primary != 50 || k.masters[50] != 1050 || k.resurrections != 1 || k.resurrectC != nil {
		t.Errorf("primary %d, held %v, resurrections %d", k.primary, k.masters, k.resurrections)
	}
	if !slices.Contains(lb.events(), "keeper.resurrect") {
		t.Errorf("events %v", lb.events())
	}
	if !strings.Contains(k.reason, "SIGKILL") && !strings.Contains(k.reason, "killed") {
		t.Errorf("reason %q", k.reason)
	}
	// A stop asked while a fresh master is pending cancels it.
	k.masters = map[int]int{}
	k.death("test")
	k.stop(syscall.SIGQUIT)
	if k.resurrectC != nil {
		t.Error("a stop left a fresh master pending")
	}
}

// TestResurrect_BackoffAndGiveUp: deaths back off (the workers'
// backoff), a failed start counts as a death, and more than
// ResurrectMax deaths within ResurrectWindow make the keeper give up;
// deaths older than the window are forgotten.
func TestResurrect_BackoffAndGiveUp(t *testing.T) {
	f := &fakeSys{}
	k, lb, st, delays, clock := resurrectKeeper(t, f)
	k.masters = map[int]int{}
	// A death long ago is forgotten.
	k.death("long ago")
	*clock = clock.Add(ResurrectWindow)
	*delays = nil
	for i := 1; i <= ResurrectMax; i++ {
		k.death("killed")
		if k.resurrectC == nil || k.gaveUp {
			t.Fatalf("death %d: nothing scheduled (gave up %v)", i, k.gaveUp)
		}
		*clock = clock.Add(time.Second)
	}
	for i, d := range *delays {
		lo := time.Duration(0)
		if i > 0 {
			lo = 100 * time.Millisecond << (i - 1) * 8 / 10
		}
		if d < lo || d > 10*time.Second {
			t.Errorf("delay %d: %v, want >= %v", i+1, d, lo)
		}
	}
	// A failed start is one more death: the keeper gives up.
	st.err = unix.ENOEXEC
	k.resurrect()
	if !k.gaveUp || k.resurrectC != nil {
		t.Fatalf("gave up %v, pending %v after %d deaths", k.gaveUp, k.resurrectC != nil, len(k.deaths))
	}
	ev := lb.events()
	if !slices.Contains(ev, "keeper.resurrect_failed") || !slices.Contains(ev, "keeper.resurrect_gave_up") {
		t.Errorf("events %v", ev)
	}
	// Given up: a master's death later starts nothing.
	k.resurrect()
	if st.pid != 49 {
		t.Errorf("started pid %d after giving up", st.pid)
	}
}

// TestResurrect_SpecOnlyFromPrimary: MOLT_SPEC=1 registers the sender's
// spec only when it is the primary; the previous spec's descriptor is
// closed.
func TestResurrect_SpecOnlyFromPrimary(t *testing.T) {
	f := &fakeSys{}
	k, lb, st, _, _ := resurrectKeeper(t, f)
	k.masters[13] = 1013
	k.onNotice(msg(t, 13, "MOLT_SPEC=1"))
	if len(st.specOpened) != 0 || k.spec.fd != 300 {
		t.Fatalf("a non-primary's spec read: %v, spec %+v", st.specOpened, k.spec)
	}
	k.onNotice(msg(t, 11, "MOLT_SPEC=1"))
	if !slices.Equal(st.specOpened, []int{11}) || k.spec.fd != 411 || k.spec.pid != 11 || k.spec.argv[0] != "/usr/bin/molt-v2" {
		t.Fatalf("spec %+v, read %v", k.spec, st.specOpened)
	}
	if !slices.Contains(f.closed, 300-1000) {
		t.Errorf("the previous spec's descriptor not closed: %v", f.closed)
	}
	if !slices.Contains(lb.events(), "keeper.spec") {
		t.Errorf("events %v", lb.events())
	}
}

// TestOpenSpec_Live: the spec of a live process is its executable, held
// above execFDMin, and its argv.
func TestOpenSpec_Live(t *testing.T) {
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		t.Skipf("pidfd_open: %v", err)
	}
	defer unix.Close(pidfd)
	fd, argv, err := openSpec(os.Getpid(), pidfd)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if fd < execFDMin || !slices.Equal(argv, os.Args) {
		t.Errorf("fd %d (want >= %d), argv %q (want %q)", fd, execFDMin, argv, os.Args)
	}
	var a, b unix.Stat_t
	if err := unix.Fstat(fd, &a); err != nil || unix.Stat("/proc/self/exe", &b) != nil || a.Ino != b.Ino {
		t.Errorf("fd %d is not this executable: %v", fd, err)
	}
}

// TestResurrect_AdoptsAnUnknownMaster: a new master whose old master died
// before its commit (re-parented to the keeper, not yet named by
// MAINPID=) is held, and no fresh master joins it; a worker among the
// keeper's children is not a master.
func TestResurrect_AdoptsAnUnknownMaster(t *testing.T) {
	f := &fakeSys{waits: []waitResult{{pid: 11, ws: killedBy(syscall.SIGKILL)}, {pid: 0}}}
	k, lb, st, _, _ := resurrectKeeper(t, f)
	st.children = []int{20, 13} // a worker (its own session), a master
	k.reap()
	if k.resurrectC != nil || k.primary != 13 || k.masters[13] != 1013 {
		t.Fatalf("pending %v, primary %d, held %v; events %v", k.resurrectC != nil, k.primary, k.masters, lb.events())
	}
	if _, ok := k.masters[20]; ok {
		t.Error("the worker 20 held as a master")
	}
	if !slices.Contains(lb.events(), "keeper.master_adopted") {
		t.Errorf("events %v", lb.events())
	}
}

// TestResurrect_EnvDropsInherited: a keeper given MOLT_RESURRECTIONS or
// MOLT_RESURRECTED_BECAUSE itself passes its own, never those.
func TestResurrect_EnvDropsInherited(t *testing.T) {
	got := listenEnvDropped([]string{"A=1", EnvResurrections + "=99", EnvResurrectedBecause + "=forged", "LISTEN_FDS=1", "B=2"})
	if !slices.Equal(got, []string{"A=1", "B=2"}) {
		t.Errorf("env %q", got)
	}
}
