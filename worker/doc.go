// Package worker is the app side of molt's worker protocol, which is
// systemd's: listeners arrive at fds 3.. (LISTEN_FDS, LISTEN_FDNAMES,
// LISTEN_PID), readiness and status go to NOTIFY_SOCKET (sd_notify(3)),
// and WATCHDOG_USEC asks for keep-alive pings. A Go program that uses it
// works the same under a molt master and under plain systemd.
//
// molt adds variables of its own: MOLT_STOP_SIGNAL (the signal that asks
// for a graceful drain), MOLT_DRAIN_TIMEOUT (how long that drain may take),
// MOLT_PARENT_FD (a pipe whose EOF means the master is gone), and
// MOLT_ACCEPT_TABLE and MOLT_ACCEPT_ENTRY (the table Balance uses to keep
// each worker to its share of the connections), and MOLT_HEALTH_FD (a
// private connected socket the master sends its --health-check request
// on; ServeHTTP answers it with the app's handler).
//
// Invariants: the package never changes a shared socket's blocking mode
// (it never calls os.File.Fd on an inherited fd), never logs, and installs
// a signal handler only inside ServeHTTP, where the app asked for one. It
// depends on the standard library and golang.org/x/sys only.
package worker
