package worker

import (
	"context"
	"os"
	"strconv"
	"sync"
	"time"
)

// WatchdogInterval returns the interval WATCHDOG_USEC asks for, and false
// when no watchdog is enabled for this process (unset, invalid, or
// WATCHDOG_PID naming another process), as sd_watchdog_enabled(3).
func WatchdogInterval() (time.Duration, bool) {
	usec, err := strconv.ParseInt(os.Getenv(EnvWatchdogUSec), 10, 64)
	if err != nil || usec <= 0 {
		return 0, false
	}
	if p := os.Getenv(EnvWatchdogPID); p != "" && p != strconv.Itoa(os.Getpid()) {
		return 0, false
	}
	return time.Duration(usec) * time.Microsecond, true
}

// StartWatchdog sends WATCHDOG=1 every half interval until ctx is done or
// stop is called, so the manager sees the process alive (it pings from a
// goroutine: a process whose Go runtime is wedged stops pinging). It does
// nothing when no watchdog is enabled. stop is safe to call more than
// once and returns after the pinging goroutine has ended.
func StartWatchdog(ctx context.Context) (stop func()) {
	interval, ok := WatchdogInterval()
	if !ok {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		_ = Notify(NotifyWatchdog)
		for {
			select {
			case <-t.C:
				_ = Notify(NotifyWatchdog) // a lost ping is retried at the next tick
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() {
		cancel()
		wg.Wait()
	}
}
