package master

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/upgrade"
)

// Master is one generation's supervisor. Its fields belong to the loop
// goroutine; everything else reaches it through events.
type Master struct {
	cfg    Config
	log    hclog.Logger
	events chan event
	done   chan struct{} // closed when the loop has returned

	phase     phase
	hand      *upgrade.Handover
	pidFile   *pidFile
	listeners []*listener
	notify    *notifySocket
	spawner   *spawner
	// parentR is passed to every worker; parentW is held by the master
	// alone, so its close (the master's death) is EOF for every worker.
	parentR, parentW *os.File
	devNull          *os.File
	stopSignals      func()

	slots []*slot
	procs map[int]*proc
	seq   int
	sys   sysOps
}

// sysOps are the loop's process and timer operations: the one seam that
// unit tests replace to script exits and readiness without processes or
// sleeps (STYLE.md principle 8).
type sysOps struct {
	// start forks the worker of slot n.
	start func(n int) (*proc, error)
	// watch arranges for a childExited event when p has been reaped.
	watch func(p *proc)
	// signal is kill(2): a negative pid is a process group.
	signal func(pid int, sig syscall.Signal) error
	// after sends ev to the loop once d has passed.
	after func(d time.Duration, ev event)
}

// listener is one open listening socket of the master. The master never
// accepts on it; workers get it at fd 3+index.
type listener struct {
	spec      ListenSpec
	file      *os.File
	addr      string
	inherited bool
}

// eventBufferSize bounds how many events can wait for the loop; senders
// block beyond it (never past the loop's end: they select on done).
const eventBufferSize = 256

// Run starts a master and supervises its workers until it stops: after
// QUIT (graceful), TERM or INT (fast), or ctx being cancelled, which drains
// like QUIT. It returns nil after a clean stop. A configuration it refuses
// wraps ErrConfig, a listener it cannot bind is a *BindError, a pid file
// locked by a live master is a *LockedError; in those cases nothing was
// started. Run catches the signals of DESIGN §3 for its whole duration.
// Only one Run per process: the handover allows one tableflip.Upgrader.
func Run(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	m := &Master{
		cfg:    cfg,
		log:    cfg.Logger.Named("master"),
		events: make(chan event, eventBufferSize),
		done:   make(chan struct{}),
		procs:  map[int]*proc{},
	}
	m.sys = sysOps{start: m.startWorker, watch: m.watch, signal: syscall.Kill, after: m.sendAfter}
	defer close(m.done)
	// Signals first: Go's default action for HUP would kill the master,
	// and for TTIN/TTOU would stop it.
	m.stopSignals = watchSignals(m.send, m.done)
	if err := m.start(); err != nil {
		m.release()
		return err
	}
	return m.loop(ctx)
}

// send hands ev to the loop; it returns false once the loop has ended.
func (m *Master) send(ev event) bool {
	select {
	case m.events <- ev:
		return true
	case <-m.done:
		return false
	}
}

// after sends ev to the loop once d has passed.
func (m *Master) after(d time.Duration, ev event) { m.sys.after(d, ev) }

func (m *Master) sendAfter(d time.Duration, ev event) {
	time.AfterFunc(d, func() { m.send(ev) })
}

// nextSeq returns a number no timer has used yet.
func (m *Master) nextSeq() int {
	m.seq++
	return m.seq
}

// loop is the master's story: one short arm per event.
func (m *Master) loop(ctx context.Context) error {
	ctxDone := ctx.Done()
	for m.phase != phaseStopped {
		select {
		case ev := <-m.events:
			m.log.Trace("event", "event", ev)
			switch ev := ev.(type) {
			case signalBatch:
				m.onSignals(ev)
			case childExited:
				m.onChildExited(ev)
			case notified:
				m.onNotify(ev)
			case timerFired:
				m.onTimer(ev)
			}
		case <-ctxDone:
			ctxDone = nil
			m.log.Info("context cancelled", "action", "graceful shutdown")
			m.shutdown(false)
		}
	}
	return nil
}

