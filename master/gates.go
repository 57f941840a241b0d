package master

import (
	"time"

	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
)

// The gates of a probation (upgrade.Gates, docs/upgrades.md "Gates") are
// judged by the new master: it has its own generation's figures and the
// old one's, which the old master sends over the channel every second,
// worker by worker and summed (traffic.go). Once a second while its side
// judges, it hands the side both generations' figures over the same
// window: from the moment every worker of the probation was ready to the
// last snapshot; the old generation's worker by worker too, of which the
// side takes the median (upgrade.OldBaseline).

// feedGates gives an uncommitted new master's side both generations'
// figures over the probation so far.
func (m *Master) feedGates(now time.Time) {
	if m.new == nil || !m.new.Judging() {
		return
	}
	since := m.new.ServingSince()
	if since.IsZero() {
		return
	}
	_ = m.toNew(m.gateTraffic(since, now))
}

// gateTraffic is both generations' figures from since to now. An old
// master sends its workers' figures before its total, each second: one
// whose total came alone (a version before them) leaves the gates its
// sum, logged once.
func (m *Master) gateTraffic(since, now time.Time) upgrade.Traffic {
	d := now.Sub(since)
	t := upgrade.Traffic{New: gateFigures(m.trafficSeries().Window(d, now).Figures)}
	if m.parentTraffic != nil {
		t.Old = gateFigures(m.parentTraffic.Window(d, now).Figures)
	}
	if m.parentWorkers == nil {
		if m.parentTraffic != nil && !m.sumOnlyLogged {
			m.sumOnlyLogged = true
			m.log.Warn("no per-worker figures from the old master (an older version, or none of its workers reports): the gates compare against its generation's sum",
				"event", "stats.old_sum_only")
		}
		return t
	}
	t.OldByWorker = true
	wins := m.parentWorkers.Windows(nil)
	t.OldWorkers = make([]upgrade.Figures, len(wins))
	for i, w := range wins {
		t.OldWorkers[i] = gateFigures(w)
	}
	return t
}

// gateFigures is what the gates see of a window.
func gateFigures(f stats.Figures) upgrade.Figures {
	return upgrade.Figures{Requests: f.Requests(), Errors: f.Errors(), P99: f.Quantile(0.99)}
}
