package main

// Exit codes of molt (README "Exit codes").
const (
	exitOK      = 0   // stopped cleanly (QUIT, TERM, INT)
	exitFailure = 1   // failed while running
	exitUsage   = 2   // bad flags or values, or a hidden role run by hand
	exitBind    = 3   // a listener could not be bound
	exitLocked  = 4   // another master holds the pid file's lock
	exitExec    = 127 // a worker's exec trampoline could not run COMMAND
)
