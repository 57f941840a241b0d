// Package backoff is molt's crash-loop backoff (DESIGN §5), shared by the
// master's worker slots and the keeper's resurrections of a master.
package backoff

import "time"

// A first failure is retried at once; each further consecutive failure
// doubles the wait from Base up to Max, with ±20% jitter so that many
// failing together do not retry in lock step.
const (
	Base = 100 * time.Millisecond
	Max  = 10 * time.Second
)

// Delay is the wait after failures consecutive failures, for a jitter
// draw r in [0,1).
func Delay(failures int, r float64) time.Duration {
	if failures <= 1 {
		return 0
	}
	d := Base
	for i := 2; i < failures && d < Max; i++ {
		d *= 2
	}
	d = min(d, Max)
	jittered := time.Duration(float64(d) * (0.8 + 0.4*r))
	return min(jittered, Max)
}
