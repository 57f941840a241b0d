package master

import (
	"os"
	"slices"
	"syscall"
	"testing"
)

func TestSortBatch_CanonicalOrder(t *testing.T) {
	// Go delivers signals that land together lowest number first: QUIT (3)
	// before USR2 (12). The batch order puts QUIT last and merges repeats.
	in := []os.Signal{syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTTIN, syscall.SIGQUIT, syscall.SIGTERM}
	got := sortBatch(in)
	want := []os.Signal{syscall.SIGTERM, syscall.SIGUSR2, syscall.SIGUSR1, syscall.SIGTTIN, syscall.SIGQUIT}
	if !slices.Equal(got, want) {
		t.Errorf("sortBatch(%v) = %v, want %v", in, got, want)
	}
}

func TestSignalTable_CoversEverySignalOfTheDesign(t *testing.T) {
	for _, s := range []syscall.Signal{syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGTERM, syscall.SIGINT, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR1} {
		if _, ok := lookupSignal(s); !ok {
			t.Errorf("%v is not caught: Go's default action would hit the master", s)
		}
	}
}
