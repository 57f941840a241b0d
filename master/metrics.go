package master

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/molt-server/molt/master/internal/metrics"
	"github.com/molt-server/molt/upgrade"
	"github.com/molt-server/molt/worker"
)

// The Prometheus endpoint (--metrics-listen; docs/operating.md,
// "Metrics"). The loop keeps the figures (m.counters, its own; m.base,
// those its old master counted before it) and publishes a snapshot of
// them after every event it handles (publishMetrics): one atomic store.
// Scrapes are served by the metrics server's goroutines from the last
// snapshot and never reach the loop.
//
// The socket is passed to every new master like the pid-file lock
// (PassFile, under metricsFileName). One master accepts on it at a time:
// an old master until it learns of the commit, a new one from its commit;
// between the two, connections wait in the shared backlog, so none is
// refused. The counters travel the other way, over the G1↔G2 channel
// (upgrade.KindMetrics), from the old master to the new one.

// metricsFileName is the name the metrics socket travels under.
const metricsFileName = "metrics"

// metricsCollectors add families to every snapshot, in order, on the
// loop.
var metricsCollectors = []func(m *Master, sn *metrics.Snapshot){trafficFamilies}

// openMetrics binds --metrics-listen, or takes the socket the old master
// passed when it is at the same address. A master without the flag
// serves none (and passes none on).
func (m *Master) openMetrics() error {
	inherited, err := m.hand.InheritedFile(metricsFileName)
	if err != nil {
		return err
	}
	addr := m.cfg.MetricsListen
	if addr == "" {
		if inherited != nil {
			_ = inherited.Close() // its old master stops serving it at the commit
		}
		return nil
	}
	f := inherited
	if f != nil && !sameTCPAddr(addr, fileAddr(f)) {
		m.log.Info("metrics address changed; binding the new one", "event", "metrics.moved", "from", fileAddr(f), "to", addr)
		_ = f.Close()
		f = nil
	}
	if f == nil {
		if f, err = bindMetrics(addr); err != nil {
			return err
		}
	}
	if err := m.hand.PassFile(metricsFileName, f); err != nil {
		_ = f.Close()
		return err
	}
	m.metrics = metrics.NewServer(f)
	m.publishMetrics()
	m.log.Info("metrics endpoint open", "event", "metrics.listening", "addr", fileAddr(f), "inherited", inherited != nil && f == inherited,
		"serving", m.role() == rolePrimary)
	if m.role() == rolePrimary {
		return m.serveMetrics()
	}
	return nil // a new master serves from its commit
}

// bindMetrics binds the endpoint's TCP socket; the Go listener is closed,
// the socket lives on in the close-on-exec duplicate.
func bindMetrics(addr string) (*os.File, error) {
	spec := ListenSpec{Name: "metrics", Network: "tcp", Address: addr}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, &BindError{Spec: spec, Err: err}
	}
	defer ln.Close()
	f, err := dupListener(ln.(syscall.Conn), "metrics")
	if err != nil {
		return nil, &BindError{Spec: spec, Err: err}
	}
	return f, nil
}

// fileAddr is the local address of a listening socket file ("" if unknown).
func fileAddr(f *os.File) string {
	sa, err := syscall.Getsockname(int(rawFDOrNeg(f)))
	if err != nil {
		return ""
	}
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return (&net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}).String()
	case *syscall.SockaddrInet6:
		return (&net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}).String()
	}
	return ""
}

func rawFDOrNeg(f *os.File) int {
	fd, err := rawFD(f)
	if err != nil {
		return -1
	}
	return fd
}

// sameTCPAddr: the configured address want names the socket at have; a
// port 0 (any) matches the port have got.
func sameTCPAddr(want, have string) bool {
	w, err1 := net.ResolveTCPAddr("tcp", want)
	h, err2 := net.ResolveTCPAddr("tcp", have)
	if err1 != nil || err2 != nil {
		return false
	}
	return (w.Port == 0 || w.Port == h.Port) && (w.IP == nil && h.IP.IsUnspecified() || w.IP.Equal(h.IP))
}

