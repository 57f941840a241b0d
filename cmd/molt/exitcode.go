package main

import "github.com/molt-server/molt/upgrade"

// Exit codes of molt (docs/operating.md "Exit codes"): their one home is
// package upgrade, whose old master explains them when a new one exits.
const (
	exitOK      = upgrade.ExitOK      // stopped cleanly (QUIT, TERM, INT)
	exitFailure = upgrade.ExitFailure // failed while running
	exitUsage   = upgrade.ExitUsage   // bad flags or values, or a hidden role run by hand
	exitBind    = upgrade.ExitBind    // a listener could not be bound
	exitLocked  = upgrade.ExitLocked  // another master holds the pid file's lock
	exitExec    = upgrade.ExitExec    // a worker's exec trampoline could not run COMMAND
)
