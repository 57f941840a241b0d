package master

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/master/internal/procfs"
	"github.com/molt-server/molt/upgrade"
)

// The old master's side of an upgrade (DESIGN §4): USR2 starts a new
// master through tableflip; the new one reports over the channel; its
// commit makes Upgrade return nil and this master retire; any failure
// makes it return an error and this master roll back, having served
// throughout.

// Settings of the old master's side.
const (
	// quitSettle is how long a QUIT to a lone master waits for a USR2 that
	// arrives as a delivery of its own (kill -USR2; kill -QUIT): with one,
	// the QUIT means "upgrade, then retire", never a total outage.
	quitSettle = time.Second
	// upgradeSlack is added to the new master's deadlines for its own
	// start-up and for the commit round trip.
	upgradeSlack = 5 * time.Second
)

// oldSide is the old master's state of an upgrade.
type oldSide struct {
	children *upgrade.Channel // this master's end towards new masters
	up       *attempt         // the upgrade in flight, nil if none
	standby  bool             // WINCH stopped this master's workers
	settling bool             // a QUIT waits out quitSettle
	retiring bool             // a new generation committed: drain and exit
	// successor is the committed new master while this one drains: if it
	// dies before this one has exited, this one takes the service back
	// (onSuccessorExited), unless it stops on purpose (noTakeBack).
	successor  int
	noTakeBack bool
	tookBack   bool           // this master took the service back: tableflip allows it no second upgrade
	last       *UpgradeResult // how the last upgrade ended
	// watchers are "molt ctl upgrade --wait" connections: they get every
	// step, and a final reply when the upgrade ends.
	watchers []chan CtlReply
}

// attempt is one upgrade in flight.
type attempt struct {
	started     time.Time
	pid         int   // the new master's pid, once known
	pgids       []int // its workers' process groups, as it reported them
	serving     bool
	ready, want int          // its workers ready, of how many
	failed      *upgrade.Msg // its failure report, if it sent one
	releaseSent bool
	quitPending bool // a QUIT waits for the new generation to serve
	preflight   bool // the new binary's pre-flight run is under way
	seq         int  // of the current deadline
	killed      bool
}

// onUSR2 starts an upgrade if this master may. It returns why not, or
// nil when the upgrade started (or was deferred).
func (m *Master) onUSR2(quitPending bool) error {
	refuse := func(why string) error {
		m.log.Warn("USR2 refused: "+why, "signal", "SIGUSR2", "role", m.role.String())
		return errors.New(why)
	}
	switch {
	case m.role == roleNew:
		return refuse("this master's own upgrade is not committed yet; send USR2 once it is primary")
	case m.old.tookBack:
		return refuse("this master took the service back after its successor died; tableflip allows one upgrade per process: restart molt to upgrade")
	case m.role == roleCommitted:
		// tableflip refuses while the parent lives; the parent's drain is
		// bounded by the drain timeout, so wait for it rather than refuse
		// an operator whose script sends USR2 right after a takeover.
		m.new.deferredUSR2 = true
		m.log.Info("USR2 deferred: the old generation is still draining; the upgrade starts once it has exited")
		m.tellWatchers("deferred: the upgrade starts once the old generation has exited")
		return nil
	case m.old.up != nil:
		return refuse(fmt.Sprintf("an upgrade is already in flight (new master pid %d)", m.old.up.pid))
	case m.rl != nil:
		return refuse("a reload is in flight; upgrade once it has ended")
	case !m.phase.running():
		return refuse("the master is shutting down")
	}
	if m.old.settling {
		m.old.settling = false
		quitPending = true
	}
	m.old.up = &attempt{started: time.Now(), quitPending: quitPending, preflight: len(m.cfg.Preflight) > 0}
	if !m.old.up.preflight {
		m.startUpgrade()
		return nil
	}
	// The cheapest rollback is the one never needed: run the new binary
	// once, bounded, before anything changes.
	path, args := os.Args[0], m.cfg.Preflight
	m.log.Info("upgrade: pre-flight check of the new binary", "path", path, "args", strings.Join(args, " "))
	m.tellWatchers("pre-flight: " + path + " " + strings.Join(args, " "))
	go func() {
		out, err := runPreflight(path, args)
		m.send(preflightDone{out: out, err: err})
	}()
	return nil
}

// preflightTimeout bounds the pre-flight run of a new binary.
const preflightTimeout = 10 * time.Second

