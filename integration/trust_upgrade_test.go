package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/molt-server/molt/test"
)

// Issue 11, the operator's side of the trust boundary: text a worker or a
// new binary chose reaches the operator escaped; a failed upgrade leaves
// neither processes nor descriptors behind.

// hostileStatus is a STATUS= meant for the operator's terminal: clear the
// screen, retitle the window, a carriage return over the line, DEL, the
// C1 CSI, a right-to-left override. (A newline cannot be in a STATUS=: it
// ends the notify line; the pre-flight output below carries one.)
const hostileStatus = "ok\x1b[2J\x1b]0;title\x07\rgone\x7f\u009b31m\u202eevil"

// statusWorker is a worker (python3) that sends READY=1 and hostileStatus
// to $NOTIFY_SOCKET, a filesystem path or, with a leading '@', an
// abstract address, then waits to be stopped.
const statusWorker = `
import os, signal, socket, sys
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(addr)
s.send(b"READY=1\nSTATUS=" + sys.argv[1].encode())
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    signal.pause()
`

// rawControl returns the first control or non-printable rune (other than
// newline) in s, as an operator's terminal would get it, or "".
func rawControl(s string) string {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r != '\n' && (r == utf8.RuneError && n == 1 || !unicode.IsPrint(r) && r != ' ') {
			return fmt.Sprintf("%q at byte %d", s[i:i+n], i)
		}
		i += n
	}
	return ""
}

// TestTrust_CtlStatusEscapesWorkerText: a worker's STATUS= with escape
// sequences, and a new binary's pre-flight output with a newline and
// escape sequences, are shown by "molt ctl status" with no raw control
// byte, in the escaped form; "--json" is valid JSON that decodes to the
// raw values.
func TestTrust_CtlStatusEscapesWorkerText(t *testing.T) {
	t.Parallel()
	py, err := exec.LookPath("python3")
	test.Require(t, "python3", err == nil, "the worker that sends a hostile STATUS= is a python3 script")
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--workers", "1", "--probation", "300ms", "--", py, "-c", statusWorker, hostileStatus}})
	u.waitServing()
	// A new binary that fails its pre-flight with hostile output (and
	// would start well: the pre-flight's failure gives the reason).
	const output = "broken\x1b[2J\nforged line\x1b]0;pwned\x07"
	u.deployFile(fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = version ]; then printf 'broken\\033[2J\\nforged line\\033]0;pwned\\007'; exit 1; fi\nexec %s \"$@\"\n", bins.molt2), 0o755)
	if code, out := ctl(t, u.pidFile, "upgrade", "--wait"); code != 1 || rawControl(out) != "" {
		t.Errorf("ctl upgrade --wait: exit %d, raw control: %s:\n%q", code, rawControl(out), out)
	}
	test.WaitLog(t, u.log, stepTimeout, 1, "the rollback", test.Event("upgrade.rolled_back"))

	var raw struct {
		Procs []struct {
			PID    int    `json:"pid"`
			Status string `json:"status"`
		} `json:"procs"`
		LastUpgrade struct {
			Reason string `json:"reason"`
		} `json:"last_upgrade"`
	}
	test.WaitFor(t, stepTimeout, "the worker's STATUS= in ctl status --json", func() error {
		code, out := ctl(t, u.pidFile, "status", "--json")
		if code != 0 {
			return fmt.Errorf("exit %d: %s", code, out)
		}
		if c := rawControl(out); c != "" {
			t.Fatalf("status --json holds a raw control character %s:\n%s", c, out)
		}
		if err := json.Unmarshal([]byte(out), &raw); err != nil {
			t.Fatalf("status --json: %v\n%s", err, out)
		}
		if len(raw.Procs) != 1 || raw.Procs[0].Status == "" {
			return fmt.Errorf("procs %+v", raw.Procs)
		}
		return nil
	})
	if raw.Procs[0].Status != hostileStatus {
		t.Errorf("status --json: STATUS %q, want the raw %q", raw.Procs[0].Status, hostileStatus)
	}
	if !strings.Contains(raw.LastUpgrade.Reason, output) {
		t.Errorf("status --json: reason %q lacks the raw output %q", raw.LastUpgrade.Reason, output)
	}

	code, out := ctl(t, u.pidFile, "status")
	if code != 0 {
		t.Fatalf("ctl status: exit %d: %s", code, out)
	}
	if c := rawControl(out); c != "" {
		t.Errorf("ctl status prints a raw control character %s:\n%q", c, out)
	}
	for _, want := range []string{
		`ok\x1b[2J\x1b]0;title\a\rgone\x7f\u009b31m\u202eevil`,
		`broken\x1b[2J\nforged line\x1b]0;pwned\a`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ctl status lacks the escaped %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, "\nforged line") {
		t.Errorf("the pre-flight output forged a line of ctl status:\n%s", out)
	}
	// The JSON log holds the same values, escaped by its encoding only.
	b, err := os.ReadFile(u.log)
	if err != nil {
		t.Fatal(err)
	}
	if c := rawControl(string(b)); c != "" {
		t.Errorf("the JSON log holds a raw control character %s", c)
	}
	if l := test.Find(u.log, test.Event("worker.status")); len(l) == 0 || l[0].Str("status") != hostileStatus {
		t.Errorf("the worker's status in the JSON log: %v, want the raw value", l)
	}
	u.stop(test.Event("upgrade.rolled_back"), test.Event("upgrade.preflight_failed"),
		test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"), test.Event("master.gave_up"))
}

