package worker

import (
	"net/http"
	"sync/atomic"
)

// NotifyRecycle is molt's extension of the notify protocol: a ready worker
// that sends it asks to be replaced. The master starts a new worker in its
// slot and stops this one (its stop signal: drain and exit) only once the
// new one is ready, so capacity never drops. Other managers (systemd)
// ignore the assignment.
const NotifyRecycle = "MOLT_RECYCLE=1"

// Recycle asks the master to replace this worker (NotifyRecycle), e.g.
// after a number of requests or when it has grown too large (Apache's
// MaxRequestsPerChild, gunicorn's max_requests). The worker goes on
// serving until it is told to stop. Asking again before then does
// nothing more.
func Recycle() error { return Notify(NotifyRecycle) }

// RecycleAfter wraps h so that the worker asks to be recycled (Recycle)
// once it has begun serving n requests; it serves every request it
// receives, including those after the n-th, until it is stopped. n < 1
// disables it. To keep workers started together from recycling together,
// add jitter to n (gunicorn's max_requests_jitter): n + rand.IntN(n/10).
func RecycleAfter(n int, h http.Handler) http.Handler {
	if n < 1 {
		return h
	}
	var served atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if served.Add(1) == int64(n) {
			_ = Recycle() // a lost datagram only delays the recycling
		}
		h.ServeHTTP(w, r)
	})
}
