package master

import (
	"strings"
	"testing"
)

// TestParseResurrections: the count and the reason from the keeper are
// taken only in their strict form.
func TestParseResurrections(t *testing.T) {
	for _, c := range []struct {
		n, why string
		ok     bool
	}{
		{"1", "the master was killed by SIGKILL", true},
		{"42", "the master failed: exit status 1", true},
		{"1073741824", "x", true},
		{"", "x", false},
		{"0", "x", false},
		{"01", "x", false},
		{"-1", "x", false},
		{"+1", "x", false},
		{" 1", "x", false},
		{"1e3", "x", false},
		{"1073741825", "x", false},
		{"99999999999", "x", false},
		{"1", "", false},
		{"1", "line\nforged", false},
		{"1", "\x1b[2J", false},
		{"1", "\xff", false},
		{"1", strings.Repeat("a", 257), false},
	} {
		r, err := parseResurrections(c.n, c.why)
		if (err == nil) != c.ok || (c.ok && r.why != c.why) {
			t.Errorf("%q %q: %+v, %v; want ok=%v", c.n, c.why, r, err, c.ok)
		}
	}
}
