package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/molt-server/molt/master"
	"github.com/molt-server/molt/master/ctlclient"
)

const ctlUsage = `Usage: molt ctl [flags] COMMAND [ARGS]

Talks to a running master over its control socket (molt.sock beside the
pid file). During an upgrade, --old talks to the old master instead.

Commands:
  status [--json]           generations, workers, listeners, upgrade state
  upgrade [--wait]          start an upgrade (like USR2); --wait prints each
                            step and exits 0 on commit, 1 on rollback
  scale N                   set the worker count to N
  stop [--fast|--all]       stop (graceful by default; --fast kills workers;
                            --all stops every generation gracefully, an
                            upgrade in flight included)
  reopen-logs               reopen the log file (like USR1)
  reload [--wait]           reload (not built yet)

molt ctl talks only to a server that runs as root or as the caller
(SO_PEERCRED); any other is refused with exit code 3.

Flags:
`

// Exit codes of molt ctl.
const (
	ctlFailed  = 1 // the master refused or the operation failed (a rollback)
	ctlNoPeer  = 3 // no master answers on the socket
	ctlTimeout = 4 // no final answer within --timeout
)

// cmdCtl is "molt ctl".
func cmdCtl(args []string) int {
	fs := flag.NewFlagSet("molt ctl", flag.ContinueOnError)
	socket := fs.String("socket", "", "control socket `PATH` (default: molt.sock beside --pid-file)")
	pidFile := fs.String("pid-file", master.DefaultPIDFile, "the master's pid file `PATH`, to find its control socket")
	old := fs.Bool("old", false, "talk to the old master of an upgrade in flight (molt.sock.oldbin)")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up waiting for the final answer after `DUR`")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), ctlUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	req, human, err := parseCtlCommand(fs.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt ctl:", err)
		fs.Usage()
		return exitUsage
	}
	path := *socket
	if path == "" {
		path = filepath.Join(filepath.Dir(*pidFile), master.DefaultControlSocket)
	}
	if *old {
		path += ".oldbin"
	}
	return ctlCall(path, req, human, *timeout, os.Stdout)
}

// parseCtlCommand turns the command line into a request; human is false
// for status --json.
func parseCtlCommand(args []string) (req master.CtlRequest, human bool, err error) {
	if len(args) == 0 {
		return req, false, errors.New("no command")
	}
	req.Cmd, human = args[0], true
	rest := args[1:]
	flagArg := func(name string) bool {
		for i, a := range rest {
			if a == name || a == "-"+strings.TrimLeft(name, "-") {
				rest = append(rest[:i:i], rest[i+1:]...)
				return true
			}
		}
		return false
	}
	switch req.Cmd {
	case "status":
		human = !flagArg("--json")
	case "upgrade", "reload":
		req.Wait = flagArg("--wait")
	case "stop":
		req.Fast = flagArg("--fast")
		req.All = flagArg("--all")
		flagArg("--graceful")
		if req.Fast && req.All {
			return req, false, errors.New("stop: --fast and --all exclude each other (--fast already stops both generations)")
		}
	case "scale":
		if len(rest) != 1 {
			return req, false, errors.New("scale needs the worker count: molt ctl scale N")
		}
		n, err := strconv.Atoi(rest[0])
		if err != nil || n < 1 {
			return req, false, fmt.Errorf("scale %q: want a number of workers, at least 1", rest[0])
		}
		req.Workers, rest = n, nil
	case "reopen-logs":
	default:
		return req, false, fmt.Errorf("unknown command %q", req.Cmd)
	}
	if len(rest) > 0 {
		return req, false, fmt.Errorf("%s: unexpected %q", req.Cmd, strings.Join(rest, " "))
	}
	return req, human, nil
}

// ctlCall sends req and prints the replies; it returns the exit code.
func ctlCall(path string, req master.CtlRequest, human bool, timeout time.Duration, out io.Writer) int {
	conn, _, err := ctlclient.Dial(path, 5*time.Second)
	if noServer := (*ctlclient.NoServerError)(nil); errors.As(err, &noServer) {
		fmt.Fprintf(os.Stderr, "molt ctl: %v\n(is molt running? use --socket or --pid-file to find it; during an upgrade --old reaches the old master)\n", noServer)
		return ctlNoPeer
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "molt ctl:", err)
		return ctlNoPeer
	}
	defer conn.Close()
	var result int
	errBadReply := errors.New("bad reply")
	err = ctlclient.Exchange(conn, req, timeout, func(line []byte) (bool, error) {
		var r master.CtlReply
		if err := json.Unmarshal(line, &r); err != nil {
			fmt.Fprintln(os.Stderr, "molt ctl: bad reply:", err)
			return false, errBadReply
		}
		switch {
		case r.Status != nil && human:
			printStatus(out, r.Status)
		case r.Status != nil:
			// Raw values, JSON-escaped (jsonSafe: DEL and C1 too).
			b, _ := json.MarshalIndent(r.Status, "", "  ")
			fmt.Fprintln(jsonSafe{out}, string(b))
		case r.Error != "":
			fmt.Fprintln(os.Stderr, "molt ctl:", master.Printable(r.Error))
		case r.Message != "":
			fmt.Fprintln(out, master.Printable(r.Message))
		}
		if r.Done && r.OK {
			result = exitOK
		} else if r.Done {
			result = ctlFailed
		}
		return r.Done, nil
	})
	var sendErr *ctlclient.SendError
	switch {
	case err == nil:
		return result
	case errors.Is(err, errBadReply):
		return ctlFailed
	case errors.As(err, &sendErr):
		fmt.Fprintln(os.Stderr, "molt ctl:", sendErr)
		return ctlNoPeer
	case errors.Is(err, os.ErrDeadlineExceeded):
		fmt.Fprintf(os.Stderr, "molt ctl: no final answer within %v\n", timeout)
		return ctlTimeout
	default:
		fmt.Fprintln(os.Stderr, "molt ctl:", err)
		return ctlFailed
	}
}

