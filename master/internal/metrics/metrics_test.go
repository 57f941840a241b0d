package metrics

import (
	"bytes"
	"math"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func TestWrite_ParsesWithThePrometheusParser(t *testing.T) {
	var c Counters
	c.Upgrades = map[string]uint64{UpgradeKey(OutcomeRolledBack, "not_ready"): 2}
	c.Restarts, c.Backoffs = 3, 1
	h := Histogram{}
	h.Observe(0.3)
	h.Observe(400)
	c.UpgradeSeconds = map[string]Histogram{OutcomeCommitted: h}
	sn := &Snapshot{Counters: c, Gen: 4, Workers: []WorkerCount{{Gen: 4, State: "ready", N: 2}},
		LastPhases: map[string]float64{"serving": 0.02},
		Families: []Family{{Name: "molt_requests_total", Help: "a plug-in's", Type: "counter",
			Samples: []Sample{{Labels: [][2]string{{"generation", "4"}, {"class", `5"x\`}}, Value: 7}}}}}
	var b bytes.Buffer
	Write(&b, sn)
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(&b)
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, b.String())
	}
	up := fams["molt_upgrades_total"]
	if up == nil || len(up.Metric) != 2 {
		t.Fatalf("molt_upgrades_total: %v", up)
	}
	hist := fams["molt_upgrade_duration_seconds"].Metric[0].Histogram
	if hist.GetSampleCount() != 2 || hist.GetSampleSum() != 400.3 {
		t.Fatalf("histogram count %d sum %v", hist.GetSampleCount(), hist.GetSampleSum())
	}
	for _, bk := range hist.Bucket {
		want := uint64(0)
		if bk.GetUpperBound() >= 0.3 {
			want = 1
		}
		if math.IsInf(bk.GetUpperBound(), 1) {
			want = 2
		}
		if bk.GetCumulativeCount() != want {
			t.Errorf("bucket le=%v: %d, want %d", bk.GetUpperBound(), bk.GetCumulativeCount(), want)
		}
	}
	if v := fams["molt_requests_total"].Metric[0].Label[1].GetValue(); v != `5"x\` {
		t.Errorf("escaped label came back as %q", v)
	}
}

func TestCounters_PlusAndDecode(t *testing.T) {
	a := Counters{Upgrades: map[string]uint64{UpgradeKey(OutcomeCommitted, ReasonOK): 1}, Restarts: 2}
	a.UpgradeSeconds = map[string]Histogram{OutcomeCommitted: {}}
	h := a.UpgradeSeconds[OutcomeCommitted]
	h.Observe(1)
	a.UpgradeSeconds[OutcomeCommitted] = h
	b, err := a.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeCounters(b)
	if err != nil {
		t.Fatal(err)
	}
	sum := got.Plus(Counters{Upgrades: map[string]uint64{UpgradeKey(OutcomeCommitted, ReasonOK): 1}, Restarts: 1})
	if sum.Upgrades[UpgradeKey(OutcomeCommitted, ReasonOK)] != 2 || sum.Restarts != 3 || sum.UpgradeSeconds[OutcomeCommitted].count() != 1 {
		t.Fatalf("sum %+v", sum)
	}
	for _, bad := range []string{
		`{"upgrades":{"committed/Free text":1}}`,
		`{"upgrades":{"nokey":1}}`,
		`{"upgrade_seconds":{"committed":{"counts":[1,2],"sum":1}}}`,
		`{"restarts":-1}`,
		`[]`,
	} {
		if _, err := DecodeCounters([]byte(bad)); err == nil {
			t.Errorf("DecodeCounters(%s) accepted", bad)
		}
	}
	if !strings.Contains(string(b), "upgrades") {
		t.Errorf("encoding %s", b)
	}
}
