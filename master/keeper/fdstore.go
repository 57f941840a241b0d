package keeper

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/worker"
	"golang.org/x/sys/unix"
)

// The fd store: the keeper keeps a copy of every listening socket of the
// primary master, so that a socket outlives every master (the keeper
// will hand its copies to a master it starts afresh). The masters push
// them with systemd's own fd-store protocol (sd_notify(3)), one datagram
// per listener:
//
//	FDSTORE=1 FDNAME=<listener name>        + the socket (SCM_RIGHTS)
//	FDSTOREREMOVE=1 FDNAME=<listener name>  a listener dropped
//
// plus MOLT_ACTIVATED=1 (FieldActivated) beside FDSTORE=1 for a socket
// that came from socket activation: the keeper keeps it too, but never
// forwards it to systemd's store (its socket unit holds it already, and
// would pass it twice at the next start). After pushing its whole set,
// the primary names it (FieldStoreSet, MOLT_FDSTORE_SET=a:b:c), and the
// keeper forgets every other name: a master that takes the service back
// after its successor died has no way to know which listeners that
// successor added, and their sockets must not stay queueing connections
// nobody accepts.
//
// Only the primary master is heard (kernel credentials, as for MAINPID;
// its first datagram after a commit names it with MAINPID=): descriptors
// from any other sender are closed at once, and so are descriptors that
// are not one listening stream socket per datagram, or that would take
// the store past FDStoreMax. The store is keyed by name: a name pushed
// again with the same socket (the same inode: every master's copy is a
// duplicate of it) keeps the stored copy, another socket replaces it.
// The copies are raw descriptors, never *os.File: the Go runtime would
// register them with its poller, and the keeper would wake on every
// connection (package unpoll says why the masters avoid that too).
//
// Under systemd, when the service has an fd store of its own ($FDSTORE,
// set for FileDescriptorStoreMax=), the keeper forwards every change to
// it under the name StoredNamePrefix+<name>, so that a restart of the
// whole service keeps the sockets: systemd passes them back at the next
// start in LISTEN_FDS, beside any socket-activated ones, and the prefix
// tells them apart (Config.ActivatedNames).

// FieldActivated marks, beside FDSTORE=1, a socket that came from
// socket activation (systemd ignores the field).
const FieldActivated = "MOLT_ACTIVATED"

// FieldStoreSet names, after a push of the whole set, every listener of
// the primary (names joined by ':', as in LISTEN_FDNAMES): the keeper
// removes any other name from its store.
const FieldStoreSet = "MOLT_FDSTORE_SET"

// FDStoreMax bounds how many sockets the keeper stores (names): far more
// listeners than a master has, few enough that no master can exhaust
// the keeper's descriptors.
const FDStoreMax = 64

// fdsPerDatagram is how many descriptors the keeper's notify reader
// takes from one datagram: a message that carries more is rejected whole
// (the kernel closes those beyond, the reader the rest). Molt sends one.
const fdsPerDatagram = 4

// StoredNamePrefix marks, in systemd's fd store and so in LISTEN_FDNAMES,
// the sockets the keeper stored there, apart from socket-activated ones
// (whose names come from the socket unit's FileDescriptorName=).
const StoredNamePrefix = "molt-fdstore."

// maxFDName is the longest FDNAME systemd accepts.
const maxFDName = 255

// upstreamWait bounds each fd-store message to systemd.
const upstreamWait = time.Second

// storedFD is one stored socket.
type storedFD struct {
	fd        int
	dev, ino  uint64 // the socket's inode: its identity across duplicates
	activated bool   // from socket activation (FieldActivated)
}

// fdStore is the keeper's store of listening sockets, by name.
type fdStore struct {
	fds map[string]storedFD
	max int
}

func newFDStore(max int) *fdStore { return &fdStore{fds: map[string]storedFD{}, max: max} }

// put stores fd under name and reports what it did: "stored" (a new
// name), "replaced" (another socket was stored under it; that copy is
// closed and returned in old), or "unchanged" (the same socket: fd is
// not taken). taken says whether the store now owns fd.
func (s *fdStore) put(name string, fd int, id storedFD) (action string, old storedFD, taken bool, err error) {
	cur, ok := s.fds[name]
	switch {
	case ok && cur.dev == id.dev && cur.ino == id.ino:
		return "unchanged", storedFD{}, false, nil
	case ok:
		_ = unix.Close(cur.fd)
		s.fds[name] = storedFD{fd: fd, dev: id.dev, ino: id.ino, activated: id.activated}
		return "replaced", cur, true, nil
	case len(s.fds) >= s.max:
		return "", storedFD{}, false, fmt.Errorf("the store is full (%d sockets)", s.max)
	}
	s.fds[name] = storedFD{fd: fd, dev: id.dev, ino: id.ino, activated: id.activated}
	return "stored", storedFD{}, true, nil
}

