package keeper

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/master/internal/notify"
	"golang.org/x/sys/unix"
)

// listenFD is a listening TCP socket on loopback, as a raw descriptor.
func listenFD(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	return fd
}

// dupFD is what a datagram brings: the keeper's own copy of fd.
func dupFD(t *testing.T, fd int) int {
	t.Helper()
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// withFDs is a message from pid carrying fds.
func withFDs(t *testing.T, pid int, text string, fds ...int) notify.Msg {
	m := msg(t, pid, text)
	m.FDs = fds
	return m
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func inode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("fstat %d: %v", fd, err)
	}
	return st.Ino
}

func countEvent(lb *logBuf, event string) int {
	n := 0
	for _, e := range lb.events() {
		if e == event {
			n++
		}
	}
	return n
}

// TestFDStore_StoreDedupeReplaceRemove: the primary's socket is stored
// under its name; the same socket pushed again is not stored twice (the
// new copy is closed); another socket under the name replaces it (the
// old copy is closed); FDSTOREREMOVE closes and forgets it.
func TestFDStore_StoreDedupeReplaceRemove(t *testing.T) {
	k, lb := testKeeper(t, &fakeSys{}, nil)
	a, b := listenFD(t), listenFD(t)
	base := openFDs(t)

	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a)))
	if got := k.store.names(); !slices.Equal(got, []string{"web"}) || inode(t, k.store.fds["web"].fd) != inode(t, a) {
		t.Fatalf("stored %v", got)
	}
	if n := openFDs(t); n != base+1 {
		t.Errorf("after a store: %d descriptors open, want %d", n, base+1)
	}
	first := k.store.fds["web"].fd

	// Every upgrade pushes the set again: one copy per socket.
	for i := 0; i < 3; i++ {
		k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a)))
	}
	if n := openFDs(t); n != base+1 || k.store.fds["web"].fd != first {
		t.Errorf("after pushing the same socket again: %d descriptors open (want %d), copy %d (want %d)", n, base+1, k.store.fds["web"].fd, first)
	}

	// A listener moved: another socket under the same name.
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, b)))
	if inode(t, k.store.fds["web"].fd) != inode(t, b) {
		t.Error("the new socket did not replace the old one")
	}
	if n := openFDs(t); n != base+1 {
		t.Errorf("after a replace: %d descriptors open, want %d (the old copy closed)", n, base+1)
	}

	k.onNotice(msg(t, 11, "FDSTOREREMOVE=1\nFDNAME=web"))
	if len(k.store.fds) != 0 || openFDs(t) != base {
		t.Errorf("after a remove: stored %v, %d descriptors open (want %d)", k.store.names(), openFDs(t), base)
	}
	if got := countEvent(lb, "keeper.fdstore"); got != 6 { // stored, 3 unchanged (debug), replaced, removed
		t.Errorf("keeper.fdstore logged %d times: %v", got, lb.events())
	}
	if countEvent(lb, "keeper.fdstore_rejected") != 0 {
		t.Errorf("rejections: %v", lb.events())
	}
}

// TestFDStore_Rejects: descriptors from a master that is not the
// primary, or that are not one listening stream socket per message, or
// a bad name, are closed at once and logged; nothing is stored.
func TestFDStore_Rejects(t *testing.T) {
	k, lb := testKeeper(t, &fakeSys{}, nil)
	k.masters[12] = 1012 // a new master, not committed
	a := listenFD(t)
	unbound, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unbound)
	dgram, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dgram)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	base := openFDs(t)
	cases := []struct {
		name string
		m    func() notify.Msg
	}{
		{"not the primary", func() notify.Msg { return withFDs(t, 12, "FDSTORE=1\nFDNAME=web", dupFD(t, a)) }},
		{"no FDSTORE=1", func() notify.Msg { return withFDs(t, 11, "STATUS=x", dupFD(t, a)) }},
		{"FDSTORE=0", func() notify.Msg { return withFDs(t, 11, "FDSTORE=0\nFDNAME=web", dupFD(t, a)) }},
		{"two sockets", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a), dupFD(t, a)) }},
		{"kernel truncated", func() notify.Msg {
			m := withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a))
			m.FDsDiscarded = true
			return m
		}},
		{"no name", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1", dupFD(t, a)) }},
		{"bad name", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1\nFDNAME=a:b", dupFD(t, a)) }},
		{"not listening", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, unbound)) }},
		{"datagram socket", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, dgram)) }},
		{"a pipe", func() notify.Msg { return withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, p[0])) }},
		{"remove with fds", func() notify.Msg { return withFDs(t, 11, "FDSTOREREMOVE=1\nFDNAME=web", dupFD(t, a)) }},
	}
	for i, c := range cases {
		k.onNotice(c.m())
		if len(k.store.fds) != 0 {
			t.Errorf("%s: stored %v", c.name, k.store.names())
		}
		if n := openFDs(t); n != base {
			t.Errorf("%s: %d descriptors open, want %d: the message's were not closed", c.name, n, base)
		}
		if got := countEvent(lb, "keeper.fdstore_rejected"); got != i+1 {
			t.Errorf("%s: %d rejections logged, want %d", c.name, got, i+1)
		}
	}
	// A non-primary master cannot remove the primary's sockets either.
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a)))
	k.onNotice(msg(t, 12, "FDSTOREREMOVE=1\nFDNAME=web"))
	if !slices.Equal(k.store.names(), []string{"web"}) {
		t.Errorf("a non-primary removed a stored socket: %v", k.store.names())
	}
}

