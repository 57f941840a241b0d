//go:build moltfault

package main

// A test build (go build -tags moltfault) of molt injects one fault into
// its masters, named by MOLT_FAULT; the release binary has none of this.
//
//	exit-after-commit:DUR   a new master exits 1 DUR after its commit,
//	                        once the old master (its parent) has exited
//
// The fault learns of the commit from the master's own log line
// (event upgrade.committed, side new), so the master's code knows
// nothing of it.

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// envFault names the fault.
const envFault = "MOLT_FAULT"

// parentWait bounds the wait for the old master's exit.
const parentWait = time.Minute

// withFault wraps a master's logger with the fault MOLT_FAULT names.
func withFault(l hclog.Logger) hclog.Logger {
	v := os.Getenv(envFault)
	if v == "" {
		return l
	}
	name, arg, _ := strings.Cut(v, ":")
	d, err := time.ParseDuration(arg)
	if name != "exit-after-commit" || err != nil || d < 0 {
		fmt.Fprintf(os.Stderr, "molt: %s=%q: want exit-after-commit:DURATION\n", envFault, v)
		os.Exit(exitUsage)
	}
	return faultLogger{Logger: l, f: &commitFault{after: d, parent: os.Getppid(), log: l}}
}

// commitFault exits the process after a commit.
type commitFault struct {
	after  time.Duration
	parent int
	log    hclog.Logger
}

// seen looks at one log line for the new side's commit.
func (f *commitFault) seen(args []any) {
	var event, side string
	for i := 0; i+1 < len(args); i += 2 {
		switch args[i] {
		case "event":
			event, _ = args[i+1].(string)
		case "side":
			side, _ = args[i+1].(string)
		}
	}
	if event != "upgrade.committed" || side != "new" {
		return
	}
	go func() {
		// The fault's delay, not a synchronization.
		time.Sleep(f.after)
		for deadline := time.Now().Add(parentWait); os.Getppid() == f.parent && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond) // polling for the old master's exit
		}
		f.log.Error("injected fault: the new master exits 1 after its commit", "event", "fault.exit",
			"fault", "exit-after-commit", "pid", os.Getpid(), "after", f.after.String(), "old_master_exited", os.Getppid() != f.parent)
		os.Exit(1)
	}()
}

// faultLogger passes every line on and shows those of Info to the fault.
type faultLogger struct {
	hclog.Logger
	f *commitFault
}

func (l faultLogger) Info(msg string, args ...any) {
	l.Logger.Info(msg, args...)
	l.f.seen(args)
}
func (l faultLogger) Log(level hclog.Level, msg string, args ...any) {
	l.Logger.Log(level, msg, args...)
	l.f.seen(args)
}
func (l faultLogger) With(args ...any) hclog.Logger {
	return faultLogger{l.Logger.With(args...), l.f}
}
func (l faultLogger) Named(name string) hclog.Logger {
	return faultLogger{l.Logger.Named(name), l.f}
}
func (l faultLogger) ResetNamed(name string) hclog.Logger {
	return faultLogger{l.Logger.ResetNamed(name), l.f}
}
