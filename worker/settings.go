package worker

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultDrainTimeout is the drain bound when MOLT_DRAIN_TIMEOUT is unset
// (under systemd, say).
const DefaultDrainTimeout = 30 * time.Second

// StopSignal returns the signal that asks this worker to drain and exit:
// MOLT_STOP_SIGNAL ("TERM", "QUIT", ...), or SIGTERM when it is unset, as
// systemd's default KillSignal. An unknown name is an error.
func StopSignal() (os.Signal, error) {
	v := os.Getenv(EnvStopSignal)
	if v == "" {
		return syscall.SIGTERM, nil
	}
	name := strings.ToUpper(v)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	s := unix.SignalNum(name)
	if s == 0 || s == unix.SIGKILL || s == unix.SIGSTOP {
		return nil, fmt.Errorf("worker: %s=%q is not a signal that can be caught", EnvStopSignal, v)
	}
	return s, nil
}

// DrainTimeout returns MOLT_DRAIN_TIMEOUT, or DefaultDrainTimeout when it
// is unset. A value that is not a positive Go duration is an error.
func DrainTimeout() (time.Duration, error) {
	v := os.Getenv(EnvDrainTimeout)
	if v == "" {
		return DefaultDrainTimeout, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("worker: %s=%q is not a positive duration", EnvDrainTimeout, v)
	}
	return d, nil
}
