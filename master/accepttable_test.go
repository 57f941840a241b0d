package master

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// TestAcceptTable_EntriesZeroedAndReused: an entry is zeroed when taken
// (whatever its last worker wrote there) and when released; the header
// counts the entries ever used; the lowest free entry is taken first;
// the memfd is sealed so no worker can resize it.
func TestAcceptTable_EntriesZeroedAndReused(t *testing.T) {
	tab, err := newAcceptTable()
	if err != nil {
		t.Fatal(err)
	}
	defer tab.f.Close()
	line := func(i int) []byte {
		b := make([]byte, worker.TableLine)
		if _, err := tab.f.ReadAt(b, int64(i+1)*worker.TableLine); err != nil {
			t.Fatal(err)
		}
		return b
	}
	scribble := func(i int) { // what a worker, or a hostile one, leaves
		if _, err := tab.f.WriteAt(bytes.Repeat([]byte{0xff}, worker.TableLine), int64(i+1)*worker.TableLine); err != nil {
			t.Fatal(err)
		}
	}
	header := func() uint32 {
		b := make([]byte, 4)
		if _, err := tab.f.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return binary.NativeEndian.Uint32(b)
	}
	zero := make([]byte, worker.TableLine)
	scribble(0)
	scribble(1)
	a, ok1 := tab.take()
	b, ok2 := tab.take()
	if !ok1 || !ok2 || a != 0 || b != 1 {
		t.Fatalf("take, take = %d %v, %d %v; want 0 and 1", a, ok1, b, ok2)
	}
	if !bytes.Equal(line(0), zero) || !bytes.Equal(line(1), zero) {
		t.Error("a taken entry is not zeroed")
	}
	if h := header(); h != 2 {
		t.Errorf("header = %d entries in use, want 2", h)
	}
	scribble(0)
	tab.release(0)
	if !bytes.Equal(line(0), zero) {
		t.Error("a released entry is not zeroed: siblings would still see its worker")
	}
	scribble(0)
	if c, _ := tab.take(); c != 0 {
		t.Errorf("take after release = %d, want the freed entry 0", c)
	}
	if !bytes.Equal(line(0), zero) {
		t.Error("a reused entry is not zeroed")
	}
	if h := header(); h != 2 {
		t.Errorf("header = %d after reuse, want 2", h)
	}
	for i := 2; i < acceptTableEntries; i++ {
		if _, ok := tab.take(); !ok {
			t.Fatalf("table full at %d of %d", i, acceptTableEntries)
		}
	}
	if _, ok := tab.take(); ok {
		t.Error("take on a full table succeeded")
	}
	fd, err := rawFD(tab.f)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, worker.TableLine); err == nil {
		t.Error("the table could be shrunk: a worker could SIGBUS its siblings")
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; err != nil || seals&want != want {
		t.Errorf("seals = %#x, %v; want %#x", seals, err, want)
	}
}

// The old generation's table reaches a canary read-only: the descriptor
// cannot write it or map it writable; an unsealed file is refused.
func TestAcceptTable_ReopenedReadOnlyForTheCanary(t *testing.T) {
	tab, err := newAcceptTable()
	if err != nil {
		t.Fatal(err)
	}
	defer tab.f.Close()
	ro, err := reopenReadOnly(tab.f)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); err == nil {
		t.Error("a write through the reopened table succeeded")
	}
	fd := int(ro.Fd()) // a memfd: its blocking mode is nobody's concern
	if mem, err := unix.Mmap(fd, 0, worker.TableLine, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		unix.Munmap(mem)
		t.Error("the reopened table maps writable")
	}
	mem, err := unix.Mmap(fd, 0, worker.TableLine, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("map read-only: %v", err)
	}
	unix.Munmap(mem)

	plain, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(plain), "unsealed")
	defer f.Close()
	if ro, err := reopenReadOnly(f); err == nil {
		ro.Close()
		t.Error("an unsealed file was accepted as an accept table")
	}
}
