package keeper

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

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

// fakeSys is the kernel as the keeper sees it: pidfds are pid+1000, and
// every signal sent through one is recorded.
type fakeSys struct {
	mu        sync.Mutex
	signals   []string // "pid:SIG"
	closed    []int    // pids whose pidfd was closed
	elsewhere map[int]bool
	waits     []waitResult // what wait4 returns, in turn; then ECHILD
	onOpen    func(pid int)
	requests  []string // "pid path" of each stop request
}

type waitResult struct {
	pid int
	ws  unix.WaitStatus
	err error
}

func exitedWith(code int) unix.WaitStatus         { return unix.WaitStatus(code << 8) }
func killedBy(sig syscall.Signal) unix.WaitStatus { return unix.WaitStatus(sig) }

func (f *fakeSys) ops(request func(string, int, time.Duration) error) sysOps {
	return sysOps{
		pidfdOpen: func(pid int) (int, error) {
			if f.onOpen != nil {
				f.onOpen(pid)
			}
			return pid + 1000, nil
		},
		pidfdSignal: func(fd int, sig syscall.Signal) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.signals = append(f.signals, fmt.Sprintf("%d:%s", fd-1000, unix.SignalName(sig)))
			return nil
		},
		closeFD:         func(fd int) { f.closed = append(f.closed, fd-1000) },
		exitedElsewhere: func(fd int) bool { return f.elsewhere[fd-1000] },
		wait: func() (int, unix.WaitStatus, error) {
			if len(f.waits) == 0 {
				return 0, 0, unix.ECHILD
			}
			w := f.waits[0]
			f.waits = f.waits[1:]
			return w.pid, w.ws, w.err
		},
		requestStop: func(path string, primary int, timeout time.Duration) error {
			f.mu.Lock()
			f.requests = append(f.requests, fmt.Sprintf("%d %s", primary, path))
			f.mu.Unlock()
			if request == nil {
				return errors.New("no request expected")
			}
			return request(path, primary, timeout)
		},
	}
}

func (f *fakeSys) sent() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.signals)
}

// logBuf collects the keeper's JSON log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// events returns the event keys logged, in order.
func (l *logBuf) events() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(l.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			if e, ok := m["event"].(string); ok {
				out = append(out, e)
			}
		}
	}
	return out
}

// testKeeper is keeper 10 of table, holding master 11 as its primary.
func testKeeper(t *testing.T, f *fakeSys, request func(string, int, time.Duration) error) (*keeper, *logBuf) {
	t.Helper()
	lb := &logBuf{}
	log := hclog.New(&hclog.LoggerOptions{Output: lb, JSONFormat: true, Level: hclog.Debug})
	k := newKeeper(Config{Logger: log}, table.view(10, 5), f.ops(request))
	k.primary = 11
	k.masters[11] = 1011
	return k, lb
}

