//go:build race

package test

// RaceEnabled reports whether the test binary is race-built; the binaries
// under test are then built with -race too.
const RaceEnabled = true
