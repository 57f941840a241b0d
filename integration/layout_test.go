package integration

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/molt-server/molt"

// pkgDeps lists every package path that pkg depends on (go list -deps).
func pkgDeps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-json=ImportPath,Standard", "../"+pkg).Output()
	if err != nil {
		t.Fatalf("go list %s: %v", pkg, err)
	}
	var deps []string
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p struct {
			ImportPath string
			Standard   bool
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		if !p.Standard {
			deps = append(deps, p.ImportPath)
		}
	}
	return deps
}

// TestLayout_ImportDirections encodes STYLE.md §4's table: arrows point
// to what a package may import, and each ban says why.
func TestLayout_ImportDirections(t *testing.T) {
	t.Parallel()
	rules := []struct {
		pkg    string
		banned []string
		why    string
	}{
		{"master", []string{module + "/cmd", module + "/test", module + "/integration"}, "worker and upgrade are leaves under master; nothing wires master but cmd"},
		{"upgrade", []string{module + "/master", module + "/worker", module + "/cmd"}, "the handover knows nothing of workers"},
		{"worker", []string{module + "/master", module + "/upgrade", module + "/cmd", module + "/test", "github.com/hashicorp/go-hclog", "github.com/cloudflare/tableflip"}, "apps import worker: its dependency closure is their cost"},
		{"test", []string{module + "/master", module + "/upgrade", module + "/cmd"}, "helpers must not see internals"},
		{"test/fakeapp", []string{module + "/master", module + "/upgrade", module + "/cmd"}, "the fake app is an app"},
		{"cmd/molt", []string{module + "/test", module + "/integration"}, "the binary wires everything, nothing wires it"},
	}
	for _, r := range rules {
		for _, d := range pkgDeps(t, r.pkg) {
			for _, b := range r.banned {
				if d == b || strings.HasPrefix(d, b+"/") {
					t.Errorf("%s imports %s: %s", r.pkg, d, r.why)
				}
			}
		}
	}
	// master/keeper: never the master itself (its internal packages are
	// shared on purpose), nor anything of upgrades.
	for _, d := range pkgDeps(t, "master/keeper") {
		if d == module+"/master" || strings.HasPrefix(d, module+"/upgrade") || strings.HasPrefix(d, module+"/cmd") ||
			strings.HasPrefix(d, "github.com/cloudflare/tableflip") {
			t.Errorf("master/keeper depends on %s: the keeper never re-executes and knows nothing of generations; keep its code independent", d)
		}
		// Of molt's own packages, only these: the keeper forwards, the
		// masters decide.
		if strings.HasPrefix(d, module+"/") && d != module+"/master/keeper" && d != module+"/worker" && d != module+"/master/ctlclient" &&
			d != module+"/master/safefile" && !strings.HasPrefix(d, module+"/master/internal/") {
			t.Errorf("master/keeper depends on %s: it may use worker, master/ctlclient, master/safefile and master/internal/* of molt's packages", d)
		}
	}
	// master/safefile: a leaf that cmd/molt and master both use.
	for _, d := range pkgDeps(t, "master/safefile") {
		if d != module+"/master/safefile" && !strings.HasPrefix(d, "golang.org/x/sys/") {
			t.Errorf("master/safefile depends on %s: it is a leaf (stdlib + golang.org/x/sys)", d)
		}
	}
	// master/ctlclient: a leaf that cmd/molt and the keeper both use.
	for _, d := range pkgDeps(t, "master/ctlclient") {
		if d != module+"/master/ctlclient" && !strings.HasPrefix(d, "golang.org/x/sys/") {
			t.Errorf("master/ctlclient depends on %s: it is a leaf (stdlib + golang.org/x/sys)", d)
		}
	}
	// The Prometheus exposition: VictoriaMetrics/metrics, through
	// master/internal/metrics alone (chosen by the master's RSS:
	// docs/operating.md, "Metrics"); the prometheus/* modules are the
	// tests' parser, never in a binary.
	const vm = "github.com/VictoriaMetrics/metrics"
	for _, pkg := range []string{"master", "master/keeper", "master/ctlclient", "master/safefile", "upgrade", "worker", "cmd/molt", "test", "test/fakeapp"} {
		for _, d := range pkgDeps(t, pkg) {
			if strings.HasPrefix(d, "github.com/prometheus/") {
				t.Errorf("%s depends on %s: the prometheus/* modules are for tests only (the parser)", pkg, d)
			}
			if (d == vm || strings.HasPrefix(d, vm+"/") || d == module+"/master/internal/metrics") && pkg != "master" && pkg != "cmd/molt" {
				t.Errorf("%s depends on %s: the metrics exposition is the master's alone", pkg, d)
			}
		}
	}
	for _, pkg := range []string{"master", "cmd/molt"} {
		out, err := exec.Command("go", "list", "-f", "{{join .Imports \"\\n\"}}", "../"+pkg).Output()
		if err != nil {
			t.Fatalf("go list %s: %v", pkg, err)
		}
		for _, d := range strings.Fields(string(out)) {
			if d == vm || strings.HasPrefix(d, vm+"/") {
				t.Errorf("%s imports %s: only master/internal/metrics does", pkg, d)
			}
		}
	}
	for _, d := range pkgDeps(t, "master/internal/metrics") {
		if strings.HasPrefix(d, module+"/") && d != module+"/master/internal/metrics" {
			t.Errorf("master/internal/metrics depends on %s: it is a leaf (the library and the standard library)", d)
		}
	}
	// worker: the standard library and x/sys, nothing else.
	for _, d := range pkgDeps(t, "worker") {
		if d != module+"/worker" && !strings.HasPrefix(d, "golang.org/x/sys/") {
			t.Errorf("worker depends on %s: its closure must be stdlib + golang.org/x/sys", d)
		}
	}
}
