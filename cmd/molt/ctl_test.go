package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/molt-server/molt/master"
)

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

// TestPrintStatus_UpgradePhases: the phases of the upgrade in flight and
// of the last one print in their order, from the JSON ctl status carries.
func TestPrintStatus_UpgradePhases(t *testing.T) {
	raw := `{"pid":10,"state":"upgrading","role":"primary",
		"upgrade":{"side":"old","new_pid":20,"serving":true,"ready":2,"want":2,"elapsed":"60ms","preflight":"running",
			"phases":{"serving_ms":40.5,"hello_ms":5,"start_ms":0.02,"config_ms":5.25,"total_ms":40.5}},
		"last_upgrade":{"outcome":"rolled back","reason":"the new binary failed its pre-flight check: exit status 1","new_pid":9,"at":"2026-01-02T03:04:05Z",
			"phases":{"preflight_ms":7,"rolled_back_ms":12.5,"start_ms":0.03,"total_ms":12.5}}}`
	var st master.Status
	if err := json.Unmarshal([]byte(raw), &st); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printStatus(&out, &st)
	for _, want := range []string{
		"upgrade  in flight for 60ms: new master pid 20, 2 of 2 workers ready, serving true, pre-flight running\n" +
			"         phases (ms since the signal): start 0.02ms, hello 5ms, config 5.25ms, serving 40.5ms, total 40.5ms\n",
		"last upgrade rolled back at 2026-01-02T03:04:05Z (new master pid 9): the new binary failed its pre-flight check: exit status 1\n" +
			"         phases (ms since the signal): start 0.03ms, preflight 7ms, rolled_back 12.5ms, total 12.5ms\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks\n%s\ngot:\n%s", want, out.String())
		}
	}
}

// TestPrintStatus_Resurrections: the resurrections line shows the count
// and the last reason, made printable; none without a resurrection.
func TestPrintStatus_Resurrections(t *testing.T) {
	var out bytes.Buffer
	printStatus(&out, &master.Status{PID: 10, Keeper: 5, Resurrections: 2, ResurrectedBecause: "the master was killed by SIGKILL\x1b[2J"})
	if want := "resurrections  2 (fresh masters the keeper started); last: the master was killed by SIGKILL\\x1b[2J\n"; !strings.Contains(out.String(), want) {
		t.Errorf("status lacks\n%s\ngot:\n%s", want, out.String())
	}
	out.Reset()
	printStatus(&out, &master.Status{PID: 10, Keeper: 5})
	if strings.Contains(out.String(), "resurrections") {
		t.Errorf("a master never resurrected shows:\n%s", out.String())
	}
}
