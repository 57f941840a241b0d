package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
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
		raw := sc.Text()
		if !strings.HasPrefix(raw, "{") {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(raw), &m) != nil {
			continue
		}
		l := Line{Fields: m, Raw: raw}
		l.Level, _ = m["@level"].(string)
		l.Message, _ = m["@message"].(string)
		l.Module, _ = m["@module"].(string)
		if ts, ok := m["@timestamp"].(string); ok {
			l.Time, _ = time.Parse(time.RFC3339Nano, ts)
		}
		out = append(out, l)
	}
	return out
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
	WaitFor(t, timeout, what, func() error {
		got = Find(path, match)
		if len(got) < n {
			return fmt.Errorf("%d of %d such lines in %s", len(got), n, path)
		}
		return nil
	})
	return got
}

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
