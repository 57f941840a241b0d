package procfs

import (
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestReadStatAndChildren(t *testing.T) {
	st, ok := ReadStat(os.Getpid())
	// /proc/<pid>/stat reports the main thread, which may be asleep while
	// another thread runs this test: any state letter will do.
	if !ok || st.PPID != os.Getppid() || st.PGRP != syscall.Getpgrp() || !strings.ContainsRune("RSDIT", rune(st.State)) {
		t.Errorf("ReadStat(self) = %+v, %v", st, ok)
	}
	if sid, _ := unix.Getsid(0); st.Session != sid {
		t.Errorf("session %d, want %d", st.Session, sid)
	}
	if st, ok := parseStat("12 (a) b) c) S 1 12 12 0"); !ok || st.State != 'S' || st.PPID != 1 || st.Session != 12 {
		t.Errorf("parseStat with parens in comm = %+v, %v", st, ok)
	}
	if _, ok := ReadStat(1 << 30); ok {
		t.Error("ReadStat(no such pid) found one")
	}
	p, err := os.StartProcess("/bin/sleep", []string{"sleep", "5"}, &os.ProcAttr{})
	if err != nil {
		t.Skip(err)
	}
	defer p.Wait()
	defer p.Kill()
	found := false
	for _, c := range Children(os.Getpid()) {
		found = found || c == p.Pid
	}
	if !found {
		t.Errorf("Children(self) = %v lacks %d", Children(os.Getpid()), p.Pid)
	}
	found = false
	for _, pid := range All() {
		found = found || pid == p.Pid
	}
	if !found {
		t.Errorf("All() lacks %d", p.Pid)
	}
}
