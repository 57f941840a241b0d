package master

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Printable returns s as it may be shown to an operator: every control
// character (C0, DEL, C1), every other non-printable rune (format
// characters such as U+202E, which reorders a line) and every byte that
// is not UTF-8 is written as a Go escape (\x1b, \n, \u202e, \xff), and a
// backslash as \\, so that the form is unambiguous; printable UTF-8 stays
// as it is. Text that a worker or another program chose (a STATUS=, an
// exit reason, a command's output) passes through it before it reaches a
// terminal or a text log: it can neither move the cursor, retitle the
// window nor forge a line.
func Printable(s string) string {
	if isPrintable(s) {
		return s
	}
	q := strconv.Quote(s)
	// strconv.Quote escapes exactly what we want, plus the double quote:
	// in its output every " is preceded by its escaping backslash.
	return strings.ReplaceAll(q[1:len(q)-1], `\"`, `"`)
}

// isPrintable reports whether Printable leaves s unchanged.
func isPrintable(s string) bool {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == '\\' || (r == utf8.RuneError && n == 1) || !unicode.IsPrint(r) {
			return false
		}
		i += n
	}
	return true
}
