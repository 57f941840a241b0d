package worker

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Environment variables of the worker protocol. The first group is systemd's
// (sd_listen_fds(3), sd_notify(3)); a worker sees them exactly as it would
// under systemd. The MOLT_ group is molt's own and is absent under systemd.
const (
	// EnvListenFDs is the number of listeners passed, starting at fd 3.
	EnvListenFDs = "LISTEN_FDS"
	// EnvListenPID is the pid the listeners are meant for: the worker itself.
	EnvListenPID = "LISTEN_PID"
	// EnvListenFDNames is the colon-separated list of listener names.
	EnvListenFDNames = "LISTEN_FDNAMES"
	// EnvNotifySocket is the datagram socket readiness and status go to.
	// A leading '@' names a socket in the abstract namespace.
	EnvNotifySocket = "NOTIFY_SOCKET"
	// EnvWatchdogUSec is the watchdog interval in microseconds.
	EnvWatchdogUSec = "WATCHDOG_USEC"
	// EnvWatchdogPID is the pid the watchdog interval is meant for.
	EnvWatchdogPID = "WATCHDOG_PID"

	// EnvMasterPID is the pid of the master that started the worker.
	EnvMasterPID = "MOLT_MASTER_PID"
	// EnvWorker is the worker's slot number in its master (0, 1, ...). A
	// replacement for a worker that exited gets the same number.
	EnvWorker = "MOLT_WORKER"
	// EnvStopSignal names the signal that asks the worker to drain and exit
	// ("TERM", "QUIT", ...; no "SIG" prefix).
	EnvStopSignal = "MOLT_STOP_SIGNAL"
	// EnvDrainTimeout bounds a worker's drain, as a Go duration ("30s").
	EnvDrainTimeout = "MOLT_DRAIN_TIMEOUT"
	// EnvParentFD is the fd number of the read end of a pipe whose write end
	// only the master holds: EOF on it means the master is gone.
	EnvParentFD = "MOLT_PARENT_FD"
)

// ListenFDsStart is the first fd of the passed listeners (SD_LISTEN_FDS_START).
const ListenFDsStart = 3

// MaxNotifySize is the largest notify datagram accepted, as systemd's manager
// (NOTIFY_BUFFER_MAX, one page).
const MaxNotifySize = 4096

// Well-known notify assignments (sd_notify(3)).
const (
	NotifyReady    = "READY=1"
	NotifyStopping = "STOPPING=1"
	NotifyWatchdog = "WATCHDOG=1"
	NotifyBarrier  = "BARRIER=1"
)

// ErrNotifyMessage is wrapped by every error ParseNotify returns.
var ErrNotifyMessage = errors.New("notify: malformed message")

// Notification is one parsed notify datagram: its assignments in order.
type Notification struct {
	Fields []Field
}

// Field is one KEY=VALUE assignment of a notify datagram.
type Field struct {
	Key, Value string
}

// Get returns the value of the last assignment to key, and whether there was one.
func (n Notification) Get(key string) (string, bool) {
	for i := len(n.Fields) - 1; i >= 0; i-- {
		if n.Fields[i].Key == key {
			return n.Fields[i].Value, true
		}
	}
	return "", false
}

// Is reports whether the last assignment to key has the given value.
func (n Notification) Is(key, value string) bool {
	v, ok := n.Get(key)
	return ok && v == value
}

// ParseNotify parses one notify datagram as systemd's manager does: newline
// separated KEY=VALUE assignments; empty lines are skipped. It is strict where
// systemd is strict and rejects, wrapping ErrNotifyMessage, a datagram that is
// empty, larger than MaxNotifySize, holds a NUL byte or invalid UTF-8, or has
// a line without '=' or with a key that is not letters, digits and '_'.
func ParseNotify(b []byte) (Notification, error) {
	var n Notification
	if len(b) == 0 {
		return n, fmt.Errorf("%w: empty", ErrNotifyMessage)
	}
	if len(b) > MaxNotifySize {
		return n, fmt.Errorf("%w: %d bytes, more than %d", ErrNotifyMessage, len(b), MaxNotifySize)
	}
	s := string(b)
	if strings.IndexByte(s, 0) >= 0 {
		return n, fmt.Errorf("%w: NUL byte", ErrNotifyMessage)
	}
	if !utf8.ValidString(s) {
		return n, fmt.Errorf("%w: invalid UTF-8", ErrNotifyMessage)
	}
	for i, line := range strings.Split(s, "\n") {
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return Notification{}, fmt.Errorf("%w: line %d has no '='", ErrNotifyMessage, i+1)
		}
		if !validKey(key) {
			return Notification{}, fmt.Errorf("%w: line %d: bad key %q", ErrNotifyMessage, i+1, key)
		}
		n.Fields = append(n.Fields, Field{Key: key, Value: value})
	}
	if len(n.Fields) == 0 {
		return n, fmt.Errorf("%w: no assignment", ErrNotifyMessage)
	}
	return n, nil
}

// validKey accepts environment-style names: letters, digits and '_', not
// starting with a digit. systemd-notify passes the user's VARIABLE=VALUE
// words through, so lowercase keys are legal and simply not understood.
func validKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c == '_':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// ParseFDNames splits a LISTEN_FDNAMES value into n names. Missing names
// (fewer entries than n, or the variable unset) are "unknown", as
// sd_listen_fds_with_names(3) reports them; more entries than n is an error.
func ParseFDNames(value string, n int) ([]string, error) {
	names := make([]string, n)
	var parts []string
	if value != "" {
		parts = strings.Split(value, ":")
	}
	if len(parts) > n {
		return nil, fmt.Errorf("%s has %d names for %d fds", EnvListenFDNames, len(parts), n)
	}
	for i := range names {
		names[i] = "unknown"
		if i < len(parts) && parts[i] != "" {
			names[i] = parts[i]
		}
	}
	return names, nil
}
