package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Line is one JSON log line of molt (go-hclog's JSON format).
type Line struct {
	Level   string
	Message string
	Module  string
	Time    time.Time // @timestamp
	Fields  map[string]any
	Raw     string
}

// Str returns field k as a string ("" if absent).
func (l Line) Str(k string) string {
	v, ok := l.Fields[k]
	if !ok {
		return ""
	}
	if s, ok := v.(string); ok {
		return s
	}
	return fmt.Sprint(v)
}

// Int returns field k as an int (0 if absent or not a number).
func (l Line) Int(k string) int {
	if f, ok := l.Fields[k].(float64); ok {
		return int(f)
	}
	return 0
}

// Logs parses the JSON lines of a log file; other lines (an app's own
// output) are skipped.
func Logs(path string) []Line {
	b, _ := os.ReadFile(path)
	var out []Line
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l, ok := parseLine(sc.Text()); ok {
			out = append(out, l)
		}
	}
	return out
}

// parseLine parses one JSON log line; ok is false for any other line.
func parseLine(raw string) (l Line, ok bool) {
	if !strings.HasPrefix(raw, "{") {
		return l, false
	}
	var m map[string]any
	if json.Unmarshal([]byte(raw), &m) != nil {
		return l, false
	}
	l = Line{Fields: m, Raw: raw}
	l.Level, _ = m["@level"].(string)
	l.Message, _ = m["@message"].(string)
	l.Module, _ = m["@module"].(string)
	if ts, ok := m["@timestamp"].(string); ok {
		l.Time, _ = time.Parse(time.RFC3339Nano, ts)
	}
	return l, true
}

// logTail reads a log file's JSON lines as they are appended: each next
// reads and parses only what was written since the last one. If the file
// at path was replaced (a rotation), truncated or removed, next starts
// over from its beginning and says so.
type logTail struct {
	path string
	ino  uint64
	off  int64
	part []byte // a last line not finished yet
}

// next returns the lines completed since the last call; reset is true if
// the lines returned before are no longer the file's.
func (r *logTail) next() (lines []Line, reset bool) {
	f, err := os.Open(r.path)
	if err != nil {
		reset = r.ino != 0
		*r = logTail{path: r.path}
		return nil, reset
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, false
	}
	var ino uint64
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		ino = st.Ino
	}
	if ino != r.ino || fi.Size() < r.off {
		reset = r.ino != 0
		*r = logTail{path: r.path, ino: ino}
	}
	if fi.Size() == r.off {
		return nil, reset
	}
	b := make([]byte, fi.Size()-r.off)
	n, _ := f.ReadAt(b, r.off)
	r.off += int64(n)
	data := append(r.part, b[:n]...)
	i := bytes.LastIndexByte(data, '\n')
	if i < 0 {
		r.part = data
		return nil, reset
	}
	r.part = append([]byte(nil), data[i+1:]...)
	for raw := range strings.SplitSeq(string(data[:i]), "\n") {
		if l, ok := parseLine(raw); ok {
			lines = append(lines, l)
		}
	}
	return lines, reset
}

// Msg matches lines with message msg and, for each key/value pair in kv,
// that field formatted as a string. Tests match Event instead: Msg is
// left only for the lines that have no event key yet (some of the
// upgrade's), and goes with them.
func Msg(msg string, kv ...string) func(Line) bool {
	return func(l Line) bool {
		if l.Message != msg {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if l.Str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// Event matches lines whose stable "event" key is name and, for each
// key/value pair in kv, that field formatted as a string. Tests match
// events, not messages: the event keys are the interface operators alert
// on (docs), the messages are prose that may be reworded.
func Event(name string, kv ...string) func(Line) bool {
	return func(l Line) bool {
		if l.Str("event") != name {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if l.Str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// Find returns the lines of path that match.
func Find(path string, match func(Line) bool) []Line {
	var out []Line
	for _, l := range Logs(path) {
		if match(l) {
			out = append(out, l)
		}
	}
	return out
}

// WaitLog waits until the log at path has n lines that match and returns
// them; what names them in the failure message.
func WaitLog(t testing.TB, path string, timeout time.Duration, n int, what string, match func(Line) bool) []Line {
	t.Helper()
	var got []Line
	tail := logTail{path: path}
	// A log is read incrementally (logTail), so it is looked at more often
	// than WaitFor's 250 ms at most: every such wait would otherwise
	// overshoot its event by 125 ms on average.
	waitFor(t, timeout, logPollMax, what, func() error {
		lines, reset := tail.next()
		if reset {
			got = nil
		}
		for _, l := range lines {
			if match(l) {
				got = append(got, l)
			}
		}
		if len(got) < n {
			return fmt.Errorf("%d of %d such lines in %s", len(got), n, path)
		}
		return nil
	})
	return got
}

// logPollMax is the longest pause between two looks of WaitLog.
const logPollMax = 25 * time.Millisecond

// CheckLogs fails the test if the log at path shows a panic, a data race
// or a Go fatal error, or an error-level line that no allow matches.
func CheckLogs(t testing.TB, path string, allow ...func(Line) bool) {
	t.Helper()
	b, _ := os.ReadFile(path)
	for _, bad := range []string{"panic:", "WARNING: DATA RACE", "fatal error:"} {
		if bytes.Contains(b, []byte(bad)) {
			t.Errorf("%s shows %q", path, bad)
		}
	}
next:
	for _, l := range Logs(path) {
		if l.Level != "error" {
			continue
		}
		for _, a := range allow {
			if a(l) {
				continue next
			}
		}
		t.Errorf("unexpected error in %s: %s", path, l.Raw)
	}
}
