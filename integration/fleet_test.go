package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/molt-server/molt/test"
)

// A fleet: deploy/ansible's playbooks, run by the real ansible-playbook,
// against three "hosts" on this machine (ansible_connection=local), each
// its own release tree, port, pid file and molt (with its keeper),
// started by the test as a service manager would.

// fleetHost is one host of the inventory.
type fleetHost struct {
	name, root, addr string
	m                *master
}

// release returns the name of the release host h's current symlink
// points to.
func (h *fleetHost) release(t *testing.T) string {
	t.Helper()
	target, err := os.Readlink(filepath.Join(h.root, "current"))
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Base(target)
}

// version returns the version host h serves (X-Molt-Version).
func (h *fleetHost) version(t *testing.T) string {
	t.Helper()
	return get(t, h.addr, "/").Header.Get("X-Molt-Version")
}

// events returns host h's log lines with event key (and kv fields).
func (h *fleetHost) events(key string, kv ...string) []test.Line {
	return test.Find(h.m.log, test.Event(key, kv...))
}

// startFleetHost lays out a host's release tree (releases/<first>/molt,
// current -> releases/<first>) and starts molt at the stable path
// root/current/molt, as app.service does.
func startFleetHost(t *testing.T, name, first, bin string) *fleetHost {
	t.Helper()
	root := test.ShortTempDir(t)
	rel := filepath.Join(root, "releases", first)
	if err := os.MkdirAll(rel, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(bin, filepath.Join(rel, "molt")); err != nil {
		t.Fatal(err)
	}
	repoint(t, filepath.Join(root, "current"), filepath.Join("releases", first))
	m := start(t, runOpts{Dir: root, Path: filepath.Join(root, "current", "molt"), Keeper: true,
		Args: []string{"--listen", "127.0.0.1:0", "--workers", "2", "--probation", "300ms"}})
	h := &fleetHost{name: name, root: root, m: m, addr: m.addr()}
	m.waitServing()
	return h
}

// ansibleRun is one ansible-playbook run's outcome.
type ansibleRun struct {
	code int
	out  string
	took time.Duration
}

var recapLine = regexp.MustCompile(`(?m)^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)`)

// recap returns the PLAY RECAP's counts by host: changed and failed.
func (r ansibleRun) recap() map[string][2]int {
	out := map[string][2]int{}
	for _, m := range recapLine.FindAllStringSubmatch(r.out, -1) {
		changed, _ := strconv.Atoi(m[3])
		failed, _ := strconv.Atoi(m[5])
		out[m[1]] = [2]int{changed, failed}
	}
	return out
}

// runPlaybook runs deploy/ansible/<playbook> against inventory, forks
// one per host, with extra vars; bounded by 3 minutes.
func runPlaybook(t *testing.T, dir, inventory, playbook string, extra ...string) ansibleRun {
	t.Helper()
	bin := test.RequireCommand(t, "ansible-playbook")
	pb, err := filepath.Abs(filepath.Join("..", "deploy", "ansible", playbook))
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-i", inventory, "-f", "3", pb}
	for _, e := range extra {
		args = append(args, "-e", e)
	}
	home := filepath.Join(dir, "ansible")
	log, err := os.CreateTemp(dir, strings.TrimSuffix(playbook, ".yml")+"-*.out")
	if err != nil {
		t.Fatal(err)
	}
	log.Close()
	began := time.Now()
	p := test.Start(t, test.Opts{Path: bin, Args: args, Dir: dir, Log: log.Name(),
		Env: []string{"ANSIBLE_HOME=" + home, "ANSIBLE_LOCAL_TEMP=" + filepath.Join(home, "tmp"),
			"ANSIBLE_REMOTE_TEMP=" + filepath.Join(home, "remote"), "ANSIBLE_NOCOLOR=1",
			"ANSIBLE_PIPELINING=1", "ANSIBLE_RETRY_FILES_ENABLED=0"}})
	r := ansibleRun{code: p.Wait(3 * time.Minute), took: time.Since(began)}
	r.out = p.Log()
	t.Logf("ansible-playbook %s %v: exit %d in %v", playbook, extra, r.code, r.took.Round(time.Millisecond))
	return r
}

// TestFleet_AnsibleRollsOutHostByHost: deploy/ansible/upgrade.yml rolls a
// good release out over three hosts under the standard load spread over
// them, one host after the other (each host's upgrade starts after the
// previous host committed), with zero failed requests, each host then
// serving the new version. Run again with the same release, it changes
// nothing (changed=0 on every host, no upgrade). A bad release (a binary
// that exits at start) stops the rollout at the first host, which molt
// rolled back by itself and the play put back on its release; the play
// fails with the reason, and the other two never see the release (no
// directory, no upgrade). rollback.yml then returns all three to the
// release before, the same way.
func TestFleet_AnsibleRollsOutHostByHost(t *testing.T) {
	t.Parallel()
	test.RequireCommand(t, "ansible-playbook")
	test.Require(t, "python3", fileExists("/usr/bin/python3"), "/usr/bin/python3 (the hosts' ansible_python_interpreter) is missing")
	dir := test.ShortTempDir(t)
	first, next := version, nextVersion() // release names: the versions they serve

	// The controller's release directories.
	src := func(name string) string { return filepath.Join(dir, "src", name) }
	for name, bin := range map[string]string{first: bins.molt, next: bins.molt2} {
		if err := os.MkdirAll(src(name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(bin, filepath.Join(src(name), "molt")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(src("bad"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeScript(t, filepath.Join(src("bad"), "molt"), strings.TrimPrefix(passesPreflight, "#!/bin/sh\n")+"exit 1")

	var hosts []*fleetHost
	inv := "[molt]\n"
	for i := range 3 {
		h := startFleetHost(t, fmt.Sprintf("host%d", i+1), first, bins.molt)
		hosts = append(hosts, h)
		inv += fmt.Sprintf("%s molt_root=%s molt_pid_file=%s molt_check_url=http://%s/\n", h.name, h.root, h.m.pidFile, h.addr)
	}
	inv += "[molt:vars]\nansible_connection=local\nansible_python_interpreter=/usr/bin/python3\n"
	inventory := filepath.Join(dir, "inventory.ini")
	if err := os.WriteFile(inventory, []byte(inv), 0o644); err != nil {
		t.Fatal(err)
	}
	var loads []*loadPair
	for _, h := range hosts {
		loads = append(loads, startLoadPart(t, h.addr, len(hosts)))
	}
	began := time.Now()

	// A good release, host by host.
	r := runPlaybook(t, dir, inventory, "upgrade.yml", "molt_release="+next, "molt_release_src="+src(next))
	if r.code != 0 {
		t.Fatalf("upgrade.yml to %s: exit %d:\n%s", next, r.code, r.out)
	}
	var prevCommit time.Time
	for _, h := range hosts {
		if v := h.version(t); v != next || h.release(t) != next {
			t.Errorf("%s: serves %q from release %q, want %q", h.name, v, h.release(t), next)
		}
		started, committed := h.events("upgrade.started"), h.events("upgrade.committed", "side", "new")
		if len(started) != 1 || len(committed) != 1 {
			t.Fatalf("%s: %d upgrades started, %d committed, want 1 and 1", h.name, len(started), len(committed))
		}
		if !started[0].Time.After(prevCommit) {
			t.Errorf("%s began its upgrade at %v, before the host before it committed (%v): not host by host",
				h.name, started[0].Time, prevCommit)
		}
		prevCommit = committed[0].Time
	}

	// The same release again: nothing to do.
	r = runPlaybook(t, dir, inventory, "upgrade.yml", "molt_release="+next, "molt_release_src="+src(next))
	if r.code != 0 {
		t.Fatalf("upgrade.yml to %s again: exit %d:\n%s", next, r.code, r.out)
	}
	recap := r.recap()
	for _, h := range hosts {
		if c, ok := recap[h.name]; !ok || c != [2]int{0, 0} {
			t.Errorf("%s: the second run's recap has changed, failed = %v (present %v), want 0, 0:\n%s", h.name, c, ok, r.out)
		}
		if n := len(h.events("upgrade.started")); n != 1 {
			t.Errorf("%s: %d upgrades after the second run, want still 1", h.name, n)
		}
	}

	// A bad release: the first host rolls back, the rollout stops there.
	r = runPlaybook(t, dir, inventory, "upgrade.yml", "molt_release=bad", "molt_release_src="+src("bad"))
	if r.code == 0 {
		t.Fatalf("upgrade.yml to a release that exits at start succeeded:\n%s", r.out)
	}
	for _, want := range []string{hosts[0].name + " stays on release " + next, "molt rolled back from bad by itself",
		"rolled back: the new master failed while starting (exit status 1)"} {
		if !strings.Contains(r.out, want) {
			t.Errorf("the play's output lacks %q:\n%s", want, r.out)
		}
	}
	if n := len(hosts[0].events("upgrade.rolled_back")); n != 1 {
		t.Errorf("%s: %d rollbacks logged, want 1", hosts[0].name, n)
	}
	if v := hosts[0].version(t); v != next || hosts[0].release(t) != next {
		t.Errorf("%s: serves %q from release %q after the rollback, want %q", hosts[0].name, v, hosts[0].release(t), next)
	}
	recap = r.recap()
	if c := recap[hosts[0].name]; c[1] != 1 {
		t.Errorf("%s: recap failed=%d, want 1", hosts[0].name, c[1])
	}
	for _, h := range hosts[1:] {
		if _, ok := recap[h.name]; ok {
			t.Errorf("%s is in the recap of the stopped rollout", h.name)
		}
		if fileExists(filepath.Join(h.root, "releases", "bad")) {
			t.Errorf("%s received the bad release", h.name)
		}
		if n := len(h.events("upgrade.started")); n != 1 {
			t.Errorf("%s: %d upgrades, want still 1", h.name, n)
		}
		if v := h.version(t); v != next {
			t.Errorf("%s: serves %q, want %q", h.name, v, next)
		}
	}

	// Back to the release before, host by host.
	r = runPlaybook(t, dir, inventory, "rollback.yml")
	if r.code != 0 {
		t.Fatalf("rollback.yml: exit %d:\n%s", r.code, r.out)
	}
	for _, h := range hosts {
		if v := h.version(t); v != first || h.release(t) != first {
			t.Errorf("%s: serves %q from release %q after rollback.yml, want %q", h.name, v, h.release(t), first)
		}
	}
	for i, l := range loads {
		t.Logf("%s:", hosts[i].name)
		l.stop(t)
	}
	t.Logf("the fleet's four plays took %v", time.Since(began).Round(time.Millisecond))
	for i, h := range hosts {
		allow := []func(test.Line) bool{}
		if i == 0 {
			allow = append(allow, test.Event("upgrade.rolled_back"), test.Event("upgrade.new_gave_up"), test.Event("upgrade.giving_up"))
		}
		h.m.stop(allow...)
	}
}
