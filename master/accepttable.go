package master

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// acceptTableEntries is the size of a generation's accept table: a live
// worker holds one entry, and a slot may have two live workers (one
// draining or recycled, its successor) for each of maxWorkers slots.
const acceptTableEntries = 2 * maxWorkers

// acceptTable is this generation's accept table (worker.Balance; docs/
// worker-protocol.md, "Balance"): a sealed memfd passed to each worker,
// with an entry per live worker. The master only writes it, with pwrite:
// it zeroes an entry before starting a worker in it and after that worker
// exits, and raises the header's count of entries in use. It never reads
// it: workers are untrusted and write there what they like.
type acceptTable struct {
	f    *os.File
	used []bool // used[i]: entry i belongs to a live worker
	high int    // entries in use, as the header says: highest taken + 1
}

// newAcceptTable creates the table, sealed so that no worker can shrink
// it under its siblings' mappings (SIGBUS) or grow it.
func newAcceptTable() (*acceptTable, error) {
	fd, err := unix.MemfdCreate("molt-accept-table", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("accept table: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "molt-accept-table")
	if err := unix.Ftruncate(fd, (acceptTableEntries+1)*worker.TableLine); err != nil {
		f.Close()
		return nil, fmt.Errorf("accept table: ftruncate: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, fmt.Errorf("accept table: seal: %w", err)
	}
	return &acceptTable{f: f, used: make([]bool, acceptTableEntries)}, nil
}

// take returns a free entry, zeroed, for a worker about to start; false
// if the table is full (the worker then runs without one).
func (t *acceptTable) take() (int, bool) {
	for i, u := range t.used {
		if u {
			continue
		}
		if err := t.zero(i); err != nil {
			return 0, false
		}
		if i+1 > t.high {
			var b [4]byte
			binary.NativeEndian.PutUint32(b[:], uint32(i+1))
			if _, err := t.f.WriteAt(b[:], 0); err != nil {
				return 0, false
			}
			t.high = i + 1
		}
		t.used[i] = true
		return i, true
	}
	return 0, false
}

// release zeroes entry i, whose worker has exited (or never started), and
// frees it: siblings then see it absent.
func (t *acceptTable) release(i int) {
	if i < 0 || i >= len(t.used) || !t.used[i] {
		return
	}
	_ = t.zero(i) // a memfd write fails only on a bad fd
	t.used[i] = false
}

func (t *acceptTable) zero(i int) error {
	var line [worker.TableLine]byte
	if _, err := t.f.WriteAt(line[:], int64(i+1)*worker.TableLine); err != nil {
		return fmt.Errorf("accept table: zero entry %d: %w", i, err)
	}
	return nil
}

// acceptTableFileName is the name a generation's accept table travels
// under to the next master (PassFile), for that master's canary.
const acceptTableFileName = "accept-table"

// shareAcceptTable takes the old generation's table the old master
// passed, if this master is a new one with a canary, and passes its own
// on to the next. The canary's workers get the old table read-only
// (MOLT_ACCEPT_PEER_TABLE): they accept no more than the least busy old
// worker, so that a canary meets about its share of new connections
// (docs/upgrades.md, "Canary"). This master never reads it. Anything
// failing leaves the canary balanced within its own generation only,
// logged.
func (m *Master) shareAcceptTable() {
	inherited, err := m.hand.InheritedFile(acceptTableFileName)
	if err == nil && inherited != nil {
		if m.role() == roleNew && m.cfg.Canary > 0 && m.accept != nil {
			m.peerAccept, err = reopenReadOnly(inherited)
		}
		_ = inherited.Close()
	}
	if m.role() == roleNew && m.cfg.Canary > 0 && m.peerAccept == nil {
		why := "the old master passed no accept table"
		if err != nil {
			why = err.Error()
		} else if m.accept == nil {
			why = "this generation has no accept table"
		}
		m.log.Warn("the canary balances within its own generation only", "event", "balance.canary_unbalanced", "reason", why)
	}
	if m.accept != nil {
		if err := m.hand.PassFile(acceptTableFileName, m.accept.f); err != nil {
			m.log.Warn("the accept table does not pass to the next master; its canary will balance within its own generation only",
				"event", "balance.pass_failed", "error", err)
		}
	}
}

// reopenReadOnly opens the memfd f again, read-only: the descriptor a
// canary worker gets cannot write the old generation's table (a worker
// could still reopen it writable through /proc, as it can its own
// generation's: what it writes there only skews the balance).
func reopenReadOnly(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("old accept table: %w", err)
	}
	fd := -1
	if cerr := rc.Control(func(raw uintptr) {
		fd, err = unix.Open(fmt.Sprintf("/proc/self/fd/%d", raw), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}); cerr != nil {
		return nil, fmt.Errorf("old accept table: %w", cerr)
	}
	if err != nil {
		return nil, fmt.Errorf("old accept table: reopen read-only: %w", err)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		_ = unix.Close(fd)
		return nil, errors.New("old accept table: not sealed against shrinking")
	}
	return os.NewFile(uintptr(fd), "molt-old-accept-table"), nil
}
