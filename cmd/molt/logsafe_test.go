package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// hostile is what a worker may put in a STATUS= or an error string.
const hostile = "a\x1b[2J\x1b]0;title\x07\nmolt: [ERROR] forged line\r\x7f\u009b31m\u202e \xff end"

// TestLogger_TextFormatEscapesWorkerText: a value or a message with
// control characters, a newline or bad UTF-8 is one line with no control
// byte, showing the escapes.
func TestLogger_TextFormatEscapesWorkerText(t *testing.T) {
	var out strings.Builder
	log, err := newLogger(&out, "debug", false)
	if err != nil {
		t.Fatal(err)
	}
	sub := log.Named("worker").With("implied", hostile)
	sub.Debug("worker status", "status", hostile, "error", errors.New(hostile), "list", []string{hostile})
	sub.Error("refused: " + hostile)
	text := out.String()
	if n := strings.Count(text, "\n"); n != 2 {
		t.Errorf("%d lines, want 2:\n%s", n, text)
	}
	for _, b := range []byte(strings.TrimSuffix(text, "\n")) {
		if b != '\n' && (b < 0x20 || b == 0x7f) {
			t.Errorf("a raw control byte %#x in %q", b, text)
		}
	}
	if strings.Contains(text, "\xff") || strings.Contains(text, "\u009b") || strings.Contains(text, "\u202e") {
		t.Errorf("raw bad UTF-8, C1 or bidi rune in %q", text)
	}
	for _, want := range []string{`\x1b[2J`, `\x1b]0;title\a`, `\nmolt: [ERROR] forged line\r\x7f\u009b31m\u202e \xff end`} {
		if strings.Count(text, want) < 4 {
			t.Errorf("%q not shown escaped in every place:\n%s", want, text)
		}
	}
}

// TestLogger_JSONFormatKeepsTheValue: the JSON line is valid and decodes
// to the raw value; DEL, C1 and other non-printable runes are escaped.
func TestLogger_JSONFormatKeepsTheValue(t *testing.T) {
	var out strings.Builder
	log, err := newLogger(&out, "debug", true)
	if err != nil {
		t.Fatal(err)
	}
	valid := strings.ToValidUTF8(hostile, "\ufffd") // encoding/json's own replacement
	log.Debug("worker status", "status", hostile, "astral", "𝄞")
	line := out.String()
	for _, b := range []byte(strings.ReplaceAll(line, "𝄞", "")) {
		if b >= 0x80 || b == 0x7f || b < 0x20 && b != '\n' {
			t.Fatalf("raw byte %#x in %q", b, line)
		}
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("not JSON: %v: %q", err, line)
	}
	if m["status"] != valid || m["astral"] != "𝄞" {
		t.Errorf("decoded %q, %q; want %q", m["status"], m["astral"], valid)
	}
}
