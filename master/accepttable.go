package master

import (
	"encoding/binary"
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
