package master

import (
	"context"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/molt-server/molt/master/internal/metrics"
	"github.com/molt-server/molt/master/internal/notify"
	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
)

// Master is one generation's supervisor. Its fields belong to the loop
// goroutine; everything else reaches it through events.
type Master struct {
	cfg Config
	// log is replaced on the loop once the generation is known (its
	// lines carry gen): a goroutine takes its own copy when it starts and
	// never reads m.log.
	log    hclog.Logger
	events chan event
	done   chan struct{} // closed when the loop has returned

	phase     phase
	gen       int
	hand      handover
	pidFile   *pidFile
	listeners []*listener
	// listenerEpoch counts listeners replaced by a new socket
	// (replaceUnix); a worker started before the last one is recycled.
	listenerEpoch int
	// adopt: sockets passed by socket activation, by the listener they
	// serve, until start has opened that listener.
	adopt map[string]*activatedSocket
	// notifyDir holds one notify socket per worker (notify.go).
	notifyDir string
	notifySeq int // names the next worker's socket
	rejected  *notify.Rejected
	// traffic is this generation's figures (traffic.go); parentTraffic
	// the old generation's, on a new master during its upgrade.
	traffic, parentTraffic *stats.Series
	statsDropped           atomic.Uint64 // reports past one a second, by the readers
	figuresUnsent          int           // the attempt figures failed to reach (traffic.go)
	// parentWorkers: the old generation's figures worker by worker, on
	// a new master during its upgrade (nil until the old master sends
	// any); oldWorkers is the old master's worker count (its config), the
	// bound of what parentWorkers keeps; the rest is counted in
	// oldRejected (oldRejectedLogged of them logged), the last error in
	// oldRejectErr. sumOnlyLogged: the fallback to the sum was logged.
	parentWorkers                  *stats.Sources
	oldWorkers                     int
	oldRejected, oldRejectedLogged uint64
	oldRejectErr                   error
	sumOnlyLogged                  bool
	// spawner starts workers with no_new_privs, privSpawner those
	// allowed new privileges (--allow-new-privs); each is made when first
	// needed.
	spawner, privSpawner *spawner
	// parentR is passed to every worker; parentW is held by the master
	// alone, so its close (the master's death) is EOF for every worker.
	parentR, parentW *os.File
	devNull          *os.File
	stopSignals      func()
	control          *controlSocket
	started          time.Time
	supervisor       string      // NOTIFY_SOCKET: the keeper or systemd; "" if none
	specTimer        *time.Timer // registers the exec spec with the keeper (supervisor.go)
	// resurrected: what the keeper told this master's line of the
	// resurrections so far (MOLT_RESURRECTIONS, MOLT_RESURRECTED_BECAUSE),
	// read once at start.
	resurrected resurrections

	slots []*slot
	spec  *workerSpec // how new workers of the current slots start
	procs map[int]*proc
	seq   int
	sys   sysOps

	rl *reload // a reload in flight
	// old is this master as the old generation of an upgrade (every
	// master may start one); new, this master as the new generation of
	// the upgrade that started it (nil if none did). dance.go.
	old *upgrade.OldSide
	new *upgrade.NewSide
	// children is the channel to the new masters this one starts;
	// parent, to the old master that started this one.
	children, parent *upgrade.Channel
	// stopPreflight kills the pre-flight run of the upgrade in flight
	// (nil: none runs).
	stopPreflight func()
	// parentNames: the old master's listener names (its configuration);
	// moved: inherited listeners whose name this configuration moved to
	// another address, closed at the commit.
	parentNames []string
	moved       []*listener
	// watchers are "molt ctl upgrade --wait" connections: they get every
	// step, and a final reply when the upgrade ends.
	watchers []chan CtlReply
	exitErr  error // what Run returns once stopped

	// accept is this generation's accept table (accepttable.go); nil if
	// it could not be made: workers then accept unbalanced.
	accept *acceptTable
	// peerAccept is the old generation's accept table, reopened
	// read-only, for this generation's canary (accepttable.go); nil
	// outside an upgrade or if the old master passed none.
	peerAccept *os.File

	// metrics serves --metrics-listen (nil: off); counters are this
	// master's own figures, base those its old master sent (metrics.go).
	metrics        *metrics.Server
	counters, base metrics.Counters
	countersTo     int    // the new master the counters were last sent to
	countersSent   []byte // what was sent to it
	counted        *upgrade.Result
}

