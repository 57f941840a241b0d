package upgrade

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The G1↔G2 channel (DESIGN §4): a SOCK_SEQPACKET socket pair, one JSON
// object per packet. The old master G1 holds one end for its whole life;
// the other end travels to every new master it starts, through tableflip,
// under channelFile. The same pair serves every attempt, so each message
// from G1 names the new master it is for (To) and a new master drops
// messages meant for an earlier attempt that died before reading them.
//
// Masters of different versions talk over it: unknown fields are ignored
// and unknown kinds are for the receiver to log and skip.

// Message kinds sent by a new master (G2) to the old one (G1).
const (
	KindHello     = "hello"     // Pid, Version: G2 is up
	KindWorkers   = "workers"   // Pid, PGIDs: G2's worker process groups, after every change
	KindProgress  = "progress"  // Pid, Ready, Workers: k of N workers ready
	KindServing   = "serving"   // Pid: N of N ready; probation begins
	KindCommitted = "committed" // Pid: G2 called Ready; G1 retires
	KindFailed    = "failed"    // Pid, Code, Reason: G2 gives up (rollback)
	KindStopping  = "stopping"  // Pid: G2, committed, stops on purpose (QUIT or TERM): G1 must not take over when it exits
	KindStopAll   = "stop-all"  // Pid: G2, uncommitted, was asked to stop every generation: G1 drains, G2 gives up (KindFailed follows)
	// KindExtend: Pid, Millis, Reason: G2's probation goes on past its
	// end (the gates wait for requests, or the rest of the workers start
	// after the canary): G1's deadline moves Millis from now.
	KindExtend = "extend"
)

// Message kinds sent by G1 to G2 (To names the G2).
const (
	KindConfig  = "config"  // Workers, Gen, Pid, Names, Activated: how many workers to run, G2's generation, G1's pid and listener names
	KindCommit  = "commit"  // commit now (QUIT to G1, or the manual commit)
	KindRelease = "release" // G1 serves again: an aborting G2 may stop its workers
	KindAbort   = "abort"   // Reason (optional): give up as QUIT to G2 does (every generation stops, or the pre-flight failed)
	// KindMetrics: Metrics, G1's monotonic counters (molt_*_total), after
	// the config and whenever they change until the attempt ends: G2
	// counts on from them.
	KindMetrics = "metrics"
	// KindPreflightOK: the pre-flight G1 ran alongside G2's start passed;
	// a G2 whose config said Hold may commit now.
	KindPreflightOK = "preflight-ok"
	// KindFigures: Gen, Figures: G1's traffic figures, cumulative, once
	// a second while the upgrade is in flight. The channel carries the
	// numbers; the masters give them their meaning.
	KindFigures = "figures"
	// KindWorkerFigures: Gen, Sources: G1's traffic figures worker by
	// worker, cumulative, at most MaxSources a message, sent before each
	// KindFigures while the upgrade is in flight: the gates' baseline is
	// their median. A G1 of an older version sends none; the new master
	// then judges against the sum.
	KindWorkerFigures = "worker-figures"
)

// KindStop is sent either way: stop fast (TERM/INT to either master stops
// both generations).
const KindStop = "stop"

// maxMessage bounds one packet; a larger one is a protocol error. It
// holds a config message with hundreds of listener names.
const maxMessage = 16 << 10

