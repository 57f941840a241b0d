package master

import (
	"errors"
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
// its accept (DESIGN §4); on a listener with the blocking option, a switch
// to non-blocking mode makes every blocking accept(2) fail with EAGAIN. A
// worker that does either by mistake would harm the others for good. The
// primary master checks its listeners every second and undoes both: it
// sets the listener's mode again, and listens
// again on a socket that was shut down (listen(2) on the same bound
// socket), then recycles its workers, whose servers ended when accept
// failed. A unix listener shut down cannot be undone that way (it still
// listens, yet refuses every connect): the master puts a new socket at
// its path in place of the old one (replaceUnix) and recycles the
// workers.

// faultMode names, in listener.healed and listener.heal_failed, a socket
// found in the mode its listener does not have: "blocking" for a
// non-blocking listener, "nonblocking" for one with the blocking option.
func faultMode(blocking bool) string {
	if blocking {
		return "nonblocking"
	}
	return "blocking"
}

// listenerCheckEvery is how often the primary master checks its listeners.
const listenerCheckEvery = time.Second

// checkListeners repairs the listeners and arms the next check.
func (m *Master) checkListeners() {
	m.after(listenerCheckEvery, timerFired{kind: listenerCheck})
	if m.role() != rolePrimary || m.old.InFlight() || m.old.Retiring() || m.rl != nil || !m.phase.running() {
		return // an upgrade or a reload may be closing listeners on purpose
	}
	relistened := false
	for _, l := range m.listeners {
		fd, err := rawFD(l.file)
		if err != nil {
			continue
		}
		if changed, err := setBlocking(l.file, l.spec.Blocking); err != nil {
			m.log.Error("listener in the wrong blocking mode, and it cannot be switched back", "event", "listener.heal_failed", "fault", faultMode(l.spec.Blocking), "listener", l.spec.Name, "blocking", l.spec.Blocking, "error", err)
		} else if changed && l.spec.Blocking {
			m.log.Warn("a process switched the blocking listener to non-blocking mode (a Go program's net.FileListener does); switched back", "event", "listener.healed", "fault", faultMode(true), "listener", l.spec.Name, "addr", l.addr, "blocking", true)
		} else if changed {
			m.log.Warn("a process switched the listener to blocking mode; switched back (a worker that accepts in blocking mode needs the listen option ,blocking)", "event", "listener.healed", "fault", faultMode(false), "listener", l.spec.Name, "addr", l.addr, "blocking", false)
		}
		if l.spec.Network == "unix" && !l.shutTold && unixShutDown(fd) {
			if err := m.replaceUnix(l, fd); err != nil {
				l.shutTold = true
				m.log.Error("a process shut the unix listener down, and no new socket can replace it: connect(2) to its path is refused", "event", "listener.heal_failed", "fault", "shutdown", "listener", l.spec.Name, "addr", l.addr, "error", err)
				continue
			}
			m.log.Warn("a process shut the unix listener down; a new socket listens at its path, and the workers are recycled", "event", "listener.healed", "fault", "shutdown", "how", "replaced", "listener", l.spec.Name, "addr", l.addr)
			m.listenerEpoch++ // workers still starting are recycled once ready
			relistened = true
			continue
		}
		if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil && acc == 0 {
			if err := relisten(fd, l.addr, listenBacklog(m.cfg.Backlog)); err != nil {
				m.log.Error("a process shut the listener down, and it cannot listen again", "event", "listener.heal_failed", "fault", "shutdown", "listener", l.spec.Name, "addr", l.addr, "error", err)
				continue
			}
			m.log.Warn("a process shut the listener down; it listens again, and the workers are recycled", "event", "listener.healed", "fault", "shutdown", "how", "relistened", "listener", l.spec.Name, "addr", l.addr)
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

// replaceUnix puts a new socket at the path of the unix listener l, whose
// socket (fd) was shut down, and makes every descriptor of this master
// that held the old socket (l's, and the duplicate registered for the
// next upgrade) hold the new one, at the same numbers (dup3): workers
// started from now on, and the next master, get the new socket, and the
// master's fd count does not change. Workers still hold the old one until
// they are recycled. A socket systemd passed is not the master's to
// replace.
func (m *Master) replaceUnix(l *listener, fd int) error {
	if l.activated {
		return errors.New("it came from socket activation: restart its socket unit and the service")
	}
	if err := m.swapUnix(l, fd); err != nil {
		return fmt.Errorf("%w; restart molt, or reload without this listener and then with it again", err)
	}
	return nil
}

// swapUnix does replaceUnix's work.
func (m *Master) swapUnix(l *listener, fd int) error {
	var old unix.Stat_t
	if err := unix.Fstat(fd, &old); err != nil {
		return err
	}
	nf, err := bind(l.spec, m.cfg.SocketMode) // the old socket refuses connections: bind removes its path
	if err != nil {
		return err
	}
	defer nf.Close()
	if m.cfg.Backlog > 0 {
		if err := setBacklog(nf, m.cfg.Backlog); err != nil {
			return err
		}
	}
	nfd, err := rawFD(nf)
	if err != nil {
		return err
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range fds {
		n, err := strconv.Atoi(e.Name())
		if err != nil || n == nfd {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(n, &st) != nil || st.Dev != old.Dev || st.Ino != old.Ino {
			continue
		}
		if err := unix.Dup3(nfd, n, unix.O_CLOEXEC); err != nil {
			return fmt.Errorf("dup3 onto fd %d: %w", n, err)
		}
	}
	return nil
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
