package master

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A listening socket is shared by every process that holds it, and so is
// what one of them does to it: shutdown(2) stops it listening for all, and
// a switch to blocking mode makes every worker's Close unable to interrupt
// its accept (DESIGN §4). A worker that does either by mistake would harm
// the others for good. The primary master checks its listeners every
// second and undoes both: it sets non-blocking mode again, and listens
// again on a socket that was shut down (listen(2) on the same bound
// socket), then recycles its workers, whose servers ended when accept
// failed. A unix listener shut down cannot be undone that way (it still
// listens, yet refuses every connect): the master finds it and tells the
// operator once.

// listenerCheckEvery is how often the primary master checks its listeners.
const listenerCheckEvery = time.Second

// checkListeners repairs the listeners and arms the next check.
func (m *Master) checkListeners() {
	m.after(listenerCheckEvery, timerFired{kind: listenerCheck})
	if m.role != rolePrimary || m.old.up != nil || m.old.retiring || m.rl != nil || !m.phase.running() {
		return // an upgrade or a reload may be closing listeners on purpose
	}
	relistened := false
	for _, l := range m.listeners {
		fd, err := rawFD(l.file)
		if err != nil {
			continue
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil && fl&unix.O_NONBLOCK == 0 {
			if err := unix.SetNonblock(fd, true); err != nil {
				m.log.Error("listener in blocking mode, and it cannot be switched back", "listener", l.spec.Name, "error", err)
			} else {
				m.log.Warn("a process switched the listener to blocking mode; switched back", "listener", l.spec.Name, "addr", l.addr)
			}
		}
		if l.spec.Network == "unix" && !l.shutTold && unixShutDown(fd) {
			l.shutTold = true
			m.log.Error("a process shut the unix listener down: connect(2) to its path is refused, and no listen(2) undoes that on the same socket; "+
				"restart molt, or reload without this listener and then with it again", "listener", l.spec.Name, "addr", l.addr)
			continue
		}
		if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil && acc == 0 {
			if err := relisten(fd, l.addr, listenBacklog(m.cfg.Backlog)); err != nil {
				m.log.Error("a process shut the listener down, and it cannot listen again", "listener", l.spec.Name, "addr", l.addr, "error", err)
				continue
			}
			m.log.Warn("a process shut the listener down; it listens again, and the workers are recycled", "listener", l.spec.Name, "addr", l.addr)
			relistened = true
		}
	}
	if relistened {
		for _, s := range m.slots {
			if p := m.procs[s.pid]; p != nil {
				m.recycle(p, "listener restored")
			}
		}
	}
}

// pollRDHUP is POLLRDHUP (x/sys/unix has only the epoll name).
const pollRDHUP = unix.EPOLLRDHUP

// unixShutDown tells whether a listening unix socket was shut down for
// reading. Unlike TCP, its SO_ACCEPTCONN stays 1 and listen(2) succeeds,
// yet every connect(2) to it is refused; poll(2) reports it as POLLRDHUP
// (a shutdown for writing alone refuses nothing, and shows nothing).
func unixShutDown(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: pollRDHUP}}
	n, err := unix.Poll(p, 0)
	return err == nil && n > 0 && p[0].Revents&pollRDHUP != 0
}

// relisten makes a shut-down socket listen again at addr. A TCP socket
// whose port the kernel picked (port 0 in the configuration) lost the
// port in the shutdown (getsockname still shows it); it is bound to it
// again first, so that clients find it where it was. A socket that kept
// its port refuses the bind with EINVAL, and simply listens.
func relisten(fd int, addr string, backlog int) error {
	if network, _, err := sockName(fd); err == nil && network == "tcp" {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return fmt.Errorf("rebind %s: %w", addr, err)
		}
		n, err := strconv.Atoi(port)
		if err != nil {
			return fmt.Errorf("rebind %s: %w", addr, err)
		}
		var sa unix.Sockaddr
		if ip := net.ParseIP(host); ip.To4() != nil {
			s4 := &unix.SockaddrInet4{Port: n}
			copy(s4.Addr[:], ip.To4())
			sa = s4
		} else if ip != nil {
			s6 := &unix.SockaddrInet6{Port: n}
			copy(s6.Addr[:], ip.To16())
			sa = s6
		} else {
			return fmt.Errorf("rebind %s: not an IP address", addr)
		}
		if err := unix.Bind(fd, sa); err != nil && err != unix.EINVAL {
			return fmt.Errorf("rebind %s: %w", addr, err)
		}
	}
	return unix.Listen(fd, backlog)
}

// listenBacklog is the backlog to listen again with: the configured one,
// else the kernel's somaxconn, as Go's own listen uses.
func listenBacklog(configured int) int {
	if configured > 0 {
		return configured
	}
	if b, err := os.ReadFile("/proc/sys/net/core/somaxconn"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			return n
		}
	}
	return unix.SOMAXCONN
}
