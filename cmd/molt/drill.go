package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/cmd/molt/internal/drill"
)

const drillUsage = `Usage: molt drill [flags] TARGET

Drives HTTP/1.1 load at TARGET (http://host:port/path, or unix:/socket),
triggers --upgrades upgrades every --interval (or, with --fault, kills a
molt master once after --interval), and reports what the clients
saw: requests, failures by class, latency percentiles overall and inside
upgrade windows, how long each upgrade took until a new generation answered
and until the old one's last answer, and which generation answered over
time (from the --header each answer carries; molt's demo sends
X-Molt-Master-Pid). It works against any HTTP server, to compare molt with
what you run today. Exit status 0 when no request failed and every trigger
worked, 1 otherwise, 2 for bad flags.

Examples:
  molt drill --upgrades 5 --interval 5s --ctl /run/app/molt.pid http://127.0.0.1:8080/
  molt drill --upgrades 3 --signal /run/nginx.pid http://127.0.0.1/
  molt drill --fault kill-master --interval 5s --ctl /run/app/molt.pid http://127.0.0.1:8080/
  molt drill --upgrades 3 --exec 'systemctl reload app' --header X-Served-By http://127.0.0.1/
  molt drill --duration 30s --clients 64 --mode keep-alive --json http://127.0.0.1:8080/

Flags:
`

func cmdDrill(args []string) int {
	fs := flag.NewFlagSet("molt drill", flag.ContinueOnError)
	clients := fs.Int("clients", 16, "concurrent clients `N` per connection mode")
	mode := fs.String("mode", "both", "connection `MODE`: keep-alive, close (a connection per request) or both side by side")
	rate := fs.Float64("rate", 0, "at most `N` requests per second per mode (default: as fast as the clients go)")
	duration := fs.Duration("duration", 10*time.Second, "run at least `DUR` (with upgrades: until the last one had --interval to settle)")
	upgrades := fs.Int("upgrades", 0, "trigger `K` upgrades, the first after --interval")
	interval := fs.Duration("interval", 5*time.Second, "`DUR` between upgrades")
	ctlPID := fs.String("ctl", "", "upgrade with molt ctl --pid-file `PIDFILE` upgrade --wait (this molt binary)")
	sigPID := fs.String("signal", "", "upgrade with kill -USR2 $(cat `PIDFILE`)")
	execLine := fs.String("exec", "", "upgrade by running the shell `COMMAND` (any server)")
	header := fs.String("header", "X-Molt-Master-Pid", "answer header `NAME` that names the serving generation")
	workerHeader := fs.String("worker-header", "X-Molt-Worker-Pid", "answer header `NAME` that names the serving worker (balance)")
	idle := fs.Int("idle-conns", 0, "open `N` keep-alive connections at the start and leave them idle")
	timeout := fs.Duration("timeout", 10*time.Second, "bound each request, dial included, to `DUR`")
	path := fs.String("path", "", "request `PATH` for a unix: target (default /)")
	fault := fs.String("fault", "", "inject the fault `NAME` after --interval instead of upgrading (needs --ctl and molt's keeper): "+strings.Join(drill.FaultNames, " or "))
	asJSON := fs.Bool("json", false, "print the report as JSON")
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, drillUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	bad := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "molt drill: "+format+"\n", a...)
		return exitUsage
	}
	if fs.NArg() != 1 {
		return bad("want one TARGET (http://host:port/path or unix:/path), got %d arguments", fs.NArg())
	}
	cfg := drill.Config{
		Target: fs.Arg(0), Path: *path, Clients: *clients, Rate: *rate, Duration: *duration,
		Upgrades: *upgrades, Interval: *interval, Header: *header, WorkerHeader: *workerHeader,
		IdleConns: *idle, Timeout: *timeout,
	}
	switch *mode {
	case "both":
		cfg.Modes = []drill.Mode{drill.KeepAlive, drill.Close}
	case "keep-alive":
		cfg.Modes = []drill.Mode{drill.KeepAlive}
	case "close":
		cfg.Modes = []drill.Mode{drill.Close}
	default:
		return bad("--mode %q: want keep-alive, close or both", *mode)
	}
	if *clients < 1 || *clients > 10000 || *rate < 0 || *idle < 0 || *duration <= 0 || *timeout <= 0 || *upgrades < 0 {
		return bad("--clients must be 1 to 10000; --rate, --idle-conns and --upgrades must not be negative; durations must be positive")
	}
	triggers := 0
	for _, v := range []string{*ctlPID, *sigPID, *execLine} {
		if v != "" {
			triggers++
		}
	}
	switch {
	case triggers > 1:
		return bad("give one of --ctl, --signal and --exec")
	case *fault != "" && *ctlPID == "":
		return bad("--fault needs --ctl PIDFILE (molt's pid file: the drill finds the master and its keeper with molt ctl status)")
	case *fault != "" && *upgrades > 0:
		return bad("--fault injects one fault instead of upgrades: drop --upgrades")
	case *fault != "" && !slices.Contains(drill.FaultNames, *fault):
		return bad("--fault %q: want one of %s", *fault, strings.Join(drill.FaultNames, ", "))
	case *fault != "" && *interval <= 0:
		return bad("--interval must be positive")
	case *fault != "":
		self, err := os.Executable()
		if err != nil {
			return bad("cannot find this molt binary for --ctl: %v", err)
		}
		cfg.Trigger = &drill.Fault{Name: *fault, Molt: self, PIDFile: *ctlPID}
		cfg.Upgrades = 1
	case *upgrades > 0 && triggers == 0:
		return bad("--upgrades needs --ctl PIDFILE, --signal PIDFILE or --exec COMMAND")
	case *upgrades > 0 && *interval <= 0:
		return bad("--interval must be positive")
	case *ctlPID != "":
		self, err := os.Executable()
		if err != nil {
			return bad("cannot find this molt binary for --ctl: %v", err)
		}
		cfg.Trigger = drill.Ctl{Molt: self, PIDFile: *ctlPID}
	case *sigPID != "":
		cfg.Trigger = drill.Signal{PIDFile: *sigPID, Sig: syscall.SIGUSR2}
	case *execLine != "":
		cfg.Trigger = drill.Command{Line: *execLine}
	}
	if !*asJSON {
		cfg.Progress = os.Stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if f, ok := cfg.Trigger.(*drill.Fault); ok {
		if err := f.Check(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "molt drill:", err)
			return exitFailure
		}
	}
	rep, err := drill.Run(ctx, cfg)
	if rep == nil {
		fmt.Fprintln(os.Stderr, "molt drill:", err)
		return exitFailure
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	} else {
		rep.Print(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt drill: interrupted:", err)
		return exitFailure
	}
	for _, u := range rep.Upgrades {
		if u.Error != "" {
			return exitFailure
		}
	}
	if rep.Failed > 0 || len(rep.Upgrades) < cfg.Upgrades {
		return exitFailure
	}
	return exitOK
}
