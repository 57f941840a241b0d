package drill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Faults molt drill can inject into a molt deployment (--fault NAME).
const (
	// KillMaster sends SIGKILL to the primary master: its keeper starts a
	// fresh one with the sockets it holds.
	KillMaster = "kill-master"
	// KillNewMaster upgrades (molt ctl upgrade --wait), waits for the old
	// master to exit, then sends SIGKILL to the new one: before it served
	// --stable-after, its keeper brings back the release before it.
	KillNewMaster = "kill-new-master"
)

// FaultNames are the faults, for usage messages.
var FaultNames = []string{KillMaster, KillNewMaster}

// faultPoll is how often a fault polls molt ctl status while it waits.
const faultPoll = 50 * time.Millisecond

// Fault injects one fault into the molt whose pid file is PIDFile,
// through the molt binary at Molt: it finds the master and its keeper
// with "molt ctl status --json", kills the master, and waits until a
// master with another pid serves with all its workers ready. It needs
// molt's keeper: without it nothing starts a master again.
type Fault struct {
	Name, Molt, PIDFile string
	// Timeout bounds the wait for the new master (default triggerTimeout).
	Timeout time.Duration

	result *FaultResult
}

// FaultResult is what a fault did and what came of it.
type FaultResult struct {
	Name string `json:"name"`
	// Killed is the master the fault killed, Back the one that serves
	// afterwards (a fresh master the keeper started); their versions.
	KilledPID     int    `json:"killed_master_pid"`
	KilledVersion string `json:"killed_version"`
	BackPID       int    `json:"new_master_pid"`
	BackVersion   string `json:"new_version"`
	// UpgradedFrom is, for kill-new-master, the master the upgrade
	// replaced (the killed one's predecessor).
	UpgradedFrom int `json:"upgraded_from_pid,omitempty"`
	// KeeperPID is the keeper before the fault; KeeperKept: the same
	// keeper is alive and the new master names it.
	KeeperPID  int  `json:"keeper_pid"`
	KeeperKept bool `json:"keeper_kept"`
	// Resurrections is the new master's count (molt ctl status).
	Resurrections      int    `json:"resurrections"`
	ResurrectedBecause string `json:"resurrected_because,omitempty"`
	// BackMs: from the kill until molt ctl status showed the new master
	// serving with every worker ready.
	BackMs float64 `json:"back_ms"`

	killedAt time.Time
}

// Version is v for a report: printable, and "?" when unknown.
func (r *FaultResult) Version(v string) string {
	if v == "" {
		return "?"
	}
	return strconv.QuoteToGraphic(v)
}

func (f *Fault) String() string {
	return "fault " + f.Name + " (molt ctl --pid-file " + f.PIDFile + ")"
}

// faultStatus is what a fault reads of molt ctl status --json.
type faultStatus struct {
	PID                int    `json:"pid"`
	Version            string `json:"version"`
	State              string `json:"state"`
	Keeper             int    `json:"keeper_pid"`
	Workers            int    `json:"workers"`
	Resurrections      int    `json:"resurrections"`
	ResurrectedBecause string `json:"resurrected_because"`
	Procs              []struct {
		Slot  int  `json:"slot"`
		Ready bool `json:"ready"`
	} `json:"procs"`
}

// serving: the master serves with a ready worker in every slot.
func (s faultStatus) serving() bool {
	ready := 0
	for _, p := range s.Procs {
		if p.Ready && p.Slot >= 0 {
			ready++
		}
	}
	return s.State == "serving" && ready >= s.Workers
}

func (f *Fault) status(ctx context.Context) (faultStatus, error) {
	var st faultStatus
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, f.Molt, "ctl", "--pid-file", f.PIDFile, "--timeout", "5s", "status", "--json").Output()
	if err != nil {
		return st, fmt.Errorf("molt ctl --pid-file %s status: %w", f.PIDFile, err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("molt ctl --pid-file %s status: %w", f.PIDFile, err)
	}
	return st, nil
}

// Check refuses a fault the deployment cannot come back from: no master
// answers, or it runs without a keeper (--no-keeper), where nothing
// starts a master again (systemd's Restart= does, dropping connections).
func (f *Fault) Check(ctx context.Context) error {
	switch f.Name {
	case KillMaster, KillNewMaster:
	default:
		return fmt.Errorf("unknown fault %q: want one of %s", f.Name, strings.Join(FaultNames, ", "))
	}
	st, err := f.status(ctx)
	if err != nil {
		return err
	}
	if st.Keeper <= 0 {
		return fmt.Errorf("--fault %s: master %d runs without molt's keeper (--no-keeper): nothing would start a master again; run molt with its keeper to drill this", f.Name, st.PID)
	}
	if !alive(st.Keeper) {
		return fmt.Errorf("--fault %s: master %d's keeper %d is gone", f.Name, st.PID, st.Keeper)
	}
	return nil
}

// Result is what the last Fire did (nil before one).
func (f *Fault) Result() *FaultResult { return f.result }

// Fire injects the fault and waits for the new master.
func (f *Fault) Fire(ctx context.Context) error {
	res := &FaultResult{Name: f.Name}
	f.result = res
	st, err := f.status(ctx)
	if err != nil {
		return err
	}
	if st.Keeper <= 0 {
		return fmt.Errorf("master %d runs without molt's keeper", st.PID)
	}
	res.KeeperPID = st.Keeper
	if f.Name == KillNewMaster {
		res.UpgradedFrom = st.PID
		if err := run(ctx, f.Molt, "ctl", "--pid-file", f.PIDFile, "--timeout", triggerTimeout.String(), "upgrade", "--wait"); err != nil {
			return fmt.Errorf("upgrade: %w", err)
		}
		if st, err = f.status(ctx); err != nil {
			return err
		}
		if st.PID == res.UpgradedFrom {
			return fmt.Errorf("upgrade: master %d still primary after its commit", st.PID)
		}
		if err := f.waitFor(ctx, fmt.Sprintf("the old master %d to exit", res.UpgradedFrom), func() bool { return !alive(res.UpgradedFrom) }); err != nil {
			return err
		}
	}
	res.KilledPID, res.KilledVersion = st.PID, st.Version
	res.killedAt = time.Now()
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill -KILL %d: %w", st.PID, err)
	}
	var back faultStatus
	err = f.waitFor(ctx, fmt.Sprintf("a master other than %d serving with every worker ready", st.PID), func() bool {
		s, err := f.status(ctx)
		if err != nil || s.PID == st.PID || !s.serving() {
			return false
		}
		back = s
		return true
	})
	res.BackMs = ms(time.Since(res.killedAt))
	if err != nil {
		return err
	}
	res.BackPID, res.BackVersion = back.PID, back.Version
	res.Resurrections, res.ResurrectedBecause = back.Resurrections, back.ResurrectedBecause
	res.KeeperKept = back.Keeper == res.KeeperPID && alive(res.KeeperPID)
	if !res.KeeperKept {
		return fmt.Errorf("the keeper changed: %d before, %d after (alive: %v)", res.KeeperPID, back.Keeper, alive(res.KeeperPID))
	}
	return nil
}

// waitFor polls cond until it holds, ctx ends or the timeout passes.
func (f *Fault) waitFor(ctx context.Context, what string, cond func() bool) error {
	timeout := f.Timeout
	if timeout <= 0 {
		timeout = triggerTimeout
	}
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("no %s within %v", what, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(faultPoll):
		}
	}
	return nil
}

// alive reports whether process pid exists.
func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
