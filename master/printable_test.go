package master

import (
	"strconv"
	"testing"
)

func TestPrintable(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", ""},
		{"serving 12 req/s", "serving 12 req/s"},
		{"héllo wörld ✓ 日本", "héllo wörld ✓ 日本"},
		{`say "hi"`, `say "hi"`},
		{"\x1b[2J", `\x1b[2J`},
		{"\x1b]0;title\x07", `\x1b]0;title\a`},
		{"line\nforged line", `line\nforged line`},
		{"cr\rtab\t", `cr\rtab\t`},
		{"del\x7f", `del\x7f`},
		{"c1 \u009b2J", `c1 \u009b2J`},
		{"bidi \u202egnp.exe", `bidi \u202egnp.exe`},
		{"bad \xff\xfe utf8", `bad \xff\xfe utf8`},
		{`back\slash`, `back\\slash`},
		{`\x1b`, `\\x1b`},
		{"quote\"\x1b\\\"", `quote"\x1b\\"`},
	}
	for _, c := range cases {
		got := Printable(c.in)
		if got != c.want {
			t.Errorf("Printable(%q) = %q, want %q", c.in, got, c.want)
		}
		for _, r := range []byte(got) {
			if r < 0x20 || r == 0x7f {
				t.Errorf("Printable(%q) = %q keeps a control byte %#x", c.in, got, r)
			}
		}
		// The form is unambiguous: it reads back as the raw value.
		if back, err := strconv.Unquote(`"` + stringsEscapeQuotes(got) + `"`); err != nil || back != c.in {
			t.Errorf("Printable(%q) = %q reads back as %q (%v)", c.in, got, back, err)
		}
	}
}

// stringsEscapeQuotes puts back the escapes of the double quotes that
// Printable leaves bare, so that strconv.Unquote can read its output.
func stringsEscapeQuotes(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			out = append(out, s[i], s[i+1])
			i++
		case '"':
			out = append(out, '\\', '"')
		default:
			out = append(out, s[i])
		}
	}
	return string(out)
}