// validMetricsAddr checks --metrics-listen: host:port, TCP.
func validMetricsAddr(addr string) error {
	if addr == "" {
		return nil
	}
	if strings.HasPrefix(addr, "unix:") || strings.HasPrefix(addr, "/") {
		return errors.New("metrics: want HOST:PORT (TCP); a unix socket is not supported")
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("metrics: want HOST:PORT: %w", err)
	}
	return nil
}

// serveMetrics starts accepting on the metrics socket.
func (m *Master) serveMetrics() error {
	if m.metrics == nil || m.metrics.Serving() {
		return nil
	}
	log := m.log
	if err := m.metrics.Start(func(err error) {
		log.Error("metrics endpoint stopped", "event", "metrics.failed", "error", err)
	}); err != nil {
		return err
	}
	m.log.Info("metrics endpoint serving", "event", "metrics.serving", "addr", fileAddr(m.metrics.File()))
	return nil
}

// stopServingMetrics leaves the socket to the master that is current now.
func (m *Master) stopServingMetrics(why string) {
	if m.metrics == nil || !m.metrics.Serving() {
		return
	}
	m.metrics.Stop()
	m.log.Info("metrics endpoint handed over", "event", "metrics.handed_over", "why", why)
}

// totals are the counters this master shows: its old master's and its own.
func (m *Master) totals() metrics.Counters { return m.base.Plus(m.counters) }

// publishMetrics stores a fresh snapshot for the scrapes, and sends the
// counters to a new master in flight if they changed.
func (m *Master) publishMetrics() {
	if m.countersTo != 0 && m.old.InFlight() {
		if up := m.old.Attempt(); up.Pid != 0 && up.Pid == m.countersTo {
			m.sendCounters(up.Pid)
		}
	}
	if m.metrics == nil {
		return
	}
	sn := &metrics.Snapshot{Counters: m.totals(), Gen: m.gen, Resurrections: uint64(m.resurrected.count)}
	count := map[[2]string]int{}
	for _, p := range m.procs {
		count[[2]string{"", p.state.String()}]++
	}
	for _, s := range m.slots {
		if s.pid == 0 && !s.restartAt.IsZero() {
			count[[2]string{"", "restarting"}]++
		}
	}
	for _, st := range []string{"starting", "ready", "stopping", "restarting"} {
		sn.Workers = append(sn.Workers, metrics.WorkerCount{Gen: m.gen, State: st, N: count[[2]string{"", st}]})
	}
	if up := m.old.Attempt(); up != nil && up.Pid != 0 {
		// The new generation as its master reports it (ready of want).
		sn.Workers = append(sn.Workers, metrics.WorkerCount{Gen: m.gen + 1, State: "ready", N: up.Ready},
			metrics.WorkerCount{Gen: m.gen + 1, State: "starting", N: max(up.Want-up.Ready, 0)})
	}
	if r := m.lastResult(); r != nil && len(r.Phases) > 0 {
		sn.LastPhases = map[string]float64{}
		for k, v := range r.Phases {
			sn.LastPhases[strings.TrimSuffix(k, "_ms")] = v / 1000
		}
	}
	for _, c := range metricsCollectors {
		c(m, sn)
	}
	m.metrics.Publish(sn)
}

func (m *Master) lastResult() *upgrade.Result {
	if r := m.old.Last(); r != nil {
		return r
	}
	if m.new != nil {
		return m.new.Last()
	}
	return nil
}

// sendCounters sends this master's totals to the new master pid, if they
// changed since the last send to it.
func (m *Master) sendCounters(pid int) {
	b, err := m.totals().Encode()
	if err != nil {
		m.log.Warn("counters not sent to the new master", "event", "metrics.send_failed", "error", err)
		return
	}
	if m.countersTo == pid && bytes.Equal(b, m.countersSent) {
		return
	}
	m.countersTo, m.countersSent = pid, b
	m.tellChild(upgrade.Msg{Kind: upgrade.KindMetrics, To: pid, Metrics: b})
}