// runPreflight runs the binary at path (resolved now, as tableflip will)
// with args and returns its trimmed output; an error says what failed.
func runPreflight(path string, args []string) (string, error) {
	resolved, err := exec.LookPath(path)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), preflightTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, resolved, args...)
	// Its own process group, killed whole at the timeout: a script that
	// left a child behind must not hold the output pipe open forever.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	text := strings.TrimSpace(string(out))
	if len(text) > 300 {
		text = text[:300] + "..."
	}
	if ctx.Err() != nil {
		return text, fmt.Errorf("%s %s did not finish within %v", path, strings.Join(args, " "), preflightTimeout)
	}
	if err != nil {
		return text, fmt.Errorf("%s %s: %v: %s", path, strings.Join(args, " "), err, text)
	}
	return text, nil
}

// onPreflightDone starts the upgrade whose pre-flight passed, or refuses it.
func (m *Master) onPreflightDone(ev preflightDone) {
	up := m.old.up
	if up == nil || !up.preflight {
		return
	}
	up.preflight = false
	if ev.err != nil || !m.phase.running() {
		m.old.up = nil
		reason := "the master is stopping"
		if ev.err != nil {
			reason = "the new binary failed its pre-flight check: " + ev.err.Error()
		}
		m.old.last = &UpgradeResult{Outcome: "refused", Reason: reason, At: time.Now()}
		m.log.Error("upgrade refused; nothing changed: this generation keeps serving", "event", "upgrade.refused", "reason", reason)
		m.endWatchers(CtlReply{Done: true, Error: "upgrade refused: " + reason})
		if up.quitPending && m.phase.running() {
			m.log.Error("QUIT cancelled: the upgrade it waited for failed; send QUIT again to stop this generation")
		}
		m.finishIfIdle()
		return
	}
	m.log.Info("pre-flight passed", "output", ev.out)
	m.startUpgrade()
}

// startUpgrade moves the pid file and control socket aside and starts the
// new master through tableflip.
func (m *Master) startUpgrade() {
	up := m.old.up
	abort := func(what string, err error) {
		m.old.up = nil
		m.log.Error("upgrade not started: "+what, "error", err)
		m.endWatchers(CtlReply{Done: true, Error: "upgrade not started: " + what + ": " + err.Error()})
	}
	if _, err := m.childChannel(); err != nil {
		abort("no channel to the new master", err)
		return
	}
	if missing, err := m.pidFile.toOld(os.Getpid()); err != nil {
		abort("the pid file cannot be renamed", err)
		return
	} else if missing {
		m.log.Warn("pid file missing at upgrade (deleted?): wrote its .oldbin afresh; the upgrade goes on",
			"event", "pidfile.missing", "path", m.pidFile.path, "pid_file", m.pidFile.path+oldSuffix)
	}
	if m.control != nil {
		if err := m.control.toOld(); err != nil {
			m.log.Warn("control socket not renamed; the new master's will fail", "error", err)
		}
	}
	m.supervisorReloading("upgrading: starting " + os.Args[0])
	m.armUpgradeDeadline(m.cfg.ReadyTimeout + upgradeSlack)
	m.log.Info("upgrade started", "path", os.Args[0], "quit_pending", up.quitPending,
		"pid_file", m.pidFile.path+oldSuffix)
	m.tellWatchers("upgrade started: " + os.Args[0])
	go func() { m.send(upgradeDone{m.hand.Upgrade()}) }()
}

// configMsg is the configuration a new master gets from this one.
func (m *Master) configMsg() upgrade.Msg {
	msg := upgrade.Msg{Kind: upgrade.KindConfig, Workers: len(m.slots), Gen: m.gen + 1, Pid: os.Getpid()}
	for _, l := range m.listeners {
		msg.Names = append(msg.Names, l.spec.Name)
		if l.activated {
			msg.Activated = append(msg.Activated, l.spec.Name)
		}
	}
	return msg
}

// childChannel returns this master's end of the channel to new masters,
// with its reader running.
func (m *Master) childChannel() (*upgrade.Channel, error) {
	if m.old.children != nil {
		return m.old.children, nil
	}
	ch, err := m.hand.Children()
	if err != nil {
		return nil, err
	}
	m.old.children = ch
	go func() {
		for {
			msg, err := ch.Recv()
			// EOF: no process holds the other end any more. tableflip
			// drops its copy at a commit, so a committed new master that
			// exits leaves none; no new master can come after a commit.
			if errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) {
				return
			}
			if !m.send(fromChild{msg: msg, err: err}) {
				return
			}
		}
	}()
	return ch, nil
}