// TestFDStore_Limit: the store holds at most its bound of names; a name
// beyond is refused and its socket closed, a stored name may still
// change its socket.
func TestFDStore_Limit(t *testing.T) {
	k, lb := testKeeper(t, &fakeSys{}, nil)
	k.store = newFDStore(2)
	a, b, c := listenFD(t), listenFD(t), listenFD(t)
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=a", dupFD(t, a)))
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=b", dupFD(t, b)))
	base := openFDs(t)
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=c", dupFD(t, c)))
	if !slices.Equal(k.store.names(), []string{"a", "b"}) || openFDs(t) != base || countEvent(lb, "keeper.fdstore_rejected") != 1 {
		t.Errorf("past the limit: stored %v, %d descriptors (want %d), events %v", k.store.names(), openFDs(t), base, lb.events())
	}
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=b", dupFD(t, c)))
	if inode(t, k.store.fds["b"].fd) != inode(t, c) || openFDs(t) != base {
		t.Error("a full store refused a replacement")
	}
	if FDStoreMax < 16 {
		t.Errorf("FDStoreMax %d: too few for a master's listeners", FDStoreMax)
	}
}

// TestReadNotify_StrangersFDsClosed: descriptors from a sender that is
// not a master are closed by the reader, before the loop, and logged as
// fd-store rejections.
func TestReadNotify_StrangersFDsClosed(t *testing.T) {
	k, _ := testKeeper(t, &fakeSys{}, nil)
	a := listenFD(t)
	base := openFDs(t)
	script := []notify.Msg{
		withFDs(t, 20, "FDSTORE=1\nFDNAME=web", dupFD(t, a)), // a worker
		withFDs(t, 40, "FDSTORE=1\nFDNAME=web", dupFD(t, a)), // a stranger
		{Pid: 20, FDsDiscarded: true, Err: nil},
	}
	read := scripted(script)
	var rejected, fdRejected []int
	notices := make(chan notify.Msg, 8)
	k.readNotify(read, func(pid int, _ string) { rejected = append(rejected, pid) },
		func(pid int, _ string) { fdRejected = append(fdRejected, pid) }, notices, make(chan struct{}))
	for n := range notices {
		t.Errorf("passed to the loop: %+v", n)
	}
	if !slices.Equal(fdRejected, []int{20, 40, 20}) || len(rejected) != 0 {
		t.Errorf("fd rejections %v, others %v", fdRejected, rejected)
	}
	if n := openFDs(t); n != base {
		t.Errorf("%d descriptors open, want %d", n, base)
	}
}

// sdStore is a fake systemd notify socket that records what it gets.
type sdStore struct {
	t    *testing.T
	conn *net.UnixConn
	path string
}

func newSDStore(t *testing.T) *sdStore {
	t.Helper()
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &sdStore{t: t, conn: c, path: path}
}

// next returns the next message and the inodes of the sockets it carried
// (closing its copies).
func (s *sdStore) next() (string, []uint64) {
	s.t.Helper()
	buf, oob := make([]byte, 4096), make([]byte, 256)
	_ = s.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, oobn, _, _, err := s.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		s.t.Fatalf("fake systemd: %v", err)
	}
	var inos []uint64
	cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, c := range cmsgs {
		fds, _ := unix.ParseUnixRights(&c)
		for _, fd := range fds {
			inos = append(inos, inode(s.t, fd))
			_ = unix.Close(fd)
		}
	}
	return string(buf[:n]), inos
}

