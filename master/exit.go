package master

import "github.com/molt-server/molt/upgrade"

// Exit codes of a new master that gives up before its commit
// (docs/operating.md "Exit codes"): their one home is package upgrade,
// which also explains them to the old master.
const (
	ExitNotReady     = upgrade.ExitNotReady
	ExitWorkerDied   = upgrade.ExitWorkerDied
	ExitAborted      = upgrade.ExitAborted
	ExitNoParent     = upgrade.ExitNoParent
	ExitStoppedByOld = upgrade.ExitStoppedByOld
	ExitPIDFile      = upgrade.ExitPIDFile
	ExitHealthFailed = upgrade.ExitHealthFailed
)

// ExitError is what Run returns for a new master that gave up: the
// process should exit with Code, which the old master interprets.
type ExitError = upgrade.ExitError
