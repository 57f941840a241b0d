package master

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/molt-server/molt/upgrade"
)

// fakeHand scripts tableflip for the master's side of the dance: Children
// is one end of a real channel whose other end (peer) the test reads and
// writes as the new master would; Upgrade returns what the test sends on
// result.
type fakeHand struct {
	children, peer *upgrade.Channel
	msgs           chan upgrade.Msg // what the peer read
	result         chan error
	ready          int
}

func (h *fakeHand) HasParent() bool { return false }
func (h *fakeHand) Listener(string, func() (*os.File, error)) (*os.File, bool, error) {
	return nil, false, errors.New("no listeners in unit tests")
}
func (h *fakeHand) InheritedListener(string) (*os.File, error) { return nil, nil }
func (h *fakeHand) Replace(string, *os.File) error             { return nil }
func (h *fakeHand) Ready() error                               { h.ready++; return nil }
func (h *fakeHand) PassFile(string, *os.File) error            { return nil }
func (h *fakeHand) InheritedFile(string) (*os.File, error)     { return nil, nil }
func (h *fakeHand) Parent() (*upgrade.Channel, error)          { return nil, nil }
func (h *fakeHand) Children() (*upgrade.Channel, error)        { return h.children, nil }
func (h *fakeHand) Upgrade() error                             { return <-h.result }
func (h *fakeHand) WaitForParent(ctx context.Context) error    { <-ctx.Done(); return ctx.Err() }

// newUpgradingMaster is a serving test master with a scripted handover,
// a real pid file, and a real child process to stand for its new master
// (the hello's sender must be a child of the master).
func newUpgradingMaster(t *testing.T) (*Master, *fakeSys, *fakeHand, int) {
	t.Helper()
	m, f := newTestMaster(t, 2, nil)
	for _, pid := range f.started {
		m.markReady(m.procs[pid], "test")
	}
	a, b, err := upgrade.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	h := &fakeHand{children: a, peer: b, msgs: make(chan upgrade.Msg, 16), result: make(chan error, 1)}
	go func() {
		for {
			msg, err := b.Recv()
			if err != nil {
				return // closed at cleanup
			}
			if msg.Kind == upgrade.KindMetrics {
				continue // the counters, after the config and every change (integration: TestMetrics_*)
			}
			h.msgs <- msg
		}
	}()
	t.Cleanup(func() { a.Close(); b.Close() })
	m.hand = h
	pf, err := lockPIDFile(filepath.Join(t.TempDir(), "molt.pid"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pf.close() })
	if err := pf.write(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	m.pidFile = pf
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	return m, f, h, child.Process.Pid
}

// recv reads the next message the master sent to its new master.
func recv(t *testing.T, h *fakeHand) upgrade.Msg {
	t.Helper()
	select {
	case msg := <-h.msgs:
		return msg
	case <-time.After(5 * time.Second):
		t.Fatal("no message to the new master")
		return upgrade.Msg{}
	}
}

// upgradeDone waits for the event Upgrade's goroutine sends the loop.
func (m *Master) nextUpgradeDone(t *testing.T) upgradeDone {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ev := <-m.events:
			if d, ok := ev.(upgradeDone); ok {
				return d
			}
		case <-deadline:
			t.Fatal("Upgrade's result never reached the loop")
		}
	}
}

// TestLoop_UpgradeRollbackFromStandbyOpensNoGap drives the master's side
// of the dance through its sides' actions: USR2 moves the pid file aside,
// the hello gets the configuration, WINCH stops this generation's
// workers, the new master's failure respawns them and releases it only
// once they are all ready, and the rollback puts the pid file back.
func TestLoop_UpgradeRollbackFromStandbyOpensNoGap(t *testing.T) {
	m, f, h, child := newUpgradingMaster(t)
	if err := m.onUSR2(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.pidFile.path + oldSuffix); err != nil {
		t.Fatalf("USR2 did not move the pid file aside: %v", err)
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindHello, Pid: child}})
	if msg := recv(t, h); msg.Kind != upgrade.KindConfig || msg.To != child || msg.Workers != 2 || msg.Gen != m.gen+1 {
		t.Fatalf("configuration %+v", msg)
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindServing, Pid: child, Workers: 2}})
	m.onSignals(signalBatch{sigs: []os.Signal{syscall.SIGWINCH}})
	if len(f.signals) != 2 || m.stateName() != "standby" {
		t.Fatalf("WINCH: signals %v, state %s", f.signals, m.stateName())
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindFailed, Pid: child, Code: ExitWorkerDied, Reason: "worker died"}})
	if len(f.started) != 4 {
		t.Fatalf("%d workers started, want 2 fresh ones", len(f.started))
	}
	m.markReady(m.procs[f.started[2]], "test")
	// Nothing reaches the new master during this window: one of the old
	// generation's workers is not ready yet, so releasing it would open
	// a gap.
	select {
	case msg := <-h.msgs:
		t.Fatalf("%+v sent before the old generation serves again", msg)
	case <-time.After(100 * time.Millisecond):
	}
	m.markReady(m.procs[f.started[3]], "test")
	if msg := recv(t, h); msg.Kind != upgrade.KindRelease || msg.To != child {
		t.Fatalf("after the old generation serves again: %+v, want the release", msg)
	}
	h.result <- errors.New("upgrade: child pid=1 exited: exit status 11")
	m.onUpgradeDoneForTest(t)
	if p, err := readPID(m.pidFile.path); err != nil || p != os.Getpid() {
		t.Fatalf("pid file after the rollback: %d, %v", p, err)
	}
	if r := m.old.Last(); r == nil || r.Outcome != "rolled back" || r.Reason != "worker died" {
		t.Fatalf("last upgrade %+v", r)
	}
	if n := m.totals().Upgrades["rolled_back/worker_died"]; n != 1 {
		t.Fatalf("counted rollbacks: %v, want rolled_back/worker_died 1", m.totals().Upgrades)
	}
}

// TestLoop_StopAllDuringAnUpgradeAbortsTheNewMaster: stop --all tells the
// new master to abort and drains this generation.
func TestLoop_StopAllDuringAnUpgradeAbortsTheNewMaster(t *testing.T) {
	m, _, h, child := newUpgradingMaster(t)
	if err := m.onUSR2(); err != nil {
		t.Fatal(err)
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindHello, Pid: child}})
	recv(t, h) // the configuration
	m.onCtl(ctlEvent{req: CtlRequest{Cmd: "stop", All: true}, replies: make(chan CtlReply, 4)})
	if msg := recv(t, h); msg.Kind != upgrade.KindAbort || msg.To != child {
		t.Fatalf("stop --all: %+v, want the abort", msg)
	}
	if m.phase != phaseDraining {
		t.Fatalf("phase %v, want draining", m.phase)
	}
	m.onChildMsg(fromChild{msg: upgrade.Msg{Kind: upgrade.KindFailed, Pid: child, Code: ExitAborted, Reason: "aborted"}})
	if msg := recv(t, h); msg.Kind != upgrade.KindRelease {
		t.Fatalf("%+v, want the release at once", msg)
	}
	h.result <- errors.New("upgrade: child pid=1 exited: exit status 12")
	m.onUpgradeDoneForTest(t)
	if m.old.InFlight() {
		t.Fatal("the upgrade is still in flight")
	}
}

// onUpgradeDoneForTest applies Upgrade's result as the loop would.
func (m *Master) onUpgradeDoneForTest(t *testing.T) {
	t.Helper()
	_ = m.toOld(upgrade.UpgradeDone{Err: m.nextUpgradeDone(t).err})
}
