package procfs

import (
	"os"
	"syscall"
	"testing"
)

func TestParent(t *testing.T) {
	ppid, pgrp, ok := Parent(os.Getpid())
	if !ok || ppid != os.Getppid() || pgrp != syscall.Getpgrp() {
		t.Errorf("Parent(self) = %d, %d, %v; want %d, %d", ppid, pgrp, ok, os.Getppid(), syscall.Getpgrp())
	}
	if _, _, ok := Parent(1 << 30); ok {
		t.Error("Parent(no such pid) found one")
	}
}