// remove closes and forgets the socket stored under name; false if none.
func (s *fdStore) remove(name string) bool {
	cur, ok := s.fds[name]
	if !ok {
		return false
	}
	_ = unix.Close(cur.fd)
	delete(s.fds, name)
	return true
}

// names are the stored names, sorted.
func (s *fdStore) names() []string {
	out := make([]string, 0, len(s.fds))
	for n := range s.fds {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// listenFDs is the store as a new master takes it (sd_listen_fds(3)):
// the descriptors, in name order, for positions 3, 4, ... of a master
// the keeper starts, and their LISTEN_FDNAMES entries. A socket of molt's
// own is named StoredNamePrefix+<name>, which the master adopts for the
// listener of that name as its own (master/activation.go, splitStored);
// one from socket activation keeps its plain name, and so is adopted as
// activated again. The store keeps its copies: StartProcess duplicates
// them into the child.
func (s *fdStore) listenFDs() (fds []int, names []string) {
	for _, n := range s.names() {
		c := s.fds[n]
		fds = append(fds, c.fd)
		if c.activated {
			names = append(names, n)
		} else {
			names = append(names, StoredNamePrefix+n)
		}
	}
	return fds, names
}

// closeAll closes every stored copy.
func (s *fdStore) closeAll() {
	for n, c := range s.fds {
		_ = unix.Close(c.fd)
		delete(s.fds, n)
	}
}

// checkListener checks that fd is a listening stream socket and returns
// its identity. Molt's listeners are all stream sockets; a datagram
// socket, a connected socket or any other file is refused.
func checkListener(fd int) (storedFD, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return storedFD{}, fmt.Errorf("fstat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return storedFD{}, errors.New("not a socket")
	}
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return storedFD{}, errors.New("not a stream socket")
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return storedFD{}, errors.New("not a listening socket")
	}
	return storedFD{fd: fd, dev: st.Dev, ino: st.Ino}, nil
}

// validFDName accepts what systemd accepts in FDNAME=: 1 to 255 printable
// ASCII characters, no ':' (the separator of LISTEN_FDNAMES).
func validFDName(name string) error {
	if name == "" || len(name) > maxFDName {
		return fmt.Errorf("FDNAME must be 1 to %d characters", maxFDName)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c >= 0x7f || c == ':' {
			return fmt.Errorf("FDNAME %q: printable ASCII only, no ':' or space", name)
		}
	}
	return nil
}

// isFDStore reports whether a message speaks the fd-store protocol or
// carries descriptors.
func isFDStore(n *notify.Msg) bool {
	if len(n.FDs) > 0 || n.FDsDiscarded {
		return true
	}
	_, store := n.Fields.Get("FDSTORE")
	_, remove := n.Fields.Get("FDSTOREREMOVE")
	_, set := n.Fields.Get(FieldStoreSet)
	return store || remove || set
}

// onFDStore takes the fd-store part of a message from the primary
// master: it stores the descriptor it carries, or removes a name. What
// it does not keep stays in n.FDs, for the caller to close.
func (k *keeper) onFDStore(n *notify.Msg) {
	msg := n.Fields
	remove, store := msg.Is("FDSTOREREMOVE", "1"), msg.Is("FDSTORE", "1")
	name, _ := msg.Get("FDNAME")
	if set, ok := msg.Get(FieldStoreSet); ok && !remove && !store {
		if len(n.FDs) > 0 || n.FDsDiscarded {
			k.rejectFDs(n, FieldStoreSet+"= carries no descriptors")
			return
		}
		k.keepOnly(n.Pid, set)
		return
	}
	switch {
	case !remove && !store:
		k.rejectFDs(n, "descriptors without FDSTORE=1")
		return
	case remove && len(n.FDs) > 0:
		k.rejectFDs(n, "FDSTOREREMOVE=1 carries no descriptors")
		return
	}
	if err := validFDName(name); err != nil {
		k.rejectFDs(n, err.Error())
		return
	}
	if remove {
		if k.store.remove(name) {
			k.log.Info("stored socket removed", "event", "keeper.fdstore", "action", "removed", "name", name,
				"pid", n.Pid, "count", len(k.store.fds), "names", strings.Join(k.store.names(), " "))
			k.upstreamFDs("FDSTOREREMOVE=1\nFDNAME="+StoredNamePrefix+name, nil, name)
		}
		return
	}
	switch {
	case n.FDsDiscarded:
		k.rejectFDs(n, fmt.Sprintf("more than %d descriptors in one message", fdsPerDatagram))
		return
	case len(n.FDs) != 1:
		k.rejectFDs(n, fmt.Sprintf("FDSTORE=1 with %d descriptors: one socket per name", len(n.FDs)))
		return
	}
	id, err := checkListener(n.FDs[0])
	if err != nil {
		k.rejectFDs(n, "FDNAME="+name+": "+err.Error())
		return
	}
	id.activated = msg.Is(FieldActivated, "1")
	action, _, taken, err := k.store.put(name, n.FDs[0], id)
	if err != nil {
		k.rejectFDs(n, "FDNAME="+name+": "+err.Error())
		return
	}
	if taken {
		n.FDs = nil
	}
	if action == "unchanged" {
		k.log.Debug("stored socket pushed again", "event", "keeper.fdstore", "action", action, "name", name, "pid", n.Pid)
		return
	}
	k.log.Info("listening socket stored", "event", "keeper.fdstore", "action", action, "name", name, "activated", id.activated,
		"pid", n.Pid, "count", len(k.store.fds), "names", strings.Join(k.store.names(), " "))
	if action == "replaced" {
		k.upstreamFDs("FDSTOREREMOVE=1\nFDNAME="+StoredNamePrefix+name, nil, name)
	}
	if !id.activated {
		k.upstreamFDs("FDSTORE=1\nFDNAME="+StoredNamePrefix+name, []int{id.fd}, name)
	}
}

// keepOnly removes from the store every name that set (names joined by
// ':') does not list.
func (k *keeper) keepOnly(pid int, set string) {
	keep := map[string]bool{}
	for _, name := range strings.Split(set, ":") {
		keep[name] = true
	}
	for _, name := range k.store.names() {
		if keep[name] {
			continue
		}
		k.store.remove(name)
		k.log.Info("stored socket removed: not in the primary's set", "event", "keeper.fdstore", "action", "removed", "name", name,
			"pid", pid, "count", len(k.store.fds), "names", strings.Join(k.store.names(), " "))
		k.upstreamFDs("FDSTOREREMOVE=1\nFDNAME="+StoredNamePrefix+name, nil, name)
	}
}

// rejectFDs closes the descriptors of a message and logs why (at most
// once per interval, with the count).
func (k *keeper) rejectFDs(n *notify.Msg, why string) {
	n.CloseFDs()
	if k.fdRejected != nil {
		k.fdRejected.Add(n.Pid, why)
		return
	}
	k.log.Warn("fd-store message rejected", "event", "keeper.fdstore_rejected", "pid", n.Pid, "reason", why)
}

// upstreamFDs passes an fd-store message on to systemd's store, when the
// service has one ($FDSTORE).
func (k *keeper) upstreamFDs(state string, fds []int, name string) {
	if k.cfg.Notify == "" || k.cfg.FDStore <= 0 {
		return
	}
	if len(StoredNamePrefix)+len(name) > maxFDName {
		k.log.Warn("socket not passed to systemd's fd store: name too long", "event", "keeper.fdstore_upstream_failed", "name", name)
		return
	}
	if err := worker.NotifyWithFDs(k.cfg.Notify, state, fds, upstreamWait); err != nil {
		k.log.Warn("systemd's fd store: message not sent", "event", "keeper.fdstore_upstream_failed", "name", name, "error", err)
	}
}

// restoreStored takes into the store the sockets systemd's fd store
// passed back at start (named StoredNamePrefix+<name> in
// LISTEN_FDNAMES): duplicates of them, since the originals go on to the
// first master. They are systemd's already: nothing is forwarded.
func (k *keeper) restoreStored(fds []int, names []string) {
	for i, fd := range fds {
		if i >= len(names) {
			break
		}
		name, ok := strings.CutPrefix(names[i], StoredNamePrefix)
		if !ok {
			continue
		}
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			k.log.Warn("socket from systemd's fd store not kept", "event", "keeper.fdstore_rejected", "name", name, "fd", fd, "error", err)
			continue
		}
		id, err := checkListener(dup)
		if err == nil {
			_, _, _, err = k.store.put(name, dup, id)
		}
		if err != nil {
			_ = unix.Close(dup)
			k.log.Warn("socket from systemd's fd store not kept", "event", "keeper.fdstore_rejected", "name", name, "fd", fd, "reason", err.Error())
			continue
		}
		k.log.Info("listening socket restored from systemd's fd store", "event", "keeper.fdstore", "action", "restored",
			"name", name, "count", len(k.store.fds), "names", strings.Join(k.store.names(), " "))
	}
}

// FDStoreFromEnv parses $FDSTORE, the size of the service's fd store
// that systemd sets (FileDescriptorStoreMax=); 0 when unset or bad.
func FDStoreFromEnv(v string) int {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return n
}
