package main

import "runtime/debug"

// buildVersion is set by the Makefile: -ldflags "-X main.buildVersion=...".
var buildVersion string

// version returns the build's version: the linker-set one, else the
// module version recorded by `go install`, else "dev".
func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
