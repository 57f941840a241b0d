package master

import "fmt"

// Exit codes of a new master that gives up before its commit (README
// "Upgrade failures"). The old master reads them from the new one's exit
// status when no reason came over the channel first.
const (
	exitConfig       = 2  // as the CLI's: the configuration is refused
	ExitNotReady     = 10 // its workers were not all ready within the ready timeout
	ExitWorkerDied   = 11 // one of its workers exited before the commit
	ExitAborted      = 12 // told to give up: QUIT to the new master
	ExitNoParent     = 13 // no configuration from the old master over the channel
	ExitStoppedByOld = 14 // TERM/INT to the old master stopped both generations
	ExitPIDFile      = 15 // it could not write the pid file (a full disk, a read-only directory)
)

// exitReasons explains every exit status an old master may see from a new
// one: molt's own, and those of the CLI before the master starts.
var exitReasons = map[int]string{
	1:                "the new master failed while starting",
	2:                "the new binary refused its flags or configuration",
	3:                "the new master could not bind a listener",
	4:                "the new master found the pid-file lock held",
	ExitNotReady:     "the new generation's workers were not ready in time",
	ExitWorkerDied:   "a worker of the new generation exited before the commit",
	ExitAborted:      "the new master was told to abort (QUIT)",
	ExitNoParent:     "the new master got no configuration from the old one",
	ExitStoppedByOld: "the new master was stopped with the old one",
	ExitPIDFile:      "the new master could not write the pid file",
}

// ExitError is what Run returns for a new master that gave up: the
// process should exit with Code, which the old master interprets.
type ExitError struct {
	Code   int
	Reason string
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("new generation gave up (exit %d): %s", e.Code, e.Reason)
}
