// Package test holds the helpers that molt's tests share: bounded waits,
// processes started with cleanup that cannot be skipped, a final sweep of
// leftover processes, builds of the binaries under test, log-file checks
// and a raw HTTP/1.1 GET. It may import only the standard library, x/sys
// and molt's worker package (STYLE.md §4): helpers must not see internals.
//
// Every wait is bounded and scaled by MOLT_TEST_TIMEOUT_SCALE; every
// process is stopped by pid; tests that need a capability of the machine
// call Require, which skips on a developer's machine and fails in CI
// (MOLT_TEST_REQUIRE=all).
package test
