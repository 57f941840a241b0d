package master

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/upgrade"
)

// What an old master does towards its successor in an upgrade
// (upgrade.OldSide decides): the pre-flight run, the channel to new
// masters, the configuration it sends them, and the watch on a committed
// successor.

// preflightTimeout bounds the pre-flight run of a new binary.
const preflightTimeout = 10 * time.Second

// preflightNice is the nice value of the pre-flight run, which runs
// alongside the new master's start.
const preflightNice = 19

// preflight runs the binary at path (resolved now, as tableflip will)
// with args and returns its trimmed output; an error says what failed.
// Cancelling stop kills the run (the upgrade ended without it).
func preflight(stop context.Context, path string, args []string) (string, error) {
	resolved, err := exec.LookPath(path)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(stop, preflightTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, resolved, args...)
	// Its own session, and so its own process group, killed whole at the
	// timeout: a script that left a child behind must not hold the output
	// pipe open forever. Not the master's session: if this master dies
	// while it runs, the keeper (which adopts children of its session as
	// masters) must not take the pre-flight run for one.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	text := strings.TrimSpace(string(out))
	if len(text) > 300 {
		text = text[:300] + "..."
	}
	if stop.Err() != nil {
		return text, fmt.Errorf("%s %s: cancelled: the upgrade ended", path, strings.Join(args, " "))
	}
	if ctx.Err() != nil {
		return text, fmt.Errorf("%s %s did not finish within %v", path, strings.Join(args, " "), preflightTimeout)
	}
	if err != nil {
		return text, fmt.Errorf("%s %s: %v: %s", path, strings.Join(args, " "), err, text)
	}
	return text, nil
}

// configMsg is the configuration a new master (to) gets from this one.
func (m *Master) configMsg(to int) upgrade.Msg {
	msg := upgrade.Msg{Kind: upgrade.KindConfig, To: to, Workers: len(m.slots), Gen: m.gen + 1, Pid: os.Getpid()}
	for _, l := range m.listeners {
		msg.Names = append(msg.Names, l.spec.Name)
		if l.activated {
			msg.Activated = append(msg.Activated, l.spec.Name)
		}
	}
	return msg
}

// childChannel returns this master's end of the channel to new masters,
// with its reader running.
func (m *Master) childChannel() (*upgrade.Channel, error) {
	if m.children != nil {
		return m.children, nil
	}
	ch, err := m.hand.Children()
	if err != nil {
		return nil, err
	}
	m.children = ch
	m.readChannel(ch, func(msg upgrade.Msg, err error) event { return fromChild{msg: msg, err: err} })
	return ch, nil
}

// readChannel hands every message read from ch to the loop, wrapped by
// wrap, until the other end is gone (EOF: no process holds it any more;
// tableflip drops its copy at a commit, so a committed new master that
// exits leaves none) or ch is closed.
func (m *Master) readChannel(ch *upgrade.Channel, wrap func(upgrade.Msg, error) event) {
	go func() {
		for {
			msg, err := ch.Recv()
			if errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) {
				return
			}
			if !m.send(wrap(msg, err)) {
				return
			}
		}
	}()
}

// tellChild sends msg (its To set) to the new master in flight.
func (m *Master) tellChild(msg upgrade.Msg) {
	if m.children == nil {
		return
	}
	if err := m.children.Send(msg); err != nil {
		m.log.Warn("message to the new master not sent", "kind", msg.Kind, "error", err)
	}
}

// watchSuccessor follows the committed new master while this one drains
// (DESIGN §4's residual hole: it may die after its commit).
func (m *Master) watchSuccessor(pid int) {
	if pid <= 0 {
		return
	}
	if !m.watchExit(pid, successorExited{pid: pid}) {
		m.log.Warn("the new master cannot be watched: should it die while this generation drains, nothing takes the service back", "new_pid", pid)
	}
}

// successorExited reports that the committed new master has exited.
type successorExited struct{ pid int }

func (e successorExited) String() string { return fmt.Sprintf("new master %d exited", e.pid) }
