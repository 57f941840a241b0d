package master

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestSearchable: a directory workers must pass through to reach their
// notify socket is checked for the execute bit that applies to them.
func TestSearchable(t *testing.T) {
	dir, err := os.MkdirTemp("", "molt-searchable-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	closed := filepath.Join(dir, "closed")
	os.Mkdir(closed, 0o700)
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o711)
	other := &syscall.Credential{Uid: 54321, Gid: 54321}
	if err := searchable(open, other); err != nil {
		t.Errorf("0711 under 0755: %v", err)
	}
	if err := searchable(closed, other); err == nil {
		t.Error("a 0700 directory of another user was found searchable")
	}
	if err := searchable(closed, &syscall.Credential{Uid: uint32(os.Getuid()), Gid: 1}); err != nil {
		t.Errorf("its owner: %v", err)
	}
}

// TestPacer_BoundsAFloodNotAWorker: a burst of notifyBurst messages
// passes at once; beyond it, messages at any rate wait so that no more
// than notifyRate a second reach the loop; after a quiet second the
// bucket has room again.
func TestPacer_BoundsAFloodNotAWorker(t *testing.T) {
	var p pacer
	now := time.Unix(1000, 0)
	if got := floodRate(t, &p, &now, notifyBurst, 1000); got > notifyRate*1.01 {
		t.Errorf("the flood reached the loop at %.0f a second, want at most %d", got, notifyRate)
	}
	now = now.Add(2 * time.Second)
	if d := p.delay(now); d != 0 {
		t.Errorf("after two quiet seconds a message waits %v", d)
	}
}

// floodRate lets p's burst pass at *now (none may wait), then sends n
// more, each the moment it may go, and returns their rate a second.
func floodRate(t *testing.T, p *pacer, now *time.Time, burst, n int) float64 {
	t.Helper()
	for i := range burst {
		if d := p.delay(*now); d != 0 {
			t.Fatalf("message %d of the burst waits %v", i, d)
		}
	}
	var waited time.Duration
	for range n {
		d := p.delay(*now)
		if d <= 0 {
			t.Fatal("a flood past the burst went unpaced")
		}
		waited += d
		*now = now.Add(d)
	}
	return float64(n) / waited.Seconds()
}

// TestPacer_ReadBudget: a reader's budget of datagrams read (any rate and
// burst given) lets its burst pass at once and then no more than its
// rate a second, dropped datagrams included.
func TestPacer_ReadBudget(t *testing.T) {
	p := pacer{rate: notifyReadRate, burst: notifyReadRate}
	now := time.Unix(1000, 0)
	if got := floodRate(t, &p, &now, notifyReadRate, 5000); got > notifyReadRate*1.01 || got < notifyReadRate*0.99 {
		t.Errorf("the flood was read at %.0f a second, want %d", got, notifyReadRate)
	}
}