// TestTrust_RollbackKillsTheHungMastersWholeTree: a new binary that forks
// children of its own (a sleeper, a subshell with a sleeper, a loop that
// keeps forking) and then hangs, never saying hello: at the ready
// deadline the old master kills all of it, and rolls back; the old
// generation serves throughout, with no failed request.
func TestTrust_RollbackKillsTheHungMastersWholeTree(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout", "2s", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	l := startLoad(t, addr)
	pids := filepath.Join(u.dir, "hung.pids")
	u.deployFile(passesPreflight+fmt.Sprintf(`p=%s
sleep 3600 & echo $! >> "$p"
sh -c 'sleep 3600 & echo $! >> "$1"; wait' sh "$p" & echo $! >> "$p"
sh -c 'while :; do sleep 3600 & echo $! >> "$1"; sleep 0.05; done' sh "$p" & echo $! >> "$p"
echo $$ >> "$p"
exec sleep 3600
`, pids), 0o755)
	u.Signal(syscall.SIGUSR2)
	readPids := func() []int {
		b, _ := os.ReadFile(pids)
		var out []int
		for _, f := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(f); err == nil {
				out = append(out, p)
			}
		}
		return out
	}
	test.WaitFor(t, stepTimeout, "the hung master's children", func() error {
		if n := len(readPids()); n < 6 {
			return fmt.Errorf("%d pids", n)
		}
		return nil
	})
	for _, p := range readPids() {
		test.Track(t, p) // killed at cleanup, and an error, if it outlives the test
	}
	test.WaitLog(t, u.log, 30*time.Second, 1, "the rollback", test.Event("upgrade.rolled_back"))
	killed := test.WaitLog(t, u.log, stepTimeout, 1, "the tree kill", test.Event("upgrade.tree_killed"))
	all := readPids()
	t.Logf("the hung master's processes: %d, killed %s: %s", len(all), killed[0].Str("killed"), killed[0].Str("pids"))
	for _, p := range all {
		test.WaitFor(t, 5*time.Second, fmt.Sprintf("pid %d of the hung master's tree to be gone", p), func() error {
			if test.Alive(p) {
				return fmt.Errorf("alive")
			}
			return nil
		})
	}
	if got := u.current(); got != u.Pid {
		t.Errorf("molt.pid names %d after the rollback, want %d", got, u.Pid)
	}
	servedOnlyBy(t, addr, u.Pid, 10)
	u.install(bins.molt2, byRename)
	u.upgrade()
	l.stop(t)
	u.stop(test.Event("upgrade.deadline"), test.Event("upgrade.rolled_back"))
}

// fdCount is the number of pid's open descriptors (/proc/PID/fd).
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestTrust_FailedUpgradesLeakNoDescriptors: 50 failed upgrades in a row,
// of both kinds (a binary that fails its pre-flight and its start, one
// that passes the pre-flight and exits 1 at start), under load: the old master's descriptor count is
// back to its baseline within seconds of the last, without waiting for a
// garbage collection of its own, and the next good binary upgrades.
func TestTrust_FailedUpgradesLeakNoDescriptors(t *testing.T) {
	t.Parallel()
	u := start(t, runOpts{Deploy: byRename, Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	addr := u.addr()
	u.waitServing()
	u.waitWorkers(2)
	l := startLoad(t, addr)
	rolledBack := 0
	fail := func(i int) {
		t.Helper()
		if i%2 == 0 {
			u.deployFile("#!/bin/sh\necho broken >&2\nexit 1\n", 0o755)
		} else {
			u.deployFile(passesPreflight+"exit 1\n", 0o755)
		}
		rolledBack++
		u.Signal(syscall.SIGUSR2)
		test.WaitLog(t, u.log, stepTimeout, rolledBack, "rollback "+strconv.Itoa(rolledBack), test.Event("upgrade.rolled_back"))
	}
	// One attempt of each kind first: the first to start a new master
	// makes the channel to new masters (a socket pair, kept for every
	// later attempt), which is no leak.
	fail(0)
	fail(1)
	// The least of five looks over a second (as master.baseline): a
	// look can catch something in flight, which only ever adds.
	base := fdCount(t, u.Pid)
	for range 4 {
		time.Sleep(200 * time.Millisecond) // spacing the looks; nothing is awaited
		base = min(base, fdCount(t, u.Pid))
	}
	const n = 50
	for i := range n {
		fail(i)
	}
	var got int
	test.WaitFor(t, 5*time.Second, "the old master's descriptors back to their baseline", func() error {
		if got = fdCount(t, u.Pid); got > base {
			return fmt.Errorf("%d descriptors, baseline %d: %s", got, base, fdList(u.Pid))
		}
		return nil
	})
	t.Logf("after %d failed upgrades (%d rolled back, with the first two): %d descriptors, baseline %d", n, rolledBack, got, base)
	u.install(bins.molt2, byRename)
	pid := u.upgrade()
	if r := get(t, addr, "/"); r.Header.Get("X-Molt-Version") != nextVersion() || r.Header.Get("X-Molt-Master-Pid") != strconv.Itoa(pid) {
		t.Errorf("after the good upgrade: master %s version %s", r.Header.Get("X-Molt-Master-Pid"), r.Header.Get("X-Molt-Version"))
	}
	l.stop(t)
	u.stop(test.Event("upgrade.preflight_failed"), test.Event("upgrade.rolled_back"))
}

// fdList names pid's descriptors, for a failure's message.
func fdList(pid int) string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		out = append(out, e.Name()+"->"+target)
	}
	return strings.Join(out, " ")
}
