package master

import (
	"errors"
	"strings"
	"testing"

	"github.com/molt-server/molt/upgrade"
)

// TestFailureReason turns tableflip's errors and the new master's exit
// statuses into the reasons the README documents.
func TestFailureReason(t *testing.T) {
	m := &Master{}
	tests := []struct {
		up   attempt
		err  string
		want string
	}{
		{attempt{}, "upgrade: can't start child: can't start process ./molt: fork/exec: exec format error", "the new binary could not be started: "},
		{attempt{}, "upgrade: child pid=12 exited", "the new master exited with status 0 before its commit"},
		{attempt{}, "upgrade: child pid=12 exited: exit status 2", "the new binary refused its flags or configuration (exit status 2)"},
		{attempt{}, "upgrade: child pid=12 exited: exit status 10", "workers were not ready in time (exit status 10)"},
		{attempt{}, "upgrade: child pid=12 exited: exit status 77", "the new master exited with status 77 before its commit"},
		{attempt{}, "upgrade: child pid=12 exited: signal: segmentation fault", "the new master was killed by signal: segmentation fault before its commit"},
		{attempt{killed: true}, "upgrade: child pid=12 exited: signal: killed", "did not serve in time and was killed"},
		{attempt{failed: &upgrade.Msg{Reason: "2 of 3 workers ready"}}, "upgrade: child pid=12 exited: exit status 10", "2 of 3 workers ready"},
	}
	for _, tt := range tests {
		up := tt.up
		if got := m.failureReason(&up, errors.New(tt.err)); !strings.Contains(got, tt.want) {
			t.Errorf("failureReason(%q) = %q, want it to contain %q", tt.err, got, tt.want)
		}
	}
}
