//go:build !moltfault

package main

import "github.com/hashicorp/go-hclog"

// withFault is the identity: the faults a test injects into a master
// exist only in a build with the tag moltfault (fault_moltfault.go).
func withFault(l hclog.Logger) hclog.Logger { return l }
