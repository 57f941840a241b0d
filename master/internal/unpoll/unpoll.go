// Package unpoll takes listening sockets out of the Go runtime's poller.
//
// Any *os.File made from a non-blocking socket is registered with the
// runtime's epoll instance (edge-triggered, EPOLLIN|EPOLLOUT|EPOLLRDHUP),
// and stays registered until it is closed. A master holds its listeners
// in such files (its own, and tableflip's copies kept for the next
// upgrade and inherited from the previous one) but never accepts on them:
// every burst of new connections would wake it for nothing, on the
// request path's CPU (issue 13). Making the files from a blocking socket
// would register nothing, but the blocking mode belongs to the open file
// description that every worker shares (DESIGN §4), and a dup shares it
// too. So the registrations are removed afterwards instead, with
// EPOLL_CTL_DEL on the runtime's epoll instance: the files stay valid
// (nobody reads them), and when one is closed the runtime's own
// EPOLL_CTL_DEL finds nothing, which it ignores.
package unpoll

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Sockets removes from every epoll instance of this process each
// registered descriptor that holds one of the listening sockets of fds
// (the descriptor itself, or any other of the same socket: a dup, the
// copies tableflip keeps). It returns how many registrations it removed.
// Only the sockets named are touched: a process may accept on others
// (the master's control socket, a test's own servers).
//
// A registration is named by a descriptor number: each one is checked
// (its inode, and that it listens) just before it is removed, so a number
// closed and reused meanwhile by another goroutine is left alone unless
// the reuse falls between that check and the removal, a window of two
// system calls.
func Sockets(fds ...int) (int, error) {
	target := make(map[uint64]bool, len(fds))
	for _, fd := range fds {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return 0, fmt.Errorf("unpoll: fstat fd %d: %w", fd, err)
		}
		target[st.Ino] = true
	}
	eps, err := epollFDs()
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, ep := range eps {
		regs, err := registered(ep)
		if err != nil {
			return removed, err
		}
		for _, r := range regs {
			if !target[r.ino] || !isListener(r.fd, r.ino) {
				continue
			}
			err := unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, r.fd, nil)
			switch {
			case err == nil:
				removed++
			case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EBADF):
				// closed meanwhile: nothing to remove
			default:
				return removed, fmt.Errorf("unpoll: epoll %d: remove fd %d: %w", ep, r.fd, err)
			}
		}
	}
	return removed, nil
}

// epollFDs returns this process's epoll descriptors (the runtime's).
func epollFDs() ([]int, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, fmt.Errorf("unpoll: %w", err)
	}
	var eps []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && link == "anon_inode:[eventpoll]" {
			eps = append(eps, fd)
		}
	}
	return eps, nil
}

type registration struct {
	fd  int
	ino uint64
}

// registered parses /proc/self/fdinfo/<ep>: one "tfd: N events: E data:
// D pos:P ino:I sdev:S" line per registered descriptor (ino in hex).
func registered(ep int) ([]registration, error) {
	path := "/proc/self/fdinfo/" + strconv.Itoa(ep)
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("unpoll: %w", err)
	}
	defer f.Close()
	var regs []registration
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "tfd:" {
			continue
		}
		fd, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		r := registration{fd: fd}
		for _, fl := range fields[2:] {
			if v, ok := strings.CutPrefix(fl, "ino:"); ok {
				r.ino, _ = strconv.ParseUint(v, 16, 64)
			}
		}
		regs = append(regs, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("unpoll: read %s: %w", path, err)
	}
	return regs, nil
}

// isListener reports whether fd is still the socket ino and listens.
func isListener(fd int, ino uint64) bool {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Ino != ino || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return false
	}
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	return err == nil && acc == 1
}
