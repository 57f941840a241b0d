package master

import (
	"math/rand/v2"
	"time"

	crashloop "github.com/molt-server/molt/master/internal/backoff"
)

// Respawn backoff for crash loops (DESIGN §5): package backoff's, the one
// the keeper uses for masters too. A worker that has been ready and alive
// for healthyAfter resets its slot's count.
const (
	backoffMax   = crashloop.Max
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
func (b *backoff) delay(r float64) time.Duration { return crashloop.Delay(b.failures, r) }

// reset forgets past failures.
func (b *backoff) reset() { b.failures = 0 }
