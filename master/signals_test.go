package master

import (
	"os"
	"slices"
	"strings"
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

// TestSignalTable_MatchesDocs: the signal table of docs/operating.md
// lists the signals in the order the master handles a batch (STYLE.md
// principle 3).
func TestSignalTable_MatchesDocs(t *testing.T) {
	b, err := os.ReadFile("../docs/operating.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n## Signals\n")
	if !ok {
		t.Fatal("docs/operating.md has no Signals section")
	}
	// The first table of the section: its rows name the signals.
	var documented []string
	inTable := false
	for _, line := range strings.Split(rest, "\n") {
		if strings.HasPrefix(line, "## ") {
			break
		}
		if !strings.HasPrefix(line, "|") {
			if inTable {
				break
			}
			continue
		}
		inTable = true
		if !strings.HasPrefix(line, "| `") {
			continue // the header and its separator
		}
		first := strings.Split(line, "|")[1]
		for _, name := range strings.Split(first, ",") {
			documented = append(documented, "SIG"+strings.Trim(strings.TrimSpace(name), "`"))
		}
	}
	var table []string
	for _, a := range signalTable {
		table = append(table, unixName(a.sig))
	}
	if !slices.Equal(documented, table) {
		t.Errorf("docs/operating.md signal table %v, master's table %v: keep them in the same order", documented, table)
	}
}
