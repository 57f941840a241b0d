package main

import (
	"fmt"
	"io"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master"
)

// Log lines carry text that workers and other programs chose: a worker's
// STATUS= (at debug level), a pre-flight's output, an app's error string,
// an exit reason. None of it may reach an operator's terminal as a control
// sequence, nor forge a log line.
//
// The JSON format is safe by its encoding, but for the characters
// encoding/json writes as they are: DEL, the C1 controls (U+0080-U+009F,
// which some terminals take for ESC sequences) and other non-printable
// runes (U+202E...). jsonSafe writes those as \u escapes: the line stays
// valid JSON with the same value.
//
// go-hclog's text format escapes the control characters of a value, but
// writes the message as it is, splits a value with a newline over lines
// of its own, and passes bytes that are not UTF-8 through; safeLogger
// makes every message and every string-like value Printable first, so a
// line stays one line and shows \x1b, \n, \xff where the raw bytes were.

// safeLogger is an hclog.Logger whose messages and values are made
// Printable before the text format writes them.
type safeLogger struct{ hclog.Logger }

func (l safeLogger) Log(level hclog.Level, msg string, args ...interface{}) {
	l.Logger.Log(level, master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) Trace(msg string, args ...interface{}) {
	l.Logger.Trace(master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) Debug(msg string, args ...interface{}) {
	l.Logger.Debug(master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) Info(msg string, args ...interface{}) {
	l.Logger.Info(master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) Warn(msg string, args ...interface{}) {
	l.Logger.Warn(master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) Error(msg string, args ...interface{}) {
	l.Logger.Error(master.Printable(msg), safeArgs(args)...)
}
func (l safeLogger) With(args ...interface{}) hclog.Logger {
	return safeLogger{l.Logger.With(safeArgs(args)...)}
}
func (l safeLogger) Named(name string) hclog.Logger {
	return safeLogger{l.Logger.Named(name)}
}
func (l safeLogger) ResetNamed(name string) hclog.Logger {
	return safeLogger{l.Logger.ResetNamed(name)}
}

// safeArgs returns args (key, value, key, value...) with every string,
// error and Stringer value made Printable; numbers, durations and the
// like are left to hclog.
func safeArgs(args []interface{}) []interface{} {
	out := make([]interface{}, len(args))
	for i, a := range args {
		switch v := a.(type) {
		case string:
			a = master.Printable(v)
		case error:
			a = master.Printable(v.Error())
		case []string:
			s := make([]string, len(v))
			for j := range v {
				s[j] = master.Printable(v[j])
			}
			a = s
		case hclog.Quote:
			a = master.Printable(string(v))
		case hclog.Format:
			if len(v) > 0 {
				if f, ok := v[0].(string); ok {
					a = master.Printable(fmt.Sprintf(f, v[1:]...))
				}
			}
		case fmt.Stringer:
			a = master.Printable(v.String())
		}
		out[i] = a
	}
	return out
}

// jsonSafe passes JSON log lines on with every non-printable rune that
// encoding/json leaves raw written as a \u escape. It sees whole lines:
// hclog writes each entry with one Write.
type jsonSafe struct{ w io.Writer }

func (j jsonSafe) Write(p []byte) (int, error) {
	if !needsJSONEscape(p) {
		return j.w.Write(p)
	}
	out := make([]byte, 0, len(p)+32)
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		switch {
		case r == utf8.RuneError && n == 1, r < utf8.RuneSelf && r != 0x7f, r >= utf8.RuneSelf && unicode.IsPrint(r):
			// encoding/json has escaped the other ASCII controls and
			// replaced bad bytes; other ASCII and printable runes stay.
			out = append(out, p[i:i+n]...)
		case r > 0xffff:
			r1, r2 := utf16.EncodeRune(r)
			out = appendU(appendU(out, r1), r2)
		default:
			out = appendU(out, r)
		}
		i += n
	}
	if _, err := j.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// needsJSONEscape reports whether p holds DEL or a non-ASCII rune that is
// not printable.
func needsJSONEscape(p []byte) bool {
	for i := 0; i < len(p); {
		if p[i] < utf8.RuneSelf {
			if p[i] == 0x7f {
				return true
			}
			i++
			continue
		}
		r, n := utf8.DecodeRune(p[i:])
		if r != utf8.RuneError && !unicode.IsPrint(r) {
			return true
		}
		i += n
	}
	return false
}

func appendU(b []byte, r rune) []byte {
	const hex = "0123456789abcdef"
	return append(b, '\\', 'u', hex[r>>12&0xf], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
}