// printStatus prints the human form of "molt ctl status". Every text
// in it may come from a worker or a new binary (a STATUS=, an exit or
// failure reason): it is shown Printable, never raw.
func printStatus(out io.Writer, st *master.Status) {
	p := master.Printable
	fmt.Fprintf(out, "master   pid %d  gen %d  %s  (%s)  version %s  up %s\n", st.PID, st.Gen, p(st.State), p(st.Role), p(st.Version), p(st.Uptime))
	for _, l := range st.Listeners {
		var marks []string
		if l.Inherited {
			marks = append(marks, "inherited")
		}
		if l.Activated {
			marks = append(marks, "socket activation")
		}
		inh := ""
		if len(marks) > 0 {
			inh = "  (" + strings.Join(marks, ", ") + ")"
		}
		fmt.Fprintf(out, "listen   %-8s %-5s %s%s\n", p(l.Name), p(l.Network), p(l.Addr), inh)
	}
	if st.Metrics != "" {
		fmt.Fprintf(out, "metrics  http://%s/metrics\n", p(st.Metrics))
	}
	if u := st.Upgrade; u != nil {
		line := fmt.Sprintf("upgrade  in flight for %s: new master pid %d, %d of %d workers ready, serving %v", p(u.Elapsed), u.NewPID, u.Ready, u.Want, u.Serving)
		if u.Preflight != "" {
			line += ", pre-flight " + p(u.Preflight)
		}
		if u.Stage != "" {
			line += ", " + p(u.Stage)
		}
		fmt.Fprintln(out, line)
		if u.Gates != "" {
			fmt.Fprintf(out, "         gates: %s\n", p(u.Gates))
		}
		if len(u.Phases) > 0 {
			fmt.Fprintf(out, "         phases (ms since the signal): %s\n", u.Phases)
		}
	}
	if r := st.LastResult; r != nil {
		line := fmt.Sprintf("last upgrade %s at %s (new master pid %d)", p(r.Outcome), r.At.Format(time.RFC3339), r.NewPID)
		if r.Reason != "" {
			line += ": " + p(r.Reason)
		}
		fmt.Fprintln(out, line)
		if len(r.Phases) > 0 {
			fmt.Fprintf(out, "         phases (ms since the signal): %s\n", r.Phases)
		}
	}
	if st.Resurrections > 0 {
		fmt.Fprintf(out, "resurrections  %d (fresh masters the keeper started); last: %s\n", st.Resurrections, p(st.ResurrectedBecause))
	}
	for _, t := range st.Traffic {
		fmt.Fprintf(out, "traffic  gen %d (%s): %.1f req/s, 5xx %.1f%%, p50 %s, p99 %s over the last %.0f s; %d requests in all\n",
			t.Gen, p(t.Source), t.RPS, 100*t.ErrorShare, fmtMS(t.P50MS), fmtMS(t.P99MS), t.WindowSeconds, t.Requests)
	}
	fmt.Fprintf(out, "workers  %d of %d running  (master fds %d, goroutines %d)\n", len(st.Procs), st.Workers, st.FDs, st.Goroutines)
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  SLOT\tPID\tSTATE\tUPTIME\tRESTARTS\tLAST EXIT\tLAST PING\tSTATUS")
	for _, w := range st.Procs {
		slot := strconv.Itoa(w.Slot)
		if w.Slot < 0 {
			slot = "-"
		}
		ping := "-"
		if w.LastWatchdog != nil {
			ping = time.Since(*w.LastWatchdog).Round(time.Second).String() + " ago"
		}
		state := p(w.State)
		if w.Replacing != 0 {
			state += " (replaces " + strconv.Itoa(w.Replacing) + ")"
		}
		if w.RestartIn != "" {
			state += fmt.Sprintf(" in %s (%d failures in a row)", p(w.RestartIn), w.Failures)
		}
		pid := "-"
		if w.PID != 0 {
			pid = strconv.Itoa(w.PID)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", slot, pid, state, p(w.Uptime), w.Restarts, dash(p(w.LastExit)), ping, dash(p(w.StatusText)))
	}
	tw.Flush()
}

// fmtMS shows a latency in milliseconds, "-" for none.
func fmtMS(ms float64) string {
	if ms <= 0 {
		return "-"
	}
	return strconv.FormatFloat(ms, 'g', 3, 64) + " ms"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
