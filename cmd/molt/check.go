package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

const checkUsage = `Usage: molt check [run flags] [-- COMMAND [ARGS...]]

Validates what "molt run" with the same flags would run, as nginx -t does:
the flags, the config file (--config; every error at FILE:LINE:COL), the
worker settings (--user needs root, --chdir must exist, COMMAND must be
an executable file), the pid file's directory and the log files'. It
starts nothing and binds nothing; a port already taken is found only by
molt run (exit 3).

Exit status: 0 if the configuration is valid (a summary goes to stdout),
2 if not (every problem goes to stderr).

The flags are molt run's; see "molt help run".
`

// cmdCheck is "molt check": molt run's configuration, validated.
func cmdCheck(args []string) int {
	var f runFlags
	fs := newRunFlagSet(&f, os.Stderr)
	fs.Usage = func() { fmt.Fprint(os.Stderr, checkUsage) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	cfg, err := loadRunConfig(&f, fs)
	if err == nil {
		_, err = newLogger(io.Discard, f.logLevel, f.logJSON)
	}
	if err == nil && f.logFile != "" && !isDir(filepath.Dir(f.logFile)) {
		err = fmt.Errorf("--log-file %s: directory %s does not exist", f.logFile, filepath.Dir(f.logFile))
	}
	if err == nil && f.workerLog != "" && !isDir(filepath.Dir(f.workerLog)) {
		err = fmt.Errorf("--worker-log %s: directory %s does not exist", f.workerLog, filepath.Dir(f.workerLog))
	}
	if err == nil {
		err = cfg.Check()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt check:", err)
		return exitUsage
	}
	var ls []string
	for _, l := range cfg.Listeners {
		addr := l.Address
		if l.Network == "unix" {
			addr = "unix:" + addr
		}
		ls = append(ls, l.Name+"="+addr)
	}
	app := "the built-in demo"
	if len(cfg.Command) > 0 {
		app = strings.Join(cfg.Command, " ")
	}
	source := "flags"
	if f.configFile != "" {
		source = f.configFile + " and flags"
	}
	fmt.Printf("molt check: configuration OK (%s)\n  listeners: %s\n  workers:   %d\n  command:   %s\n  pid file:  %s\n",
		source, strings.Join(ls, ", "), cfg.Workers, app, cfg.PIDFile)
	return exitOK
}
