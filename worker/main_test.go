package worker

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
	"testing"
)

// Helper processes: the test binary impersonates a worker, dispatched on
// envHelper (os/exec's exec_test.go does the same). A helper registers
// itself in the file that uses it.
const envHelper = "WORKER_TEST_HELPER"

var helpers = map[string]func() int{}

func registerHelper(name string, f func() int) { helpers[name] = f }

func TestMain(m *testing.M) {
	if name := os.Getenv(envHelper); name != "" {
		f := helpers[name]
		if f == nil {
			fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
			os.Exit(2)
		}
		// As molt's trampoline does: LISTEN_PID can only be known here.
		if os.Getenv("WORKER_TEST_FIX_PID") == "1" {
			os.Setenv(EnvListenPID, strconv.Itoa(os.Getpid()))
		}
		os.Exit(f())
	}
	os.Exit(m.Run())
}

// startHelper runs helper name with files as fds 0.. and env, returning
// its pid; the caller waits for it.
func startHelper(t *testing.T, name string, env []string, files []uintptr) *os.Process {
	t.Helper()
	env = append(env, envHelper+"="+name)
	pid, _, err := syscall.StartProcess(os.Args[0], []string{os.Args[0], "-test.run=^$"}, &syscall.ProcAttr{
		Env:   env,
		Files: files,
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
