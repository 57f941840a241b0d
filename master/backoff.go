package master

import (
	"math/rand/v2"
	"time"
)

// Respawn backoff for crash loops (DESIGN §5). A worker that fails for the
// first time is replaced at once; each further consecutive failure doubles
// the wait from backoffBase up to backoffMax, with ±20% jitter so that many
// slots failing together do not respawn in lock step. A worker that has
// been ready and alive for healthyAfter resets its slot's count.
const (
	backoffBase  = 100 * time.Millisecond
	backoffMax   = 10 * time.Second
	healthyAfter = 10 * time.Second
)

// backoff counts a slot's consecutive failures. The zero value is ready.
type backoff struct {
	failures int
}

// fail records one more failure and returns how long to wait before the
// next start.
func (b *backoff) fail() time.Duration {
	b.failures++
	return b.delay(rand.Float64())
}

// delay is the wait after b.failures failures, for a jitter draw r in [0,1).
func (b *backoff) delay(r float64) time.Duration {
	if b.failures <= 1 {
		return 0
	}
	d := backoffBase
	for i := 2; i < b.failures && d < backoffMax; i++ {
		d *= 2
	}
	d = min(d, backoffMax)
	jittered := time.Duration(float64(d) * (0.8 + 0.4*r))
	return min(jittered, backoffMax)
}

// reset forgets past failures.
func (b *backoff) reset() { b.failures = 0 }
