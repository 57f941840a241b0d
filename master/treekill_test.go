package master

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/master/internal/procfs"
)

// TestKillTree: a tree that forks on (a child, a grandchild, a process
// in a session of its own whose leader exited, so that its member was
// re-parented away from the tree) is killed whole; an unrelated child of
// the caller, and the caller, are not.
func TestKillTree(t *testing.T) {
	if _, err := exec.LookPath("setsid"); err != nil {
		t.Skip("no setsid(1)")
	}
	dir := t.TempDir()
	pids := filepath.Join(dir, "pids")
	script := `
sleep 300 & echo $! >> "$1"
sh -c 'sleep 300 & echo $! >> "$1"; wait' sh "$1" & echo $! >> "$1"
setsid sh -c 'echo $$ > "$1.sid"; sleep 300 & echo $! >> "$1"' sh "$1" &
wait`
	root := exec.Command("/bin/sh", "-c", script, "sh", pids)
	if err := root.Start(); err != nil {
		t.Fatal(err)
	}
	bystander := exec.Command("sleep", "300")
	if err := bystander.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bystander.Process.Kill(); _ = bystander.Wait() })
	var want []int
	var sid int
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(pids)
		s, _ := os.ReadFile(pids + ".sid")
		want = want[:0]
		for _, f := range strings.Fields(string(b)) {
			p, _ := strconv.Atoi(f)
			want = append(want, p)
		}
		sid, _ = strconv.Atoi(strings.TrimSpace(string(s)))
		// Until the session's leader has exited: its sleep is then an
		// orphan, found only by its session.
		if _, alive := procfs.ReadStat(sid); len(want) == 4 && sid > 0 && !alive {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the tree did not start: pids %v, session %d", want, sid)
		}
		time.Sleep(10 * time.Millisecond) // polling for the script's files
	}
	killed := killTree(root.Process.Pid, []int{sid}, func(p int) bool { return p == bystander.Process.Pid })
	_ = root.Wait()
	t.Logf("killed %v of tree %d + %v", killed, root.Process.Pid, want)
	for _, p := range append(want, root.Process.Pid) {
		deadline := time.Now().Add(5 * time.Second)
		for {
			st, ok := procfs.ReadStat(p)
			if !ok || st.State == 'Z' || st.State == 'X' {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("pid %d of the tree is alive: %+v", p, st)
				break
			}
			time.Sleep(10 * time.Millisecond) // polling for its death
		}
	}
	if st, ok := procfs.ReadStat(bystander.Process.Pid); !ok || st.State == 'Z' || st.State == 'T' {
		t.Errorf("the bystander was touched: %+v, %v", st, ok)
	}
}
