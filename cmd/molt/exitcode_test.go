package main

import (
	"testing"

	"github.com/molt-server/molt/master/keeper"
	"github.com/molt-server/molt/upgrade"
)

// TestExitCodes_KeeperAgrees: the keeper, which may not import package
// upgrade, resurrects no master that ended with these statuses.
func TestExitCodes_KeeperAgrees(t *testing.T) {
	if keeper.ExitRefused != upgrade.ExitUsage || keeper.ExitAborted != upgrade.ExitAborted {
		t.Errorf("keeper.ExitRefused %d, ExitAborted %d; package upgrade's are %d and %d",
			keeper.ExitRefused, keeper.ExitAborted, upgrade.ExitUsage, upgrade.ExitAborted)
	}
}
