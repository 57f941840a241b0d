package master

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/molt-server/molt/master/safefile"
	"github.com/molt-server/molt/upgrade"
)

// lockFileName is the name the pid-file lock travels under between
// generations: a passed duplicate shares the flock, so the lock is held
// without a gap from the first master to the last.
const lockFileName = "pidlock"

// start opens everything the master holds. A master with no parent then
// writes its pid file and starts its workers; a new master started by an
// upgrade first reports to the old one and waits for its configuration
// (predecessor.go). On error the caller releases what was opened.
func (m *Master) start() error {
	m.log.Info("master starting", "event", "master.starting", "version", m.cfg.Version, "pid", os.Getpid(), "workers", m.cfg.Workers)
	if err := closeOnExecAll(); err != nil {
		return fmt.Errorf("mark inherited fds close-on-exec: %w", err)
	}
	hand, err := upgrade.New(m.log.Named("upgrade"))
	if errors.Is(err, upgrade.ErrHandoverEnv) {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if err != nil {
		return err
	}
	m.hand = hand
	m.old = upgrade.NewOldSide(upgrade.OldConfig{Pid: os.Getpid(), Preflight: len(m.cfg.Preflight) > 0,
		ManualCommit: m.cfg.ManualCommit, ReadyTimeout: m.cfg.ReadyTimeout, Probation: m.cfg.Probation}, m.log)
	if m.hand.HasParent() {
		m.new = upgrade.NewNewSide(upgrade.NewConfig{Pid: os.Getpid(), Version: m.cfg.Version,
			ManualCommit: m.cfg.ManualCommit, ReadyTimeout: m.cfg.ReadyTimeout, Probation: m.cfg.Probation,
			Gates: m.cfg.Gates, Canary: m.cfg.Canary}, m.log)
	} else {
		m.gen = 1
		m.setLogger(m.log.With("gen", m.gen))
	}
	if err := m.lockPIDFile(); err != nil {
		return err
	}
	var unstored []string // names of sockets back from the fd store that no listener takes
	if m.role() == rolePrimary {
		socks, err := takeActivation()
		if err != nil {
			return fmt.Errorf("%w: %v", ErrConfig, err)
		}
		stored, activated, unused := splitStored(m.cfg.Listeners, socks)
		if m.adopt, err = matchActivated(m.cfg.Listeners, activated); err != nil {
			for _, s := range socks {
				_ = s.file.Close()
			}
			return err
		}
		for name, s := range stored {
			m.adopt[name] = s
		}
		for _, s := range unused {
			m.log.Info("socket from the fd store no longer configured; closed", "event", "listener.store_dropped", "listener", s.name, "addr", s.addr)
			_ = s.file.Close()
			unstored = append(unstored, s.name)
		}
	}
	for _, spec := range m.cfg.Listeners {
		if err := m.openListener(spec); err != nil {
			return err
		}
	}
	if m.role() == rolePrimary {
		m.storeListeners()
		m.unstoreListeners(unstored...)
	}
	if err := m.openMetrics(); err != nil {
		return err
	}
	if m.control, err = openControlSocket(m.cfg.ControlSocket, m.log.Named("control")); err != nil {
		return err
	}
	if m.control.shared != "" && filepath.Dir(m.control.path) != filepath.Dir(m.pidFile.path) {
		m.log.Warn("the control socket's directory can be written by others: the socket is 0600 from its bind, and molt replaces only its own stale socket there",
			"event", "files.shared_dir", "path", m.control.path, "reason", m.control.shared)
	}
	go m.control.serve(m.send, m.done, ctlAllowed(uint32(os.Getuid())))
	if err := m.openNotifyDir(); err != nil {
		return err
	}
	if m.parentR, m.parentW, err = os.Pipe(); err != nil {
		return fmt.Errorf("parent pipe: %w", err)
	}
	if m.devNull, err = os.Open(os.DevNull); err != nil {
		return err
	}
	if m.accept, err = newAcceptTable(); err != nil {
		m.log.Warn("workers will accept unbalanced", "event", "balance.unavailable", "error", err)
	}
	m.shareAcceptTable()
	m.spec = newSpec(m.cfg, m.listeners)
	m.setPhase(phaseStarting, "listeners open")
	m.after(listenerCheckEvery, timerFired{kind: listenerCheck})
	if m.role() == roleNew {
		return m.attachToParent()
	}
	if err := m.pidFile.write(os.Getpid()); err != nil {
		return err
	}
	// A parentless master enables upgrades at once, not when its workers
	// are ready: a generation whose app crash-loops must still accept USR2
	// with a fixed binary (tableflip refuses Upgrade before Ready).
	if err := m.hand.Ready(); err != nil {
		return err
	}
	for i := 0; i < m.cfg.Workers; i++ {
		m.addSlot()
	}
	return nil
}

// lockPIDFile takes the pid-file lock, or, in a new master, the one the
// old master passed (the old master still holds it too).
func (m *Master) lockPIDFile() error {
	if m.role() == roleNew {
		f, err := m.hand.InheritedFile(lockFileName)
		if err != nil {
			return err
		}
		if f == nil {
			return errors.New("the old master passed no pid-file lock")
		}
		m.pidFile = &pidFile{path: m.cfg.PIDFile, lock: f}
		return nil
	}
	pf, err := lockPIDFile(m.cfg.PIDFile)
	if err != nil {
		return err
	}
	m.pidFile = pf
	if d, err := safefile.CheckDir(filepath.Dir(pf.path)); err == nil && d.Shared != "" {
		m.log.Warn("the pid file's directory can be written by others: molt follows no symlink there and uses only its own files",
			"event", "files.shared_dir", "path", pf.path, "reason", d.Shared)
	}
	return m.hand.PassFile(lockFileName, pf.lock)
}

// openListener binds (or inherits) one listener of the configuration.
func (m *Master) openListener(spec ListenSpec) error {
	l, err := m.newListener(spec, m.cfg.SocketMode, m.cfg.Backlog)
	if err != nil {
		return err
	}
	m.listeners = append(m.listeners, l)
	return nil
}

// newListener binds (or inherits) the listener of spec and registers it
// for the next upgrade.
func (m *Master) newListener(spec ListenSpec, mode os.FileMode, backlog int) (*listener, error) {
	open := func() (*os.File, error) { return bind(spec, mode) }
	activated := false
	if s := m.adopt[spec.Name]; s != nil {
		delete(m.adopt, spec.Name)
		open, activated = func() (*os.File, error) { return s.file, nil }, !s.stored
	}
	f, inherited, err := m.hand.Listener(spec.Name, open)
	if err != nil {
		return nil, err
	}
	addr, err := localAddr(f)
	if err == nil && inherited && !specMatches(spec, addr) {
		// The configuration moved this name to another address: the old
		// socket stays with the old generation, this one binds anew.
		m.log.Info("listener moved; binding the new address", "event", "listener.moved", "listener", spec.Name, "inherited_addr", addr, "addr", spec.Address)
		nf, berr := bind(spec, mode)
		if berr != nil {
			_ = f.Close()
			return nil, berr
		}
		if rerr := m.hand.Replace(spec.Name, nf); rerr != nil {
			_ = nf.Close()
			_ = f.Close()
			return nil, rerr
		}
		if m.role() == roleNew {
			m.moved = append(m.moved, inheritedListener(spec.Name, f)) // closed at the commit
			m.unpoll(f)
		} else {
			_ = f.Close()
		}
		f, inherited = nf, false
		addr, err = localAddr(f)
	}
	if err == nil && backlog > 0 {
		err = setBacklog(f, backlog)
	}
	if err == nil {
		// Inherited from a generation with the other mode, or adopted
		// from systemd (adopt made it non-blocking): the mode is this
		// configuration's.
		_, err = setBlocking(f, spec.Blocking)
	}
	if err != nil {
		_ = f.Close()
		return nil, &BindError{Spec: spec, Err: err}
	}
	m.unpoll(f)
	m.log.Info("listening", "event", "listener.listening", "listener", spec.Name, "network", spec.Network, "addr", addr, "inherited", inherited, "activated", activated, "blocking", spec.Blocking)
	return &listener{spec: spec, file: f, addr: addr, inherited: inherited, activated: activated}, nil
}

// shutdown begins a graceful (QUIT) or fast (TERM/INT) stop of this
// master's workers. A fast stop may follow a graceful one, not the other
// way round. The caller has dealt with the other generation.
func (m *Master) shutdown(fast bool) {
	switch {
	case fast && m.phase == phaseStopping, !fast && !m.phase.running():
		return
	}
	if m.role() == roleCommitted {
		// The old generation may still be draining: it must not take the
		// service back when this master exits on purpose.
		m.tellParent(upgrade.Msg{Kind: upgrade.KindStopping})
	}
	if (m.role() == rolePrimary && !m.old.Retiring()) || m.role() == roleCommitted {
		m.tellSupervisor("STOPPING=1", m.supervisorStatus("stopping"))
	}
	if r := m.rl; r != nil {
		m.rl = nil
		for _, l := range r.added {
			m.closeListener(l)
		}
		reloadReply(r, CtlReply{Done: true, Error: "reload abandoned: the master is stopping"})
	}
	if fast {
		m.setPhase(phaseStopping, "fast shutdown")
		m.log.Info("fast shutdown", "event", "master.shutdown", "mode", "fast", "workers", len(m.procs))
		for _, p := range m.procs {
			m.kill(p)
		}
	} else {
		m.setPhase(phaseDraining, "graceful shutdown")
		m.log.Info("graceful shutdown", "event", "master.shutdown", "mode", "graceful", "workers", len(m.procs), "drain_timeout", m.cfg.DrainTimeout.String())
		for _, p := range m.procs {
			m.stopWorker(p)
		}
	}
	m.finishIfIdle()
}

// finishIfIdle ends the master once it is stopping, no worker is left and
// no new master it started is still running.
func (m *Master) finishIfIdle() {
	if m.phase.running() || len(m.procs) > 0 || m.old.InFlight() {
		return
	}
	m.release()
	m.setPhase(phaseStopped, "no worker left")
	m.log.Info("master exited", "event", "master.exited")
}

// ownsFiles reports whether this master is the last generation, which
// removes the unix-socket paths and the pid file when it stops: not a new
// master before its commit (the old one goes on), and not an old master
// whose successor committed (the new one goes on).
func (m *Master) ownsFiles() bool {
	return m.role() != roleNew && !m.old.Retiring()
}

// release closes and removes everything the master holds, in reverse
// order of start. It is safe on a partly started master.
func (m *Master) release() {
	if m.stopSignals != nil {
		m.stopSignals()
	}
	m.cancelPreflight()
	m.closeMetrics()
	m.closeNotifyDir()
	if m.control != nil {
		// Each master removes its own control socket, wherever an upgrade
		// moved it (molt.sock or molt.sock.oldbin); it is never passed on.
		_ = m.control.close()
		if err := safefile.RemoveSocket(m.control.path); err != nil {
			m.log.Warn("control socket not removed", "event", "control.remove_failed", "path", m.control.path, "error", err)
		}
	}
	for _, c := range []*upgrade.Channel{m.children, m.parent} {
		if c != nil {
			_ = c.Close()
		}
	}
	for _, s := range m.adopt {
		_ = s.file.Close() // passed by socket activation, never used
	}
	m.adopt = nil
	for _, l := range m.listeners {
		if l.spec.Network == "unix" && m.ownsFiles() && !l.activated {
			if err := safefile.RemoveSocket(l.spec.Address); err != nil {
				m.log.Warn("unix socket path not removed", "event", "listener.remove_failed", "listener", l.spec.Name, "error", err)
			}
		}
		_ = l.file.Close()
	}
	if m.accept != nil {
		_ = m.accept.f.Close()
	}
	if m.peerAccept != nil {
		_ = m.peerAccept.Close()
	}
	for _, f := range []*os.File{m.parentW, m.parentR, m.devNull} {
		if f != nil {
			_ = f.Close()
		}
	}
	if m.pidFile != nil {
		// Whichever of PATH and PATH.oldbin still names this master.
		for _, path := range []string{m.pidFile.path, m.pidFile.path + oldSuffix} {
			if err := removePIDFile(path, os.Getpid()); err != nil {
				m.log.Warn("pid file not removed", "event", "pidfile.remove_failed", "path", path, "error", err)
			}
		}
		_ = m.pidFile.close()
	}
}
