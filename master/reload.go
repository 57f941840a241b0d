package master

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/molt-server/molt/master/safefile"
	"github.com/molt-server/molt/upgrade"
)

// A reload (HUP, molt ctl reload) replaces the workers within the same
// master, generation-style: the new configuration is validated, new
// listeners are bound, new workers start with the new settings and only
// once every one of them is ready do the old ones drain; dropped
// listeners then stop listening. If a new worker is not ready in time or
// exits first, the new workers are stopped and the old ones go on under
// the old configuration (nginx's rule). Kept listeners never stop
// listening.

// reload is a reload in flight.
type reload struct {
	cfg       Config
	spec      *workerSpec
	slots     []*slot
	listeners []*listener // the new configuration's, in its order
	added     []*listener // bound for it
	dropped   []*listener // the current ones it no longer has
	switched  []*listener // kept ones whose blocking mode it switched
	started   time.Time
	seq       int
	watchers  []chan CtlReply
}

// onReload starts a reload; it returns why it did not. watcher, if not
// nil, gets the final reply (molt ctl reload --wait).
func (m *Master) onReload(watcher chan CtlReply) error {
	refuse := func(why string) error {
		m.log.Warn("reload refused: "+why, "event", "reload.refused", "reason", why, "role", m.role().String())
		return errors.New(why)
	}
	switch {
	case m.old.Standby():
		return m.toOld(upgrade.SigHUP{}) // HUP to a standby old master: the manual rollback step
	case m.role() != rolePrimary || m.old.InFlight():
		return refuse("an upgrade is in flight; reload once it has ended")
	case m.rl != nil:
		return refuse("a reload is already in flight")
	case !m.phase.running():
		return refuse("the master is shutting down")
	}
	cfg, err := m.reloadedConfig()
	if err != nil {
		m.log.Error("reload refused: the configuration is invalid; the running one stays", "event", "reload.refused", "reason", "invalid configuration", "error", err)
		return err
	}
	r := &reload{cfg: cfg, started: time.Now(), seq: m.nextSeq()}
	if err := m.planListeners(r); err != nil {
		m.log.Error("reload refused: the listeners cannot change so; nothing changed", "event", "reload.refused", "reason", "listeners", "error", err)
		return err
	}
	if watcher != nil {
		r.watchers = append(r.watchers, watcher)
	}
	r.spec = newSpec(cfg, r.listeners)
	n := len(m.slots) // TTIN/TTOU and scale survive a reload...
	if cfg.Workers != m.cfg.Workers {
		n = cfg.Workers // ...unless the configuration changed the count
	}
	m.rl = r
	m.supervisorReloading("reloading")
	m.log.Info("reload started", "event", "reload.started", "workers", n, "listeners_added", len(r.added), "listeners_dropped", len(r.dropped))
	for i := 0; i < n; i++ {
		s := &slot{n: i, spec: r.spec, pending: true}
		r.slots = append(r.slots, s)
		m.spawn(s)
	}
	m.after(r.spec.readyTimeout, timerFired{kind: reloadDeadline, seq: r.seq})
	return nil
}

// reloadedConfig reads the configuration anew (Config.Reload) and keeps
// what a reload cannot change from the running one.
func (m *Master) reloadedConfig() (Config, error) {
	cfg := m.cfg
	if m.cfg.Reload != nil {
		var err error
		if cfg, err = m.cfg.Reload(); err != nil {
			return Config{}, err
		}
	}
	cfg.PIDFile, cfg.ControlSocket, cfg.Logger, cfg.Output, cfg.Version, cfg.Reload =
		m.cfg.PIDFile, m.cfg.ControlSocket, m.cfg.Logger, m.cfg.Output, m.cfg.Version, m.cfg.Reload
	cfg = cfg.withDefaults()
	return cfg, cfg.validate()
}

// planListeners sorts the new configuration's listeners into kept, added
// (bound now, before any worker changes) and dropped. On error every
// listener it bound is closed again.
func (m *Master) planListeners(r *reload) error {
	keep := map[*listener]bool{}
	var switched []*listener // kept listeners whose ",blocking" option changed
	for _, spec := range r.cfg.Listeners {
		if l := m.listenerFor(spec); l != nil {
			keep[l] = true
			r.listeners = append(r.listeners, l)
			if r.cfg.Backlog > 0 && r.cfg.Backlog != m.cfg.Backlog {
				if err := setBacklog(l.file, r.cfg.Backlog); err != nil {
					m.log.Warn("backlog not changed", "event", "listener.backlog_failed", "listener", spec.Name, "error", err)
				}
			}
			if spec.Blocking != l.spec.Blocking {
				switched = append(switched, l)
			}
			continue
		}
		l, err := m.newListener(spec, r.cfg.SocketMode, r.cfg.Backlog)
		if err != nil {
			for _, a := range r.added {
				m.closeListener(a)
			}
			return err
		}
		r.added = append(r.added, l)
		r.listeners = append(r.listeners, l)
	}
	for _, l := range m.listeners {
		if !keep[l] {
			r.dropped = append(r.dropped, l)
		}
	}
	for _, l := range r.dropped {
		if l.activated {
			for _, a := range r.added {
				m.closeListener(a)
			}
			return activatedDropped(l)
		}
	}
	// The mode is the socket's: it changes before the new workers start
	// (a worker may refuse the other mode), for the old ones too, and a
	// failed reload switches it back (failReload).
	for _, l := range switched {
		if m.switchMode(l) {
			r.switched = append(r.switched, l)
		}
	}
	return nil
}

