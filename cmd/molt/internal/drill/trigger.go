package drill

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// triggerTimeout bounds one trigger.
const triggerTimeout = 5 * time.Minute

// Command runs a shell command line for each upgrade (any server: nginx
// -s ..., systemctl reload, a deploy script). It fails if the command
// exits non-zero.
type Command struct{ Line string }

func (c Command) String() string { return "sh -c " + strconv.Quote(c.Line) }

// Fire runs the command.
func (c Command) Fire(ctx context.Context) error {
	return run(ctx, "/bin/sh", "-c", c.Line)
}

// Ctl runs "molt ctl --pid-file PIDFILE upgrade --wait" with the molt
// binary at Molt: it returns once the new generation committed (or
// fails when it rolled back).
type Ctl struct{ Molt, PIDFile string }

func (c Ctl) String() string { return "molt ctl --pid-file " + c.PIDFile + " upgrade --wait" }

// Fire upgrades through the control socket.
func (c Ctl) Fire(ctx context.Context) error {
	return run(ctx, c.Molt, "ctl", "--pid-file", c.PIDFile, "--timeout", triggerTimeout.String(), "upgrade", "--wait")
}

// Signal sends a signal (USR2) to the pid in a pid file, as an operator's
// kill -USR2 $(cat PIDFILE) does; it returns at once.
type Signal struct {
	PIDFile string
	Sig     syscall.Signal
}

func (s Signal) String() string { return fmt.Sprintf("kill -%d $(cat %s)", int(s.Sig), s.PIDFile) }

// Fire reads the pid file and signals.
func (s Signal) Fire(context.Context) error {
	b, err := os.ReadFile(s.PIDFile)
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return fmt.Errorf("pid file %s: %q is not a pid", s.PIDFile, b)
	}
	return syscall.Kill(pid, s.Sig)
}

func run(ctx context.Context, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, triggerTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		text := strings.TrimSpace(string(out))
		if len(text) > 300 {
			text = text[len(text)-300:]
		}
		return fmt.Errorf("%v: %s", err, text)
	}
	return nil
}