func msg(t *testing.T, from int, text string) notify.Msg {
	t.Helper()
	f, err := worker.ParseNotify([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return notify.Msg{Pid: from, Fields: f}
}

func heldPids(k *keeper) []int {
	var out []int
	for p := range k.masters {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestOnNotice_Primary: who may make a master primary (MAINPID=) and name
// its control socket (MOLT_CONTROL_SOCKET=). The keeper holds master 11
// as primary, whose control socket is /run/app/molt.sock; readNotify has
// checked that each sender is a master (or not: the MAINPID rules hold
// anyway).
func TestOnNotice_Primary(t *testing.T) {
	const sock = "/run/app/molt.sock"
	for _, c := range []struct {
		name        string
		from        int
		text        string
		reused      bool // the named pid is another process once its pidfd is open
		wantPrimary int
		wantControl string
		wantHeld    []int
		wantEvent   string
	}{
		{"the new master names itself at its commit", 12, "MAINPID=12\nREADY=1\nMOLT_CONTROL_SOCKET=/run/app/molt.sock", false, 12, sock, []int{11, 12}, "keeper.primary"},
		{"a new primary that names no control socket has none", 12, "MAINPID=12\nREADY=1", false, 12, "", []int{11, 12}, "keeper.primary"},
		{"a master naming another it does not hold", 12, "MAINPID=13\nREADY=1", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a master naming a held master", 13, "MAINPID=11\nREADY=1", false, 11, sock, []int{11}, ""},
		{"a master naming a worker", 11, "MAINPID=20", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a worker naming itself", 20, "MAINPID=20\nREADY=1", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a process of the shell naming itself", 30, "MAINPID=30", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"not a pid", 11, "MAINPID=abc", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a negative pid", 11, "MAINPID=-1", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"pid 0", 11, "MAINPID=0", false, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a pid reused between the check and the pidfd", 12, "MAINPID=12\nREADY=1", true, 11, sock, []int{11}, "keeper.mainpid_rejected"},
		{"a control socket from a master that is not primary", 12, "READY=1\nMOLT_CONTROL_SOCKET=/tmp/evil.sock", false, 11, sock, []int{11}, "keeper.control_rejected"},
		{"a relative control socket", 11, "READY=1\nMOLT_CONTROL_SOCKET=run/molt.sock", false, 11, sock, []int{11}, "keeper.control_rejected"},
		{"the primary moves its control socket", 11, "RELOADING=1\nMOLT_CONTROL_SOCKET=/run/app/molt.sock.oldbin", false, 11, sock + ".oldbin", []int{11}, ""},
		{"a control socket path is cleaned", 11, "READY=1\nMOLT_CONTROL_SOCKET=/run/app/x/../molt.sock2", false, 11, "/run/app/molt.sock2", []int{11}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeSys{}
			k, lb := testKeeper(t, f, nil)
			k.control = sock
			if c.reused {
				k.procs = fakeTable{10: {5, 5}, 11: {10, 5}, 12: {11, 5}}.view(10, 5)
				f.onOpen = func(pid int) { k.procs = fakeTable{10: {5, 5}, 11: {10, 5}, 12: {1, 99}}.view(10, 5) }
			}
			k.onNotice(msg(t, c.from, c.text))
			if k.primary != c.wantPrimary || k.control != c.wantControl {
				t.Errorf("primary %d, control %q; want %d, %q", k.primary, k.control, c.wantPrimary, c.wantControl)
			}
			if got := heldPids(k); !slices.Equal(got, c.wantHeld) {
				t.Errorf("holds %v, want %v", got, c.wantHeld)
			}
			if c.reused && !slices.Contains(f.closed, 12) {
				t.Error("the pidfd of the reused pid was not closed")
			}
			if ev := lb.events(); c.wantEvent != "" && !slices.Contains(ev, c.wantEvent) {
				t.Errorf("events %v, want %s", ev, c.wantEvent)
			}
		})
	}
}

// TestOnNotice_Upstream: only the primary's READY/RELOADING/STOPPING/
// STATUS reach systemd, and never MAINPID= or MOLT_CONTROL_SOCKET=.
func TestOnNotice_Upstream(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sd")
	sd, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	k, _ := testKeeper(t, &fakeSys{}, nil)
	k.cfg.Notify = path
	k.onNotice(msg(t, 12, "READY=1\nSTATUS=not the service")) // not primary: nothing
	k.onNotice(msg(t, 11, "MAINPID=11\nREADY=1\nMOLT_CONTROL_SOCKET=/run/molt.sock\nSTATUS=serving"))
	k.onNotice(msg(t, 11, "RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=upgrading"))
	k.onNotice(msg(t, 11, "STOPPING=1\nSTATUS=stopping"))
	want := []string{
		"READY=1\nSTATUS=serving",
		"RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=upgrading",
		"STOPPING=1\nSTATUS=stopping",
	}
	buf := make([]byte, 4096)
	for _, w := range want {
		_ = sd.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := sd.Read(buf)
		if err != nil {
			t.Fatalf("upstream: %v; want %q", err, w)
		}
		if got := string(buf[:n]); got != w {
			t.Errorf("upstream got %q, want %q", got, w)
		}
	}
	if !k.ready {
		t.Error("READY=1 from the primary did not make the service ready")
	}
}

// TestOnSignal_Forwarded: the operator's signals go to the primary only,
// through its pidfd; without a primary, nowhere.
func TestOnSignal_Forwarded(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGWINCH, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR1} {
		for _, primary := range []int{11, 13, 0} {
			t.Run(fmt.Sprintf("%s to primary %d", unix.SignalName(sig), primary), func(t *testing.T) {
				f := &fakeSys{}
				k, lb := testKeeper(t, f, nil)
				k.masters[13] = 1013
				k.primary = primary
				reopened := false
				k.cfg.Reopen = func() error { reopened = true; return nil }
				k.onSignal(sig)
				var want []string
				ev := "keeper.signal_not_forwarded"
				if primary != 0 {
					want, ev = []string{fmt.Sprintf("%d:%s", primary, unix.SignalName(sig))}, "keeper.signal_forwarded"
				}
				if got := f.sent(); !slices.Equal(got, want) {
					t.Errorf("sent %v, want %v", got, want)
				}
				if !slices.Contains(lb.events(), ev) {
					t.Errorf("events %v, want %s", lb.events(), ev)
				}
				if reopened != (sig == syscall.SIGUSR1) {
					t.Errorf("log reopened: %v", reopened)
				}
			})
		}
	}
}

// TestStop_FastToEveryMaster: TERM and INT go to every master the keeper
// holds, and nothing is asked of a control socket.
func TestStop_FastToEveryMaster(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			f := &fakeSys{}
			k, lb := testKeeper(t, f, nil)
			k.masters[13] = 1013
			k.control = "/run/molt.sock"
			k.onSignal(sig)
			got := f.sent()
			slices.Sort(got)
			if want := []string{"11:" + unix.SignalName(sig), "13:" + unix.SignalName(sig)}; !slices.Equal(got, want) {
				t.Errorf("sent %v, want %v", got, want)
			}
			if len(f.requests) != 0 || k.requesting {
				t.Errorf("a stop request was made: %v", f.requests)
			}
			if !slices.Contains(lb.events(), "keeper.stop") {
				t.Errorf("events %v", lb.events())
			}
		})
	}
}