// Msg is one message of the channel. Fields unused by a kind are zero.
type Msg struct {
	Kind    string `json:"kind"`
	To      int    `json:"to,omitempty"`
	Pid     int    `json:"pid,omitempty"`
	Gen     int    `json:"gen,omitempty"`
	Version string `json:"version,omitempty"`
	Workers int    `json:"workers,omitempty"`
	Ready   int    `json:"ready,omitempty"`
	PGIDs   []int  `json:"pgids,omitempty"`
	Code    int    `json:"code,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// Names lists the names of the sender's listeners (config): at its
	// commit, the new master stops those its configuration dropped.
	Names []string `json:"names,omitempty"`
	// Activated lists those of Names that came from socket activation
	// (config): the new master must keep them at the same address.
	Activated []string `json:"activated,omitempty"`
	// Hold (config): the old master's pre-flight of this binary is still
	// running; the new master must not commit before KindPreflightOK.
	Hold bool `json:"hold,omitempty"`
	// Since (config): when the upgrade was signalled, in Unix
	// nanoseconds: the new master times its phases from it.
	Since int64 `json:"since,omitempty"`
	// Millis (extend): how much longer the probation may take.
	Millis int64 `json:"ms,omitempty"`
	// Figures (figures): the sender generation's cumulative traffic
	// figures, a vector of at most MaxFigures counts.
	Figures []uint64 `json:"figures,omitempty"`
	// Sources (worker-figures): figures of the sender's generation,
	// one worker each, at most MaxSources.
	Sources []Source `json:"sources,omitempty"`
	// Metrics (metrics): opaque to this package; the master's
	// counters (master/internal/metrics.Counters).
	Metrics json.RawMessage `json:"metrics,omitempty"`
}

// MaxFigures bounds the length of Msg.Figures, and of a Source's.
const MaxFigures = 64

// Source is one worker's figures in a worker-figures message: ID names
// the worker (on the sender's side, its worker slot, from 1: a slot's
// figures count every worker it had; the receiver only tells them apart
// by it).
type Source struct {
	ID      int      `json:"id"`
	Figures []uint64 `json:"figures"`
}

// MaxSources bounds the length of Msg.Sources: 16 vectors of 25 counts of
// up to 20 digits (a count is a uint64: a slot's sum of what its workers
// said saturates at 2^64-1) fit in a packet.
const MaxSources = 16

// ErrMessage is wrapped by every error DecodeMsg returns.
var ErrMessage = errors.New("upgrade: malformed channel message")

// EncodeMsg returns the packet for m.
func EncodeMsg(m Msg) ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("upgrade: encode %s message: %w", m.Kind, err)
	}
	if len(b) > maxMessage {
		return nil, fmt.Errorf("upgrade: %s message of %d bytes is larger than %d", m.Kind, len(b), maxMessage)
	}
	return b, nil
}

// DecodeMsg parses one packet. It rejects, wrapping ErrMessage, anything
// that is not one JSON object with a kind, or that has negative numbers.
func DecodeMsg(b []byte) (Msg, error) {
	var m Msg
	if len(b) > maxMessage {
		return m, fmt.Errorf("%w: %d bytes", ErrMessage, len(b))
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return Msg{}, fmt.Errorf("%w: %v", ErrMessage, err)
	}
	if m.Kind == "" {
		return Msg{}, fmt.Errorf("%w: no kind", ErrMessage)
	}
	if m.To < 0 || m.Pid < 0 || m.Gen < 0 || m.Workers < 0 || m.Ready < 0 || m.Code < 0 || m.Since < 0 || m.Millis < 0 {
		return Msg{}, fmt.Errorf("%w: negative number in %s message", ErrMessage, m.Kind)
	}
	if len(m.Figures) > MaxFigures {
		return Msg{}, fmt.Errorf("%w: %d figures, more than %d", ErrMessage, len(m.Figures), MaxFigures)
	}
	if len(m.Sources) > MaxSources {
		return Msg{}, fmt.Errorf("%w: %d sources, more than %d", ErrMessage, len(m.Sources), MaxSources)
	}
	for _, s := range m.Sources {
		if s.ID <= 0 || len(s.Figures) > MaxFigures {
			return Msg{}, fmt.Errorf("%w: source %d with %d figures", ErrMessage, s.ID, len(s.Figures))
		}
	}
	for _, p := range m.PGIDs {
		if p <= 0 {
			return Msg{}, fmt.Errorf("%w: process group %d", ErrMessage, p)
		}
	}
	return m, nil
}

// Channel is one end of the G1↔G2 socket pair.
type Channel struct {
	f *os.File
}

// newChannelPair makes the socket pair: (G1's end, the end for children).
// Both are close-on-exec and non-blocking; tableflip passes the child end
// to each new master explicitly.
func newChannelPair() (*Channel, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: channel socketpair: %w", err)
	}
	return &Channel{f: os.NewFile(uintptr(fds[0]), "molt-channel")}, os.NewFile(uintptr(fds[1]), "molt-channel-child"), nil
}

// SendTimeout bounds one Send: a peer that stopped reading (its socket
// buffer full) costs the sender's loop at most this long per message,
// and the message is lost (the deadlines of the dance then decide).
const SendTimeout = 200 * time.Millisecond

// NewPair returns the two connected ends of a channel: the old master's
// and the one a new master inherits. Tests of a master script the other
// master with it.
func NewPair() (*Channel, *Channel, error) {
	c, f, err := newChannelPair()
	if err != nil {
		return nil, nil, err
	}
	return c, &Channel{f: f}, nil
}

// Send writes one message, waiting at most SendTimeout for room in the
// socket buffer; errors wrap the kind (os.ErrDeadlineExceeded when the
// peer does not read).
func (c *Channel) Send(m Msg) error {
	b, err := EncodeMsg(m)
	if err != nil {
		return err
	}
	// Both ends are non-blocking sockets, so the runtime's poller holds
	// them and the deadline applies.
	if err := c.f.SetWriteDeadline(time.Now().Add(SendTimeout)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return fmt.Errorf("upgrade: send %s: %w", m.Kind, err)
	}
	if _, err := c.f.Write(b); err != nil {
		return fmt.Errorf("upgrade: send %s: %w", m.Kind, err)
	}
	return nil
}

// Recv blocks for the next message. It returns io.EOF once the other side
// is gone and every message it sent has been read, os.ErrClosed after
// Close, and an error wrapping ErrMessage for a packet it cannot parse
// (the channel stays usable).
func (c *Channel) Recv() (Msg, error) {
	buf := make([]byte, maxMessage+1)
	n, err := c.f.Read(buf)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return Msg{}, io.EOF
		}
		return Msg{}, err
	}
	if n == 0 {
		return Msg{}, io.EOF
	}
	return DecodeMsg(buf[:n])
}

// Close closes this end; a blocked Recv returns os.ErrClosed.
func (c *Channel) Close() error { return c.f.Close() }