// sysOps are the loop's process and timer operations: the one seam that
// unit tests replace to script exits and readiness without processes or
// sleeps (STYLE.md principle 8).
type sysOps struct {
	// start forks the worker of slot s.
	start func(s *slot) (*proc, error)
	// watch arranges for a childExited event when p has been reaped.
	watch func(p *proc)
	// signal is kill(2): a negative pid is a process group.
	signal func(pid int, sig syscall.Signal) error
	// after sends ev to the loop once d has passed.
	after func(d time.Duration, ev event)
}

// handover is what the master uses of its upgrade.Handover: with sysOps,
// the seam unit tests replace (a scripted tableflip).
type handover interface {
	HasParent() bool
	Listener(name string, bind func() (*os.File, error)) (f *os.File, inherited bool, err error)
	InheritedListener(name string) (*os.File, error)
	Replace(name string, f *os.File) error
	Ready() error
	PassFile(name string, f *os.File) error
	InheritedFile(name string) (*os.File, error)
	Parent() (*upgrade.Channel, error)
	Children() (*upgrade.Channel, error)
	Upgrade() error
	WaitForParent(ctx context.Context) error
}

// listener is one open listening socket of the master. The master never
// accepts on it; workers get it at fd 3+index.
type listener struct {
	spec      ListenSpec
	file      *os.File
	addr      string
	inherited bool // from the old master, by tableflip
	// activated: passed by socket activation, to this master or to the
	// first of its generations; its owner (systemd) keeps the address.
	activated bool
	// shutTold: this unix listener was found shut down and the operator
	// told so (once: molt cannot undo it on the same socket).
	shutTold bool
}

// eventBufferSize bounds how many events can wait for the loop; senders
// block beyond it (never past the loop's end: they select on done).
const eventBufferSize = 256

// Run starts a master and supervises its workers until it stops: after
// QUIT (graceful), TERM or INT (fast), ctx being cancelled (which drains
// like QUIT), or, for an old master, the commit of a new generation. It
// returns nil after a clean stop. A configuration it refuses wraps
// ErrConfig, a listener it cannot bind is a *BindError, a pid file locked
// by a live master is a *LockedError; in those cases nothing was started.
// A new master that gave up before its commit returns an *ExitError.
// Run catches the signals of DESIGN §3 for its whole duration. Only one
// Run per process: the handover allows one tableflip.Upgrader.
func Run(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	m := &Master{
		cfg:        cfg,
		log:        cfg.Logger.Named("master"),
		events:     make(chan event, eventBufferSize),
		done:       make(chan struct{}),
		procs:      map[int]*proc{},
		started:    time.Now(),
		supervisor: os.Getenv(worker.EnvNotifySocket),
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
	m.watchKeeper()
	m.resurrected = m.resurrectionsFromEnv()
	m.startStatsTicker()
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
		routine := false // an event that changes nothing the metrics show
		select {
		case ev := <-m.events:
			m.log.Trace("event", "what", ev) // not "event": that key is the stable one of the lines below
			switch ev := ev.(type) {
			case signalBatch:
				m.onSignals(ev)
			case childExited:
				m.onChildExited(ev)
			case notified:
				m.onNotify(ev)
				routine = routineNotify(ev.Fields)
			case statsTick:
				m.onStatsTick(ev)
				m.feedGates(ev.at) // gates.go
			case timerFired:
				m.onTimer(ev)
			case upgradeDone:
				_ = m.toOld(upgrade.UpgradeDone{Err: ev.err})
			case fromChild:
				m.onChildMsg(ev)
			case fromParent:
				m.onParentMsg(ev)
			case parentExited:
				_ = m.toNew(upgrade.ParentExited{})
			case ctlEvent:
				m.onCtl(ev)
			case preflightDone:
				_ = m.toOld(upgrade.PreflightDone{Attempt: ev.attempt, Out: ev.out, Err: ev.err})
			case healthDone:
				m.onHealthDone(ev)
			case keeperExited:
				m.log.Warn("the keeper has exited; this master serves on without it", "event", "master.keeper_exited", "keeper_pid", ev.pid)
			case successorExited:
				_ = m.toOld(upgrade.SuccessorExited{Pid: ev.pid})
			}
		case <-ctxDone:
			ctxDone = nil
			m.log.Info("context cancelled", "event", "master.cancelled", "action", "graceful shutdown")
			m.shutdown(false)
		}
		if !routine {
			m.publishMetrics()
		}
	}
	if m.exitErr == nil && m.new != nil {
		if e := m.new.Exit(); e != nil {
			return e
		}
	}
	return m.exitErr
}