// onParentCounters takes the old master's counters: this master counts
// on from them. Once committed, it no longer takes any.
func (m *Master) onParentCounters(msg upgrade.Msg) {
	if msg.To != os.Getpid() || !m.newUncommitted() {
		return
	}
	c, err := metrics.DecodeCounters(msg.Metrics)
	if err != nil {
		m.log.Warn("counters from the old master refused", "event", "metrics.counters_refused", "error", err)
		return
	}
	m.base = c
}

// noteOldResult counts how an upgrade this master started ended, once
// (its OldSide's Last changes): the old master counts the commit too,
// for the scrapes it may still answer until it stops serving.
func (m *Master) noteOldResult() {
	r := m.old.Last()
	if r == nil || r == m.counted {
		return
	}
	m.counted = r
	switch r.Outcome {
	case "committed":
		m.countUpgrade(metrics.OutcomeCommitted, r)
		m.stopServingMetrics("the new generation committed")
	case "rolled back":
		m.countUpgrade(metrics.OutcomeRolledBack, r)
	case "taken back":
		m.countUpgrade(metrics.OutcomeTakenBack, r)
		if err := m.serveMetrics(); err != nil {
			m.log.Error("metrics endpoint not served again", "event", "metrics.failed", "error", err)
		}
	}
}

// noteCommit: this new master committed; it counts its commit and serves
// the endpoint from now on.
func (m *Master) noteCommit() {
	if r := m.new.Last(); r != nil {
		m.countUpgrade(metrics.OutcomeCommitted, r)
	}
	if err := m.serveMetrics(); err != nil {
		m.log.Error("metrics endpoint not served", "event", "metrics.failed", "error", err)
	}
}

func (m *Master) countUpgrade(outcome string, r *upgrade.Result) {
	cause := r.Cause
	if cause == "" {
		cause = upgrade.CauseFailed
	}
	if m.counters.Upgrades == nil {
		m.counters.Upgrades = map[string]uint64{}
	}
	m.counters.Upgrades[metrics.UpgradeKey(outcome, cause)]++
	ms, ok := r.Phases[upgrade.PhaseCommitted]
	if outcome == metrics.OutcomeRolledBack {
		ms, ok = r.Phases[upgrade.PhaseRolledBack]
	}
	if ok {
		observe(&m.counters.UpgradeSeconds, outcome, ms/1000)
	}
}

// noteParentGone: the old generation has drained (this master's commit
// to its old master's exit).
func (m *Master) noteParentGone() {
	r := m.new.Last()
	if r == nil {
		return
	}
	c, ok1 := r.Phases[upgrade.PhaseCommitted]
	g, ok2 := r.Phases[upgrade.PhaseGone]
	if ok1 && ok2 && g >= c {
		observe(&m.counters.DrainSeconds, "generation", (g-c)/1000)
	}
}

// noteWorkerDrained: p, told to stop at p.stopAt, was reaped.
func (m *Master) noteWorkerDrained(p *proc) {
	if !p.stopAt.IsZero() {
		observe(&m.counters.DrainSeconds, "worker", time.Since(p.stopAt).Seconds())
	}
}

func observe(hs *map[string]metrics.Histogram, key string, sec float64) {
	if *hs == nil {
		*hs = map[string]metrics.Histogram{}
	}
	h := (*hs)[key]
	h.Counts = append([]uint64(nil), h.Counts...) // a published snapshot may share the old slice
	h.Observe(sec)
	(*hs)[key] = h
}

// closeMetrics closes the endpoint (release).
func (m *Master) closeMetrics() {
	if m.metrics != nil {
		_ = m.metrics.Close()
		m.metrics = nil
	}
}

// routineNotify reports whether a worker's notify message only reports
// (its figures, a watchdog ping, a STATUS= line): the metrics snapshot is
// not rebuilt for it. Figures reach the snapshot with the next
// once-a-second tick; a worker that sends such messages by the hundred a
// second costs the loop no snapshot each.
func routineNotify(n worker.Notification) bool {
	for _, f := range n.Fields {
		switch f.Key {
		case worker.NotifyStatsKey, "WATCHDOG", "STATUS":
		default:
			return false
		}
	}
	return true
}