// fakeControl is a master's control socket in a test: it records the
// request line and answers with reply (or, if reply is "", closes; if
// hang, never answers).
type fakeControl struct {
	path string
	got  chan string
}

func startFakeControl(t *testing.T, reply string, hang bool) *fakeControl {
	t.Helper()
	dir, err := os.MkdirTemp("", "kt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &fakeControl{path: filepath.Join(dir, "molt.sock"), got: make(chan string, 4)}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: c.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
				line, _ := bufio.NewReader(conn).ReadString('\n')
				c.got <- line
				if hang {
					// Hold the connection until the client gives up.
					_, _ = conn.Read(make([]byte, 1))
					return
				}
				if reply != "" {
					_, _ = conn.Write([]byte(reply + "\n"))
				}
			}()
		}
	}()
	return c
}

// stopResultOf waits for the stop request started by a QUIT and hands
// its result to the keeper.
func stopResultOf(t *testing.T, k *keeper) {
	t.Helper()
	select {
	case r := <-k.stopped:
		k.onStopResult(r)
	case <-time.After(10 * time.Second):
		t.Fatal("no result of the stop request within 10s")
	}
}

// TestStop_QuitIsARequest: QUIT to the keeper becomes StopAllRequest on
// the primary's control socket (served here by this test process, which
// plays the primary); the primary's OK ends it: no signal is sent.
func TestStop_QuitIsARequest(t *testing.T) {
	ctl := startFakeControl(t, `{"ok":true,"done":true,"message":"stopping"}`, false)
	f := &fakeSys{}
	k, lb := testKeeper(t, f, requestStop)
	self := os.Getpid()
	k.masters[self] = self + 1000
	k.primary, k.control = self, ctl.path
	k.onSignal(syscall.SIGQUIT)
	k.onSignal(syscall.SIGQUIT) // a second QUIT while the first is asked: not asked twice
	stopResultOf(t, k)
	if got := <-ctl.got; got != StopAllRequest+"\n" {
		t.Errorf("the control socket got %q, want %q", got, StopAllRequest+"\n")
	}
	if len(f.requests) != 1 {
		t.Errorf("requests %v, want one", f.requests)
	}
	if got := f.sent(); len(got) != 0 {
		t.Errorf("signals sent: %v", got)
	}
	ev := lb.events()
	for _, want := range []string{"keeper.stop", "keeper.stop_request", "keeper.stop_pending", "keeper.stop_requested"} {
		if !slices.Contains(ev, want) {
			t.Errorf("events %v, want %s", ev, want)
		}
	}
}