// armUpgradeDeadline (re)arms the deadline of the attempt in flight; a
// zero d only voids the current one.
func (m *Master) armUpgradeDeadline(d time.Duration) {
	up := m.old.up
	up.seq = m.nextSeq()
	if d > 0 {
		m.after(d, timerFired{kind: upgradeDeadline, seq: up.seq})
	}
}

// tellChild sends a message to the new master in flight.
func (m *Master) tellChild(msg upgrade.Msg) {
	if m.old.up == nil || m.old.children == nil {
		return
	}
	msg.To = m.old.up.pid
	if err := m.old.children.Send(msg); err != nil {
		m.log.Warn("message to the new master not sent", "kind", msg.Kind, "error", err)
	}
}

// onChildMsg follows the new master's reports.
func (m *Master) onChildMsg(ev fromChild) {
	if ev.err != nil {
		m.log.Warn("bad message from a new master; ignored", "error", ev.err)
		return
	}
	up, msg := m.old.up, ev.msg
	if up == nil {
		if msg.Kind == upgrade.KindStopping && msg.Pid != 0 && msg.Pid == m.old.successor && !m.old.noTakeBack {
			m.old.noTakeBack = true
			m.log.Info("the new master stops on purpose; this generation will not take the service back", "new_pid", msg.Pid)
		}
		return // from an attempt that has ended
	}
	if msg.Kind == upgrade.KindHello && up.pid == 0 {
		// A hello still queued from an attempt that died must not be
		// taken for this one's: the sender must be a child of ours.
		if ppid, _, _ := procfs.Parent(msg.Pid); ppid != os.Getpid() {
			m.log.Debug("hello from a process that is no child of this master; ignored", "pid", msg.Pid)
			return
		}
		up.pid = msg.Pid
		m.log.Info("new master started", "new_pid", msg.Pid, "version", msg.Version)
		m.tellWatchers(fmt.Sprintf("new master started: pid %d, version %s", msg.Pid, msg.Version))
		m.tellChild(m.configMsg())
		return
	}
	if msg.Pid != up.pid {
		return // from an earlier attempt
	}
	log := m.log.With("new_pid", up.pid)
	switch msg.Kind {
	case upgrade.KindWorkers:
		up.pgids = msg.PGIDs
	case upgrade.KindProgress:
		up.ready, up.want = msg.Ready, msg.Workers
		log.Info("new generation: workers ready", "ready", msg.Ready, "want", msg.Workers)
		m.tellWatchers(fmt.Sprintf("new generation: %d of %d workers ready", msg.Ready, msg.Workers))
	case upgrade.KindServing:
		up.serving = true
		if m.cfg.ManualCommit {
			m.armUpgradeDeadline(0)
			log.Info("new generation serving; both generations serve until QUIT to the old master (commit) or to the new one (rollback)",
				"workers", msg.Workers)
			// A deploy script waits no longer: the commit is the operator's.
			m.endWatchers(CtlReply{OK: true, Done: true, Message: fmt.Sprintf(
				"new generation serving (pid %d); manual commit: QUIT to the old master (pid %d) commits, QUIT to the new one rolls back", up.pid, os.Getpid())})
		} else {
			m.armUpgradeDeadline(m.cfg.Probation + upgradeSlack)
			log.Info("new generation serving; probation", "workers", msg.Workers, "probation", m.cfg.Probation.String())
			m.tellWatchers(fmt.Sprintf("new generation serving; probation %v", m.cfg.Probation))
		}
		if up.quitPending {
			log.Info("QUIT pending: asking the new generation to commit now")
			m.tellChild(upgrade.Msg{Kind: upgrade.KindCommit})
		}
	case upgrade.KindCommitted:
		log.Info("new generation committed")
	case upgrade.KindFailed:
		up.failed = &msg
		log.Error("new generation gave up", "code", msg.Code, "reason", msg.Reason)
		m.resumeServing()
	case upgrade.KindStop:
		log.Info("the new master was told to stop fast; stopping this generation too")
		m.shutdown(true)
	default:
		log.Debug("unknown message from the new master; ignored", "kind", msg.Kind)
	}
}