// TestFDStore_Upstream: with systemd's fd store ($FDSTORE), every change
// goes on to it under the prefixed name; a replace removes the old one
// first (systemd would keep both under one name). Socket-activated
// sockets are not forwarded.
func TestFDStore_Upstream(t *testing.T) {
	sd := newSDStore(t)
	k, _ := testKeeper(t, &fakeSys{}, nil)
	k.cfg.Notify, k.cfg.FDStore = sd.path, 16
	a, b, c := listenFD(t), listenFD(t), listenFD(t)
	// Socket-activated: kept, but systemd's socket unit holds it already.
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=sys\n"+FieldActivated+"=1", dupFD(t, c)))
	if !k.store.fds["sys"].activated {
		t.Error("an activated socket not marked so")
	}
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a)))
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a))) // unchanged: nothing sent
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, b)))
	k.onNotice(msg(t, 11, "FDSTOREREMOVE=1\nFDNAME=web"))
	want := []struct {
		text string
		ino  uint64
	}{
		{"FDSTORE=1\nFDNAME=" + StoredNamePrefix + "web", inode(t, a)},
		{"FDSTOREREMOVE=1\nFDNAME=" + StoredNamePrefix + "web", 0},
		{"FDSTORE=1\nFDNAME=" + StoredNamePrefix + "web", inode(t, b)},
		{"FDSTOREREMOVE=1\nFDNAME=" + StoredNamePrefix + "web", 0},
	}
	for _, w := range want {
		text, inos := sd.next()
		if text != w.text || (w.ino == 0) != (len(inos) == 0) || (w.ino != 0 && (len(inos) != 1 || inos[0] != w.ino)) {
			t.Errorf("systemd got %q with sockets %v; want %q with %d", text, inos, w.text, w.ino)
		}
	}
}

// TestRestoreStored: of the sockets passed at start, those named with
// the prefix (systemd's fd store) are stored again under their names, as
// copies; socket-activated ones are not.
func TestRestoreStored(t *testing.T) {
	k, lb := testKeeper(t, &fakeSys{}, nil)
	a, b := listenFD(t), listenFD(t)
	k.restoreStored([]int{a, b}, []string{"molt.socket", StoredNamePrefix + "web"})
	if !slices.Equal(k.store.names(), []string{"web"}) {
		t.Fatalf("stored %v", k.store.names())
	}
	if c := k.store.fds["web"]; c.fd == b || inode(t, c.fd) != inode(t, b) {
		t.Errorf("stored fd %d: want a copy of %d", c.fd, b)
	}
	if !strings.Contains(strings.Join(lb.events(), " "), "keeper.fdstore") {
		t.Errorf("events %v", lb.events())
	}
	k.store.closeAll()
}

// TestFDStore_SetForgetsOtherNames: after pushing its whole set, the
// primary names it, and the keeper forgets (and closes) every other
// name: what a successor that died had added, after a take-back. Only
// the primary is heard.
func TestFDStore_SetForgetsOtherNames(t *testing.T) {
	sd := newSDStore(t)
	k, lb := testKeeper(t, &fakeSys{}, nil)
	k.cfg.Notify, k.cfg.FDStore = sd.path, 16
	k.masters[12] = 1012
	a, b, c := listenFD(t), listenFD(t), listenFD(t)
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=a", dupFD(t, a)))
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=b", dupFD(t, b)))
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=c", dupFD(t, c)))
	for i := 0; i < 3; i++ {
		sd.next()
	}
	base := openFDs(t)
	k.onNotice(msg(t, 12, FieldStoreSet+"=a")) // not the primary
	if len(k.store.fds) != 3 || countEvent(lb, "keeper.fdstore_rejected") != 1 {
		t.Fatalf("a non-primary's set: stored %v, events %v", k.store.names(), lb.events())
	}
	k.onNotice(msg(t, 11, FieldStoreSet+"=a:c"))
	if got := k.store.names(); !slices.Equal(got, []string{"a", "c"}) || openFDs(t) != base-1 {
		t.Errorf("after the set a:c: stored %v, %d descriptors (want %d)", got, openFDs(t), base-1)
	}
	if text, _ := sd.next(); text != "FDSTOREREMOVE=1\nFDNAME="+StoredNamePrefix+"b" {
		t.Errorf("systemd got %q, want the removal of b", text)
	}
	k.onNotice(withFDs(t, 11, FieldStoreSet+"=a", dupFD(t, b)))
	if len(k.store.fds) != 2 || openFDs(t) != base-1 {
		t.Errorf("a set with descriptors: stored %v, %d descriptors (want %d)", k.store.names(), openFDs(t), base-1)
	}
	k.onNotice(msg(t, 11, FieldStoreSet+"="))
	if len(k.store.fds) != 0 {
		t.Errorf("an empty set: stored %v", k.store.names())
	}
}

// TestFDStore_ListenFDs: the store hands its sockets to a new master as
// socket activation would, molt's own under the prefix (adopted as the
// master's own), activated ones under their plain names.
func TestFDStore_ListenFDs(t *testing.T) {
	k, _ := testKeeper(t, &fakeSys{}, nil)
	a, b := listenFD(t), listenFD(t)
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=web", dupFD(t, a)))
	k.onNotice(withFDs(t, 11, "FDSTORE=1\nFDNAME=sys\n"+FieldActivated+"=1", dupFD(t, b)))
	fds, names := k.store.listenFDs()
	if !slices.Equal(names, []string{"sys", StoredNamePrefix + "web"}) || len(fds) != 2 ||
		inode(t, fds[0]) != inode(t, b) || inode(t, fds[1]) != inode(t, a) {
		t.Errorf("listenFDs: %v %v", fds, names)
	}
	k.store.closeAll()
}