// start opens everything the master holds and starts the workers. On error
// the caller releases what was opened.
func (m *Master) start() error {
	m.log.Info("master starting", "version", m.cfg.Version, "pid", os.Getpid(), "workers", m.cfg.Workers)
	if err := closeOnExecAll(); err != nil {
		return fmt.Errorf("mark inherited fds close-on-exec: %w", err)
	}
	pf, err := lockPIDFile(m.cfg.PIDFile)
	if err != nil {
		return err
	}
	m.pidFile = pf
	if m.hand, err = upgrade.New(m.log.Named("upgrade")); err != nil {
		return err
	}
	for _, spec := range m.cfg.Listeners {
		if err := m.openListener(spec); err != nil {
			return err
		}
	}
	if m.notify, err = openNotifySocket(); err != nil {
		return err
	}
	go m.readNotify(m.notify)
	if m.parentR, m.parentW, err = os.Pipe(); err != nil {
		return fmt.Errorf("parent pipe: %w", err)
	}
	if m.devNull, err = os.Open(os.DevNull); err != nil {
		return err
	}
	m.spawner = newSpawner(m.done)
	if err := m.pidFile.write(os.Getpid()); err != nil {
		return err
	}
	// A parentless master enables upgrades at once, not when its workers
	// are ready: a generation whose app crash-loops must still accept USR2
	// with a fixed binary (tableflip refuses Upgrade before Ready).
	if err := m.hand.Ready(); err != nil {
		return err
	}
	m.phase = phaseStarting
	for i := 0; i < m.cfg.Workers; i++ {
		m.addSlot()
	}
	return nil
}

// openListener binds (or inherits) one listener.
func (m *Master) openListener(spec ListenSpec) error {
	f, inherited, err := m.hand.Listener(spec.Name, func() (*os.File, error) {
		return bind(spec, m.cfg.SocketMode)
	})
	if err != nil {
		return err
	}
	addr, err := localAddr(f)
	if err != nil {
		_ = f.Close()
		return &BindError{Spec: spec, Err: err}
	}
	m.listeners = append(m.listeners, &listener{spec: spec, file: f, addr: addr, inherited: inherited})
	m.log.Info("listening", "listener", spec.Name, "network", spec.Network, "addr", addr, "inherited", inherited)
	return nil
}

// readNotify turns datagrams into events until the socket is closed.
func (m *Master) readNotify(s *notifySocket) {
	for {
		msg, err := s.read()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				m.log.Error("notify socket failed; workers can no longer report readiness", "error", err)
			}
			return
		}
		if !m.send(notified{msg}) {
			closeFDs(msg.fds)
			return
		}
	}
}

// shutdown begins a graceful (QUIT) or fast (TERM/INT) stop. A fast stop
// may follow a graceful one, not the other way round.
func (m *Master) shutdown(fast bool) {
	switch {
	case fast && m.phase == phaseStopping, !fast && !m.phase.running():
		return
	}
	if fast {
		m.phase = phaseStopping
		m.log.Info("fast shutdown", "workers", len(m.procs))
		for _, p := range m.procs {
			m.kill(p)
		}
	} else {
		m.phase = phaseDraining
		m.log.Info("graceful shutdown", "workers", len(m.procs), "drain_timeout", m.cfg.DrainTimeout.String())
		for _, p := range m.procs {
			m.stopWorker(p)
		}
	}
	m.finishIfIdle()
}

// finishIfIdle ends the master once it is stopping and no worker is left.
func (m *Master) finishIfIdle() {
	if m.phase.running() || len(m.procs) > 0 {
		return
	}
	m.release()
	m.phase = phaseStopped
	m.log.Info("master exited")
}

// release closes and removes everything the master holds, in reverse
// order of start. It is safe on a partly started master.
func (m *Master) release() {
	if m.stopSignals != nil {
		m.stopSignals()
	}
	if m.notify != nil {
		_ = m.notify.close()
	}
	for _, l := range m.listeners {
		// This master is the last generation (no upgrade exists yet), so it
		// owns the unix path now (DESIGN §4).
		if l.spec.Network == "unix" {
			if err := removeSocket(l.spec.Address); err != nil {
				m.log.Warn("unix socket path not removed", "listener", l.spec.Name, "error", err)
			}
		}
		_ = l.file.Close()
	}
	for _, f := range []*os.File{m.parentW, m.parentR, m.devNull} {
		if f != nil {
			_ = f.Close()
		}
	}
	if m.pidFile != nil {
		if err := m.pidFile.remove(os.Getpid()); err != nil {
			m.log.Warn("pid file not removed", "path", m.cfg.PIDFile, "error", err)
		}
		_ = m.pidFile.close()
	}
}

// removeSocket unlinks path if it is a socket.
func removeSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s is no longer a socket", path)
	}
	return os.Remove(path)
}

// closeFDs closes descriptors received with a notify message.
func closeFDs(fds []int) {
	for _, fd := range fds {
		_ = syscall.Close(fd)
	}
}
