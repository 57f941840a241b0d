package main

import "testing"

// TestParseCtlCommand_Stop: stop is graceful by default; --fast and
// --all are the two other stops, and exclude each other.
func TestParseCtlCommand_Stop(t *testing.T) {
	for _, tt := range []struct {
		args      []string
		fast, all bool
		bad       bool
	}{
		{args: []string{"stop"}},
		{args: []string{"stop", "--graceful"}},
		{args: []string{"stop", "--fast"}, fast: true},
		{args: []string{"stop", "--all"}, all: true},
		{args: []string{"stop", "-all"}, all: true},
		{args: []string{"stop", "--all", "--fast"}, bad: true},
		{args: []string{"stop", "--everything"}, bad: true},
	} {
		req, _, err := parseCtlCommand(tt.args)
		if (err != nil) != tt.bad {
			t.Errorf("%v: error %v, want bad=%v", tt.args, err, tt.bad)
			continue
		}
		if !tt.bad && (req.Cmd != "stop" || req.Fast != tt.fast || req.All != tt.all) {
			t.Errorf("%v: %+v", tt.args, req)
		}
	}
}
