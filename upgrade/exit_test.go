package upgrade

import (
	"errors"
	"strings"
	"testing"
)

// TestFailureReason turns tableflip's errors and the new master's exit
// statuses into the reasons docs/upgrades.md documents.
func TestFailureReason(t *testing.T) {
	tests := []struct {
		reported string
		killed   bool
		err      string
		want     string
		kind     FailureKind
	}{
		{"", false, "can't start child: can't start process ./molt: fork/exec: exec format error", "the new binary could not be started: ", FailedStart},
		{"", false, "child pid=12 exited", "the new master exited with status 0 before its commit", FailedExit},
		{"", false, "child pid=12 exited: exit status 2", "the new binary refused its flags or configuration (exit status 2)", FailedExit},
		{"", false, "child pid=12 exited: exit status 10", "workers were not ready in time (exit status 10)", FailedExit},
		{"", false, "child pid=12 exited: exit status 77", "the new master exited with status 77 before its commit", FailedExit},
		{"", false, "child pid=12 exited: signal: segmentation fault", "the new master was killed by signal: segmentation fault before its commit", FailedSignal},
		{"", true, "child pid=12 exited: signal: killed", "did not serve in time and was killed", FailedSignal},
		{"2 of 3 workers ready", false, "child pid=12 exited: exit status 10", "2 of 3 workers ready", FailedExit},
		{"", false, "upgrade in progress", "upgrade in progress", FailedOther},
	}
	for _, tt := range tests {
		err := classify(errors.New(tt.err))
		if err.Kind != tt.kind {
			t.Errorf("classify(%q).Kind = %v, want %v", tt.err, err.Kind, tt.kind)
		}
		if got := FailureReason(tt.reported, tt.killed, err); !strings.Contains(got, tt.want) {
			t.Errorf("FailureReason(%q) = %q, want it to contain %q", tt.err, got, tt.want)
		}
	}
}

func TestFailureCause(t *testing.T) {
	tests := []struct {
		reported *Msg
		killed   bool
		err      string
		want     string
	}{
		{nil, false, "can't start child: can't start process ./molt: fork/exec: exec format error", CauseStart},
		{nil, false, "child pid=12 exited", CauseFailed},
		{nil, false, "child pid=12 exited: exit status 2", CauseConfig},
		{nil, false, "child pid=12 exited: exit status 10", CauseNotReady},
		{nil, false, "child pid=12 exited: exit status 77", CauseFailed},
		{nil, false, "child pid=12 exited: signal: segmentation fault", CauseSignal},
		{nil, true, "child pid=12 exited: signal: killed", CauseDeadline},
		{&Msg{Kind: KindFailed, Code: ExitWorkerDied, Reason: "worker 1 died"}, false, "child pid=12 exited: exit status 11", CauseWorkerDied},
		{&Msg{Kind: KindFailed, Code: 99, Reason: "?"}, false, "child pid=12 exited: exit status 99", CauseFailed},
		{nil, false, "upgrade in progress", CauseFailed},
	}
	for _, tt := range tests {
		if got := FailureCause(tt.reported, tt.killed, errors.New(tt.err)); got != tt.want {
			t.Errorf("FailureCause(%v, %v, %q) = %q, want %q", tt.reported, tt.killed, tt.err, got, tt.want)
		}
	}
}
