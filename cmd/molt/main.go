// Command molt runs a network service as a master process with preforked
// workers on shared listen sockets. See README.md.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/molt-server/molt/master"
)

const usage = `molt: zero-downtime master/worker server for Go services and any
program that speaks systemd's socket-activation protocol.

Usage:
  molt run [flags] [-- COMMAND [ARGS...]]   run a master and its workers
  molt ctl [flags] COMMAND                  talk to a running master (status, upgrade --wait, ...)
  molt check [run flags] [-- COMMAND ...]   validate a configuration without starting anything
  molt drill [flags] TARGET                 load a server, upgrade it, report what clients saw
  molt demo --listen ADDR [--reuseport]     the built-in demo app alone, without a master
  molt version                              print the version
  molt help [COMMAND]                       show help

Run "molt help run" for the flags of run.
`

func main() {
	// Hidden roles first: a master starts every worker as this binary.
	isWorker, err := master.RunChild()
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt:", err)
		if errors.Is(err, master.ErrManualRole) {
			os.Exit(exitUsage)
		}
		os.Exit(exitExec)
	}
	if isWorker {
		os.Exit(runDemo())
	}
	os.Exit(dispatch(os.Args[1:]))
}

// dispatch runs one subcommand and returns the process exit code.
func dispatch(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:])
	case "ctl":
		return cmdCtl(args[1:])
	case "check":
		return cmdCheck(args[1:])
	case "drill":
		return cmdDrill(args[1:])
	case "demo":
		return cmdDemo(args[1:])
	case "version", "--version", "-version":
		fmt.Println("molt", version())
		return exitOK
	case "help", "-h", "--help", "-help":
		if len(args) > 1 && args[1] == "run" {
			var f runFlags
			newRunFlagSet(&f, os.Stdout).Usage()
			return exitOK
		}
		if len(args) > 1 && args[1] == "check" {
			fmt.Print(checkUsage)
			return exitOK
		}
		if len(args) > 1 && args[1] == "drill" {
			return cmdDrill([]string{"-h"})
		}
		if len(args) > 1 && args[1] == "demo" {
			return cmdDemo([]string{"-h"})
		}
		if len(args) > 1 && args[1] == "ctl" {
			fmt.Print(ctlUsage)
			return exitOK
		}
		fmt.Print(usage)
		return exitOK
	}
	fmt.Fprintf(os.Stderr, "molt: unknown command %q\n\n%s", args[0], usage)
	return exitUsage
}
