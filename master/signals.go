package master

import (
	"os"
	"os/signal"
	"slices"
	"syscall"
)

// signalAction is a signal the master catches and what it is for; what it
// does depends on the master's role (handlers.go, DESIGN §3).
type signalAction struct {
	sig syscall.Signal
	// action is the log's "action" value.
	action string
}

// signalTable is the master's signals in the order a batch is handled:
// a fast stop wins over everything, and QUIT is handled last so that a
// USR2 that arrives in the same batch is seen first (STYLE.md, "os/signal
// coalesces and reorders"; DESIGN §4 "Never retire the last serving
// generation").
var signalTable = []signalAction{
	{syscall.SIGTERM, "fast shutdown of every generation"},
	{syscall.SIGINT, "fast shutdown of every generation"},
	{syscall.SIGUSR2, "upgrade"},
	{syscall.SIGHUP, "respawn workers in standby"},
	{syscall.SIGWINCH, "stop workers while another generation serves"},
	{syscall.SIGUSR1, "reopen log file"},
	{syscall.SIGTTIN, "add a worker"},
	{syscall.SIGTTOU, "remove a worker"},
	{syscall.SIGQUIT, "graceful shutdown, or commit/abort an upgrade"},
}

// lookupSignal returns the table entry of sig and whether there is one.
func lookupSignal(sig os.Signal) (signalAction, bool) {
	for _, a := range signalTable {
		if a.sig == sig {
			return a, true
		}
	}
	return signalAction{}, false
}

// sortBatch orders a batch as signalTable does and drops repeats.
func sortBatch(sigs []os.Signal) []os.Signal {
	rank := func(s os.Signal) int {
		for i, a := range signalTable {
			if a.sig == s {
				return i
			}
		}
		return len(signalTable)
	}
	out := slices.Clone(sigs)
	slices.SortStableFunc(out, func(a, b os.Signal) int { return rank(a) - rank(b) })
	return slices.Compact(out)
}

// signalBufferSize is generous: every signal of the table can be pending
// at once, and a burst must never block the runtime's delivery (runc
// signals.go uses 2048 for the same reason).
const signalBufferSize = 2048

// watchSignals catches every signal of the table and sends each batch of
// pending signals to send, until done is closed. It returns a function
// that stops catching them.
func watchSignals(send func(event) bool, done <-chan struct{}) (stop func()) {
	c := make(chan os.Signal, signalBufferSize)
	sigs := make([]os.Signal, len(signalTable))
	for i, a := range signalTable {
		sigs[i] = a.sig
	}
	signal.Notify(c, sigs...)
	go func() {
		for {
			var first os.Signal
			select {
			case first = <-c:
			case <-done:
				return
			}
			batch := []os.Signal{first}
		drain:
			for {
				select {
				case s := <-c:
					batch = append(batch, s)
				default:
					break drain
				}
			}
			if !send(signalBatch{sigs: sortBatch(batch)}) {
				return
			}
		}
	}()
	return func() { signal.Stop(c) }
}