// TestStop_QuitFallsBackToSIGQUIT: when the primary cannot be asked, it
// gets SIGQUIT, and the keeper logs why.
func TestStop_QuitFallsBackToSIGQUIT(t *testing.T) {
	self := os.Getpid()
	for _, c := range []struct {
		name    string
		reply   string
		hang    bool
		noSock  bool // no control socket named
		gone    bool // named, but nothing listens there
		primary int  // the primary, if not this process (the server)
	}{
		{name: "no control socket known", noSock: true},
		{name: "nothing listens", gone: true},
		{name: "the master refuses the request", reply: `{"ok":false,"done":true,"error":"bad control request: json: unknown field \"all\""}`},
		{name: "closed without a final reply", reply: ""},
		{name: "a bad reply", reply: `not json`},
		{name: "no answer within the timeout", hang: true},
		{name: "served by another process than the primary", reply: `{"ok":true,"done":true}`, primary: 11},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeSys{}
			k, lb := testKeeper(t, f, requestStop)
			k.stopTimeout = 300 * time.Millisecond
			k.masters[self] = self + 1000
			k.primary = self
			if c.primary != 0 {
				k.primary = c.primary
			}
			switch {
			case c.noSock:
			case c.gone:
				k.control = filepath.Join(t.TempDir(), "none.sock")
			default:
				k.control = startFakeControl(t, c.reply, c.hang).path
			}
			k.onSignal(syscall.SIGQUIT)
			if !c.noSock {
				stopResultOf(t, k)
			}
			if got, want := f.sent(), []string{fmt.Sprintf("%d:SIGQUIT", k.primary)}; !slices.Equal(got, want) {
				t.Errorf("sent %v, want %v", got, want)
			}
			if !slices.Contains(lb.events(), "keeper.stop_fallback") {
				t.Errorf("events %v, want keeper.stop_fallback", lb.events())
			}
			if k.requesting {
				t.Error("a request is still marked in flight")
			}
		})
	}
}

// TestReap_ExitStatus: the keeper exits with the status of the last
// master reaped (orphans do not count), once wait4 says no child is left;
// the primary moves to a master still held when it exits.
func TestReap_ExitStatus(t *testing.T) {
	for _, c := range []struct {
		name        string
		waits       []waitResult
		elsewhere   map[int]bool
		wantDone    bool
		wantStatus  int
		wantPrimary int
		with13      bool // the keeper holds master 13 too
	}{
		{"the master exits 0", []waitResult{{pid: 11, ws: exitedWith(0)}}, nil, true, 0, 0, false},
		{"the master exits 3, an orphan 7 after", []waitResult{{pid: 11, ws: exitedWith(3)}, {pid: 99, ws: exitedWith(7)}}, nil, true, 3, 0, false},
		{"the master killed by TERM", []waitResult{{pid: 11, ws: killedBy(syscall.SIGTERM)}}, nil, true, 128 + 15, 0, false},
		{"the old master 13 exits 1, then the primary 11 exits 0", []waitResult{{pid: 13, ws: exitedWith(1)}, {pid: 11, ws: exitedWith(0)}}, nil, true, 0, 0, true},
		{"the primary exits, another master lives on", []waitResult{{pid: 11, ws: exitedWith(2)}, {pid: 0}}, nil, false, 2, 13, true},
		{"the primary exits, the other master died elsewhere", []waitResult{{pid: 11, ws: exitedWith(2)}, {pid: 0}}, map[int]bool{13: true}, false, 2, 0, true},
		{"only an orphan", []waitResult{{pid: 99, ws: exitedWith(5)}, {pid: 0}}, nil, false, 0, 11, false},
		{"EINTR is retried", []waitResult{{err: unix.EINTR}, {pid: 11, ws: exitedWith(4)}}, nil, true, 4, 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeSys{waits: c.waits, elsewhere: c.elsewhere}
			k, _ := testKeeper(t, f, nil)
			if c.with13 {
				k.masters[13] = 1013
			}
			k.control = "/run/molt.sock"
			done := k.reap()
			if done != c.wantDone || k.status != c.wantStatus || k.primary != c.wantPrimary {
				t.Errorf("done %v, status %d, primary %d; want %v, %d, %d", done, k.status, k.primary, c.wantDone, c.wantStatus, c.wantPrimary)
			}
			if k.primary != 11 && k.control != "" {
				t.Errorf("the new primary %d kept the old one's control socket %q", k.primary, k.control)
			}
		})
	}
}

