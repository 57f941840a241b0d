package test

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// Timeout scales d by MOLT_TEST_TIMEOUT_SCALE (a float, default 1), for
// slow or loaded machines.
func Timeout(d time.Duration) time.Duration {
	if s, err := strconv.ParseFloat(os.Getenv("MOLT_TEST_TIMEOUT_SCALE"), 64); err == nil && s > 0 {
		return time.Duration(float64(d) * s)
	}
	return d
}

// capTimeout returns Timeout(d), but no later than shortly before the
// test's own deadline, so a hang fails with a message instead of the go
// test binary's panic.
func capTimeout(t testing.TB, d time.Duration) time.Duration {
	d = Timeout(d)
	if dt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := dt.Deadline(); ok {
			if left := time.Until(dl) - 5*time.Second; left < d {
				d = max(left, time.Second)
			}
		}
	}
	return d
}

// WaitFor polls f until it returns nil, backing off from 10ms to 250ms
// (pollMax) between calls, and fails the test with the last error once timeout
// (scaled, and capped below the test's deadline) has passed. what names
// the awaited event in the failure message.
func WaitFor(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	waitFor(t, timeout, pollMax, what, f)
}

// waitFor is WaitFor with maxDelay the longest pause between two calls.
func waitFor(t testing.TB, timeout, maxDelay time.Duration, what string, f func() error) {
	t.Helper()
	if err := poll(capTimeout(t, timeout), maxDelay, f); err != nil {
		t.Fatalf("waiting for %s: %v (timeout %v)", what, err, Timeout(timeout))
	}
}

// pollMax is the longest pause between two calls of WaitFor's f: some
// are costly (a molt ctl run).
const pollMax = 250 * time.Millisecond

// Poll is WaitFor without a test: it returns f's last error at the
// timeout (not scaled), or nil.
func Poll(timeout time.Duration, f func() error) error {
	return poll(timeout, pollMax, f)
}

func poll(timeout, maxDelay time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	delay := min(10*time.Millisecond, maxDelay)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(delay)
		delay = min(delay*2, maxDelay)
	}
}
