package integration

import (
	"path/filepath"
	"strconv"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestEmbedded_ProgramIsItsOwnMasterAndWorkers: a Go program embedding
// package master serves through workers that are the same binary.
func TestEmbedded_ProgramIsItsOwnMasterAndWorkers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	log := filepath.Join(dir, "embed.log")
	p := test.Start(t, test.Opts{Path: bins.embedapp, Dir: dir, Log: log,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--pid-file", filepath.Join(dir, "embed.pid")}})
	l := test.WaitLog(t, log, startTimeout, 1, "listening", test.Event("listener.listening"))
	addr := l[0].Str("addr")
	test.WaitLog(t, log, startTimeout, 1, "serving", test.Event("master.serving"))
	r := get(t, addr, "/")
	if r.Header.Get("X-Embedded") != "yes" || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(p.Pid) {
		t.Errorf("answer %v: want the embedded worker of master %d", r.Header, p.Pid)
	}
	for _, w := range test.Children(p.Pid) {
		test.Track(t, w)
	}
	p.Signal(quit)
	if code := p.Wait(stepTimeout); code != 0 {
		t.Errorf("embedded master exit %d after QUIT", code)
	}
	test.CheckLogs(t, log)
}