// resumeServing makes this master serve again after a failed upgrade:
// workers a WINCH stopped are respawned, and the new master is released
// once they are all ready (it keeps serving until then: no gap).
func (m *Master) resumeServing() {
	if m.old.standby {
		m.old.standby = false
		m.log.Info("respawning this generation's workers (it was in standby)")
		m.phase = phaseStarting
		for _, s := range m.slots {
			// A worker the standby stopped may not have exited yet: its
			// slot is refilled now, and its exit is not a failure.
			if p := m.procs[s.pid]; p != nil && p.state == workerStopping {
				s.pid = 0
			}
			if s.pid == 0 {
				m.spawn(s)
			}
		}
	}
	m.releaseIfServing()
}

// releaseIfServing tells a failed new master to go once this generation
// serves on its own.
func (m *Master) releaseIfServing() {
	up := m.old.up
	if up == nil || up.failed == nil || up.releaseSent || m.old.standby || !m.allReady() {
		return
	}
	up.releaseSent = true
	m.tellChild(upgrade.Msg{Kind: upgrade.KindRelease})
}

// onUpgradeDone is the end of an upgrade: commit (nil) or rollback.
func (m *Master) onUpgradeDone(ev upgradeDone) {
	up := m.old.up
	m.old.up = nil
	if up == nil {
		return
	}
	if ev.err == nil {
		m.old.retiring = true
		m.old.last = &UpgradeResult{Outcome: "committed", NewPID: up.pid, At: time.Now()}
		m.log.Info("upgrade committed; this generation retires", "new_pid", up.pid,
			"elapsed", time.Since(up.started).Round(time.Millisecond).String())
		m.endWatchers(CtlReply{OK: true, Done: true, Message: fmt.Sprintf("committed: the new master (pid %d) serves; this one retires", up.pid)})
		if m.phase.running() {
			m.shutdown(false)
			m.watchSuccessor(up.pid)
		}
		m.finishIfIdle()
		return
	}
	reason := m.failureReason(up, ev.err)
	m.old.last = &UpgradeResult{Outcome: "rolled back", Reason: reason, NewPID: up.pid, At: time.Now()}
	m.restorePIDFile()
	if m.control != nil {
		if err := m.control.fromOld(); err != nil {
			m.log.Error("control socket not restored", "error", err)
		}
	}
	m.endWatchers(CtlReply{Done: true, Error: "rolled back: " + reason})
	if !m.phase.running() {
		// Both generations are stopping (TERM/INT): the end is expected.
		m.log.Info("the new master has stopped too", "new_pid", up.pid, "reason", reason)
		m.finishIfIdle()
		return
	}
	m.log.Error("upgrade failed; rolled back: this generation keeps serving", "event", "upgrade.rolled_back", "new_pid", up.pid, "reason", reason)
	m.supervisorReady("serving, %d workers; upgrade rolled back: %s", len(m.slots), reason)
	if up.quitPending {
		m.log.Error("QUIT cancelled: the upgrade it waited for failed; send QUIT again to stop this generation")
	}
	m.resumeServing()
}

// failureReason explains why an attempt failed, from the new master's own
// report if it sent one, else from its exit status.
func (m *Master) failureReason(up *attempt, err error) string {
	if up.failed != nil {
		return up.failed.Reason
	}
	if up.killed {
		return fmt.Sprintf("the new master did not serve in time and was killed (%v)", err)
	}
	// tableflip's words: "can't start child: ...", "child pid=N exited",
	// "child pid=N exited: exit status 3", "... exited: signal: killed".
	msg := err.Error()
	switch {
	case strings.Contains(msg, "can't start child"):
		return "the new binary could not be started: " + msg
	case strings.HasSuffix(msg, "exited"):
		return "the new master exited with status 0 before its commit"
	}
	if i := strings.LastIndex(msg, "exit status "); i >= 0 {
		if code, cerr := strconv.Atoi(msg[i+len("exit status "):]); cerr == nil {
			if why, ok := exitReasons[code]; ok {
				return fmt.Sprintf("%s (exit status %d)", why, code)
			}
			return fmt.Sprintf("the new master exited with status %d before its commit", code)
		}
	}
	if i := strings.LastIndex(msg, "signal: "); i >= 0 {
		return "the new master was killed by " + msg[i:] + " before its commit"
	}
	return msg
}