// TestReadNotify: strangers are rejected before the loop; the reader
// closes notices when reading ends, or when the loop is done while it
// waits to hand a notice over.
func TestReadNotify(t *testing.T) {
	k, _ := testKeeper(t, &fakeSys{}, nil)
	script := []notify.Msg{msg(t, 20, "MAINPID=20"), msg(t, 11, "READY=1"), {Pid: 11, Err: errors.New("malformed")}}
	read := scripted(script)
	var rejected []string
	notices := make(chan notify.Msg, 8)
	k.readNotify(read, func(pid int, why string) { rejected = append(rejected, fmt.Sprint(pid)) }, func(int, string) {}, notices, make(chan struct{}))
	var got []int
	for n := range notices { // closed by the reader
		got = append(got, n.Pid)
	}
	if !slices.Equal(got, []int{11}) || !slices.Equal(rejected, []string{"20", "11"}) {
		t.Errorf("passed %v, rejected %v", got, rejected)
	}

	// The loop has ended: the reader must not wait on it for ever.
	endless := func() (notify.Msg, error) { return msg(t, 11, "READY=1"), nil }
	done := make(chan struct{})
	close(done)
	blocked := make(chan notify.Msg) // nobody reads
	ended := make(chan struct{})
	go func() { k.readNotify(endless, func(int, string) {}, func(int, string) {}, blocked, done); close(ended) }()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the reader did not end when the loop was done")
	}
}

// TestLoop_NoBusyLoopWhenTheReaderEnds: once the notify reader has ended
// (its channel closed), the loop waits on its other events instead of
// spinning on the closed channel, and exits when no process is left.
func TestLoop_NoBusyLoopWhenTheReaderEnds(t *testing.T) {
	f := &fakeSys{waits: []waitResult{{pid: 11, ws: exitedWith(6)}}}
	// The service never served: no fresh master.
	k, lb := testKeeper(t, f, nil)
	notices := make(chan notify.Msg)
	close(notices)
	sigC := make(chan os.Signal, 1)
	code := make(chan int, 1)
	go func() { code <- k.loop(sigC, notices) }()
	// Nothing happens during this window: a loop spinning on the closed
	// channel would turn millions of times in it.
	time.Sleep(200 * time.Millisecond)
	sigC <- syscall.SIGCHLD
	select {
	case c := <-code:
		if c != 6 {
			t.Errorf("exit code %d, want 6", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the loop did not end when no process was left")
	}
	if k.turns > 3 {
		t.Errorf("the loop turned %d times for one closed channel and one signal", k.turns)
	}
	if !slices.Contains(lb.events(), "keeper.exit") {
		t.Errorf("events %v", lb.events())
	}
}

// scripted reads the messages of script in order, then os.ErrClosed.
func scripted(script []notify.Msg) func() (notify.Msg, error) {
	return func() (notify.Msg, error) {
		if len(script) == 0 {
			return notify.Msg{}, os.ErrClosed
		}
		m := script[0]
		script = script[1:]
		return m, nil
	}
}
