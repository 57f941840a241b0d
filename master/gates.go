package master

import (
	"time"

	"github.com/molt-server/molt/master/internal/stats"
	"github.com/molt-server/molt/upgrade"
)

// The gates of a probation (upgrade.Gates, docs/upgrades.md "Gates") are
// judged by the new master: it has its own generation's figures and the
// old one's, which the old master sends over the channel every second
// (traffic.go). Once a second while its side judges, it hands the side
// both generations' figures over the same window: from the moment every
// worker of the probation was ready to the last snapshot.

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
	d := now.Sub(since)
	own := m.trafficSeries().Window(d, now)
	var old stats.Window
	if m.parentTraffic != nil {
		old = m.parentTraffic.Window(d, now)
	}
	_ = m.toNew(upgrade.Traffic{New: gateFigures(own.Figures), Old: gateFigures(old.Figures)})
}

// gateFigures is what the gates see of a window.
func gateFigures(f stats.Figures) upgrade.Figures {
	return upgrade.Figures{Requests: f.Requests(), Errors: f.Errors(), P99: f.Quantile(0.99)}
}
