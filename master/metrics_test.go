package master

import (
	"strings"
	"testing"

	"github.com/molt-server/molt/worker"
)

// TestRoutineNotify: only a message that merely reports (figures, a
// watchdog ping, STATUS=) spares the loop a metrics snapshot; one that
// may change a worker's state (READY=1, STOPPING=1, anything else) or
// mixes both does not.
func TestRoutineNotify(t *testing.T) {
	for _, c := range []struct {
		fields []string
		want   bool
	}{
		{[]string{"MOLT_STATS=1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"}, true},
		{[]string{"WATCHDOG=1"}, true},
		{[]string{"STATUS=busy"}, true},
		{[]string{"STATUS=busy", "WATCHDOG=1"}, true},
		{[]string{"READY=1"}, false},
		{[]string{"STOPPING=1"}, false},
		{[]string{"STATUS=ready", "READY=1"}, false},
		{[]string{"X_APP=1"}, false},
	} {
		var n worker.Notification
		for _, f := range c.fields {
			k, v, _ := strings.Cut(f, "=")
			n.Fields = append(n.Fields, worker.Field{Key: k, Value: v})
		}
		if got := routineNotify(n); got != c.want {
			t.Errorf("routineNotify(%v) = %v, want %v", c.fields, got, c.want)
		}
	}
}