// onUpgradeDeadline kills a new master that did not serve (or commit) in
// time, and every worker it reported.
func (m *Master) onUpgradeDeadline(ev timerFired) {
	up := m.old.up
	if up == nil || ev.seq != up.seq {
		return
	}
	pid := up.pid
	if pid == 0 {
		pid = m.findNewMaster()
	}
	m.log.Error("the new master did not serve in time; killing it and its workers",
		"event", "upgrade.deadline", "new_pid", pid, "workers", len(up.pgids),
		"elapsed", time.Since(up.started).Round(time.Millisecond).String())
	up.killed = true
	// This master's own workers are never touched, whatever the new
	// master reported (treekill.go). The walk polls /proc for up to a few
	// seconds: off the loop, which goes on serving meanwhile.
	own := map[int]bool{}
	for p := range m.procs {
		own[p] = true
	}
	pgids, log := append([]int(nil), up.pgids...), m.log
	go func() {
		killed := killTree(pid, pgids, func(p int) bool { return own[p] })
		log.Info("the failed new master's processes killed", "event", "upgrade.tree_killed",
			"new_pid", pid, "killed", len(killed), "pids", fmt.Sprint(killed))
	}()
}

// findNewMaster finds the pid of a new master that never said hello: the
// one child of this master that is not one of its workers.
func (m *Master) findNewMaster() int {
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && m.procs[pid] == nil {
				return pid
			}
		}
	}
	return 0
}

// tellWatchers sends a progress line to every "upgrade --wait" client.
func (m *Master) tellWatchers(msg string) {
	for _, w := range m.old.watchers {
		select {
		case w <- CtlReply{OK: true, Message: msg}:
		default: // a client that does not read loses lines, never the loop
		}
	}
}

// endWatchers sends the final reply to every watcher and forgets them.
func (m *Master) endWatchers(final CtlReply) {
	for _, w := range m.old.watchers {
		select {
		case w <- final:
		default:
		}
	}
	m.old.watchers = nil
}

// watchSuccessor follows the committed new master while this one drains
// (DESIGN §4's residual hole: it may die after its commit).
func (m *Master) watchSuccessor(pid int) {
	if pid <= 0 {
		return
	}
	m.old.successor, m.old.noTakeBack = pid, false
	if !m.watchExit(pid, successorExited{pid: pid}) {
		m.log.Warn("the new master cannot be watched: should it die while this generation drains, nothing takes the service back", "new_pid", pid)
	}
}

// successorExited reports that the committed new master has exited.
type successorExited struct{ pid int }

func (e successorExited) String() string { return fmt.Sprintf("new master %d exited", e.pid) }

// onSuccessorExited takes the service back if the committed new master
// died while this generation still drains: this master still holds the
// listening sockets, so it starts fresh workers of its own (the draining
// ones go on draining), moves the pid file and control socket back, and
// serves. It cannot start another upgrade (tableflip allows one per
// process), so it says to restart molt. A new master that said it stops
// on purpose, or a QUIT or TERM to this one, leaves the drain alone.
func (m *Master) onSuccessorExited(ev successorExited) {
	if ev.pid != m.old.successor {
		return
	}
	m.old.successor = 0
	switch {
	case !m.old.retiring || m.phase != phaseDraining:
		return
	case m.old.noTakeBack:
		m.log.Info("the new master has exited; this generation goes on draining", "new_pid", ev.pid)
		return
	}
	m.old.retiring, m.old.tookBack = false, true
	m.old.last = &UpgradeResult{Outcome: "taken back", Reason: fmt.Sprintf("the new master (pid %d) died after its commit", ev.pid), NewPID: ev.pid, At: time.Now()}
	m.log.Error("the new master died after its commit while this generation drained; this master takes the service back with new workers. "+
		"It cannot start another upgrade: restart molt to deploy again", "new_pid", ev.pid, "workers", len(m.slots))
	m.restorePIDFile()
	if m.control != nil {
		if err := m.control.fromOld(); err != nil {
			m.log.Error("control socket not restored", "error", err)
		}
	}
	m.phase = phaseStarting
	for _, s := range m.slots {
		// The draining worker of a slot is no longer its worker: its exit
		// is not a failure, and the slot is refilled now.
		if p := m.procs[s.pid]; p == nil || p.state == workerStopping {
			s.pid = 0
		}
		s.successor, s.restartAt = 0, time.Time{}
		s.seq = m.nextSeq() // voids a respawn timer armed before the commit
		s.backoff = backoff{}
		if s.pid == 0 && !s.removed {
			m.spawn(s)
		}
	}
}
