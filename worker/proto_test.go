package worker

import (
	"errors"
	"strings"
	"testing"
)

func TestParseNotify(t *testing.T) {
	tests := []struct {
		in      string
		want    []Field
		wantErr string
	}{
		{in: "READY=1", want: []Field{{"READY", "1"}}},
		{in: "READY=1\nSTATUS=serving 3 conns\n", want: []Field{{"READY", "1"}, {"STATUS", "serving 3 conns"}}},
		{in: "\n\nWATCHDOG=1\n\n", want: []Field{{"WATCHDOG", "1"}}},
		{in: "STATUS=a=b", want: []Field{{"STATUS", "a=b"}}},
		{in: "STATUS=", want: []Field{{"STATUS", ""}}},
		{in: "custom_var=x", want: []Field{{"custom_var", "x"}}},
		{in: "", wantErr: "empty"},
		{in: "\n\n", wantErr: "no assignment"},
		{in: "READY", wantErr: "no '='"},
		{in: "=1", wantErr: "bad key"},
		{in: "1READY=1", wantErr: "bad key"},
		{in: "RE ADY=1", wantErr: "bad key"},
		{in: "READY=1\x00", wantErr: "NUL"},
		{in: "STATUS=\xff", wantErr: "UTF-8"},
		{in: "STATUS=" + strings.Repeat("x", MaxNotifySize), wantErr: "more than"},
	}
	for _, tt := range tests {
		got, err := ParseNotify([]byte(tt.in))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrNotifyMessage) {
				t.Errorf("ParseNotify(%q) error = %v, want ErrNotifyMessage containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseNotify(%q): %v", tt.in, err)
			continue
		}
		if len(got.Fields) != len(tt.want) {
			t.Errorf("ParseNotify(%q) = %v, want %v", tt.in, got.Fields, tt.want)
			continue
		}
		for i := range tt.want {
			if got.Fields[i] != tt.want[i] {
				t.Errorf("ParseNotify(%q) field %d = %v, want %v", tt.in, i, got.Fields[i], tt.want[i])
			}
		}
	}
}

func TestNotification_LastAssignmentWins(t *testing.T) {
	n, err := ParseNotify([]byte("STATUS=a\nREADY=1\nSTATUS=b"))
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := n.Get("STATUS"); v != "b" {
		t.Errorf("Get(STATUS) = %q, want the last one, b", v)
	}
	if !n.Is("READY", "1") || n.Is("READY", "0") || n.Is("STOPPING", "1") {
		t.Error("Is answers wrongly")
	}
}

func TestParseFDNames(t *testing.T) {
	tests := []struct {
		in      string
		n       int
		want    string
		wantErr bool
	}{
		{"web:admin", 2, "web,admin", false},
		{"", 2, "unknown,unknown", false},
		{"web", 2, "web,unknown", false},
		{"web::x", 3, "web,unknown,x", false},
		{"a:b:c", 2, "", true},
		{"", 0, "", false},
	}
	for _, tt := range tests {
		got, err := ParseFDNames(tt.in, tt.n)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseFDNames(%q, %d) error = %v", tt.in, tt.n, err)
			continue
		}
		if err == nil && strings.Join(got, ",") != tt.want {
			t.Errorf("ParseFDNames(%q, %d) = %v, want %s", tt.in, tt.n, got, tt.want)
		}
	}
}

func FuzzParseNotify(f *testing.F) {
	for _, s := range []string{"READY=1", "READY=1\nSTATUS=x\n", "WATCHDOG=1", "=", "\x00", "A=\xff", "BARRIER=1\n\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := ParseNotify(b)
		if err != nil {
			if !errors.Is(err, ErrNotifyMessage) {
				t.Fatalf("error %v does not wrap ErrNotifyMessage", err)
			}
			return
		}
		if len(n.Fields) == 0 {
			t.Fatal("accepted a message without assignments")
		}
		for _, f := range n.Fields {
			if !validKey(f.Key) || strings.ContainsAny(f.Value, "\n\x00") {
				t.Fatalf("accepted field %q=%q", f.Key, f.Value)
			}
		}
	})
}

func FuzzParseFDNames(f *testing.F) {
	f.Add("web:admin", 2)
	f.Add("", 0)
	f.Add(":::", 3)
	f.Fuzz(func(t *testing.T, s string, n int) {
		if n < 0 || n > 1024 {
			return
		}
		names, err := ParseFDNames(s, n)
		if err != nil {
			return
		}
		if len(names) != n {
			t.Fatalf("%d names for %d fds", len(names), n)
		}
		for _, name := range names {
			if name == "" {
				t.Fatal("empty name: must be \"unknown\"")
			}
		}
	})
}
