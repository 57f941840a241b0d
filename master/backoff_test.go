package master

import (
	"testing"
	"time"
)

func TestBackoff_DoublesToCapWithJitterAndResets(t *testing.T) {
	var b backoff
	want := []time.Duration{0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond,
		800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 6400 * time.Millisecond,
		10 * time.Second, 10 * time.Second}
	for i, w := range want {
		b.failures = i + 1
		if got := b.delay(0.5); got != w { // r=0.5 is the jitter's midpoint
			t.Errorf("failure %d: delay %v, want %v", i+1, got, w)
		}
		lo, hi := b.delay(0), b.delay(0.999999)
		if w > 0 && (lo < w*8/10 || hi > min(w*12/10, backoffMax)) {
			t.Errorf("failure %d: jitter range [%v, %v] outside ±20%% of %v (capped)", i+1, lo, hi, w)
		}
	}
	b.reset()
	if d := b.fail(); d != 0 {
		t.Errorf("first failure after reset waits %v, want 0 (replace at once)", d)
	}
}
