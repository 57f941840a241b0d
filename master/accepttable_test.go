package master

import (
	"bytes"
	"encoding/binary"
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