// activatedDropped is the refusal of a reload or upgrade whose
// configuration drops or moves a socket passed by socket activation: its
// owner (systemd's socket unit) would go on queueing connections on it.
func activatedDropped(l *listener) error {
	return fmt.Errorf("listener %s (%s) came from socket activation; a reload or upgrade cannot drop or move it: change the socket unit and restart the service, or keep the listener", l.spec.Name, l.addr)
}

// listenerFor returns the open listener with spec's name and address.
func (m *Master) listenerFor(spec ListenSpec) *listener {
	for _, l := range m.listeners {
		if l.spec.Name == spec.Name && l.spec.Network == spec.Network && l.spec.Address == spec.Address {
			return l
		}
	}
	return nil
}

// onReloadWorkerReady finishes the reload once all its workers are ready.
func (m *Master) onReloadWorkerReady() {
	r := m.rl
	if r == nil {
		return
	}
	for _, s := range r.slots {
		if p := m.procs[s.pid]; p == nil || p.state != workerReady {
			return
		}
	}
	m.rl = nil
	for _, s := range m.slots {
		m.retireSlot(s)
	}
	for _, s := range r.slots {
		s.pending = false
	}
	m.slots, m.spec, m.listeners = r.slots, r.spec, r.listeners
	m.cfg = r.cfg
	for _, l := range r.dropped {
		m.closeListener(l)
	}
	m.supervisorReady("serving, %d workers; reloaded", len(m.slots))
	dropped := make([]string, 0, len(r.dropped))
	for _, l := range r.dropped {
		dropped = append(dropped, l.spec.Name)
	}
	m.unstoreListeners(dropped...)
	m.log.Info("reload done: new workers serve, the old ones drain", "event", "reload.done", "workers", len(m.slots),
		"elapsed", time.Since(r.started).Round(time.Millisecond).String())
	reloadReply(r, CtlReply{OK: true, Done: true, Message: fmt.Sprintf("reloaded: %d new workers serve", len(m.slots))})
}

// failReload stops the new workers; the old ones go on unchanged.
func (m *Master) failReload(reason string) {
	r := m.rl
	if r == nil {
		return
	}
	m.rl = nil
	for _, s := range r.slots {
		m.retireSlot(s)
	}
	for _, l := range r.added {
		m.closeListener(l)
	}
	for _, l := range r.switched {
		m.switchMode(l)
	}
	m.log.Error("reload failed; the old workers keep serving under the old configuration", "event", "reload.failed", "reason", reason)
	m.supervisorReady("serving, %d workers; reload failed: %s", len(m.slots), reason)
	reloadReply(r, CtlReply{Done: true, Error: "reload failed: " + reason})
}

// switchMode switches the kept listener l to the other blocking mode
// (ListenSpec.Blocking), socket and spec; it reports whether it did.
func (m *Master) switchMode(l *listener) bool {
	want := !l.spec.Blocking
	if _, err := setBlocking(l.file, want); err != nil {
		m.log.Warn("blocking mode not changed", "event", "listener.mode_failed", "listener", l.spec.Name, "blocking", want, "error", err)
		return false
	}
	l.spec.Blocking = want
	m.log.Info("listener mode changed", "event", "listener.mode_changed", "listener", l.spec.Name, "blocking", want)
	return true
}

func reloadReply(r *reload, final CtlReply) { broadcast(r.watchers, final) }

// closeListener stops a listener this master no longer uses: shutdown
// stops it listening in every process that holds it (tableflip keeps a
// duplicate it cannot forget, workers have theirs), then this master's
// copy is closed and a unix path removed (DESIGN §4, "Dropped
// listeners").
func (m *Master) closeListener(l *listener) {
	if fd, err := rawFD(l.file); err == nil {
		_ = syscall.Shutdown(fd, syscall.SHUT_RDWR)
	}
	_ = l.file.Close()
	if l.spec.Network == "unix" && !l.activated {
		if err := safefile.RemoveSocket(l.spec.Address); err != nil {
			m.log.Warn("unix socket path not removed", "event", "listener.remove_failed", "listener", l.spec.Name, "error", err)
		}
	}
	m.log.Info("listener closed", "event", "listener.closed", "listener", l.spec.Name, "addr", l.addr)
}
