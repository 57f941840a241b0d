package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// The deploy/ansible role runs as root on each host: nothing another
// local user plants in the release tree may make it copy into, or
// execute from, a place of that user's choosing.

// TestTrust_AnsibleRefusesAReleaseTreeOthersCanWrite: a host whose
// releases/ directory every user can write (sticky, as /tmp), where a
// local user (nobody) planted releases/<the next name> as a symlink to a
// directory of their own, ahead of the deploy. upgrade.yml to that name
// fails on the host with the reason, under the standard load: nothing is
// copied through the symlink (the attacker's directory stays empty), no
// upgrade starts, current still names the release it ran, which serves
// on, with no failed request. A rollback whose previous names such a
// symlink is refused the same way.
func TestTrust_AnsibleRefusesAReleaseTreeOthersCanWrite(t *testing.T) {
	t.Parallel()
	test.Require(t, "root", os.Geteuid() == 0, "chowns the attacker's files to nobody")
	test.RequireCommand(t, "ansible-playbook")
	test.Require(t, "python3", fileExists("/usr/bin/python3"), "/usr/bin/python3 (the hosts' ansible_python_interpreter) is missing")
	dir := test.ShortTempDir(t)
	first, next := version, nextVersion()
	src := filepath.Join(dir, "src", next)
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(bins.molt2, filepath.Join(src, "molt")); err != nil {
		t.Fatal(err)
	}
	h := startFleetHost(t, "host1", first, bins.molt)
	releases := filepath.Join(h.root, "releases")
	// The attacker's directory, and their symlink in the shared releases/.
	evil := filepath.Join(dir, "evil")
	if err := os.Mkdir(evil, 0o777); err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{os.Chown(evil, nobodyID, nobodyID), os.Chmod(releases, 0o777|os.ModeSticky), os.Chmod(h.root, 0o755),
		os.Symlink(evil, filepath.Join(releases, next)), os.Lchown(filepath.Join(releases, next), nobodyID, nobodyID),
		os.Symlink(evil, filepath.Join(releases, "old")), os.Lchown(filepath.Join(releases, "old"), nobodyID, nobodyID)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	inventory := filepath.Join(dir, "inventory.ini")
	inv := fmt.Sprintf("[molt]\n%s molt_root=%s molt_pid_file=%s molt_check_url=http://%s/\n[molt:vars]\nansible_connection=local\nansible_python_interpreter=/usr/bin/python3\n",
		h.name, h.root, h.m.pidFile, h.addr)
	if err := os.WriteFile(inventory, []byte(inv), 0o644); err != nil {
		t.Fatal(err)
	}
	l := startLoad(t, h.addr)

	r := runPlaybook(t, dir, inventory, "upgrade.yml", "molt_release="+next, "molt_release_src="+src)
	if r.code == 0 {
		t.Errorf("upgrade.yml into a releases/ every user can write, through a planted symlink, succeeded:\n%s", r.out)
	}
	if !strings.Contains(r.out, "writable by no group or other user") {
		t.Errorf("the play's output lacks the reason:\n%s", r.out)
	}
	// The same tree, releases/ root's again, but previous names the
	// attacker's symlink: a rollback must not follow it.
	if err := os.Chmod(releases, 0o755); err != nil {
		t.Fatal(err)
	}
	repoint(t, filepath.Join(h.root, "previous"), filepath.Join("releases", "old"))
	r2 := runPlaybook(t, dir, inventory, "rollback.yml")
	if r2.code == 0 || !strings.Contains(r2.out, "must be a directory (not a symlink)") {
		t.Errorf("rollback.yml to a previous release that is a planted symlink: exit %d:\n%s", r2.code, r2.out)
	}
	l.more(t, 64)
	l.stop(t)

	if ents, err := os.ReadDir(evil); err != nil || len(ents) != 0 {
		t.Errorf("the attacker's directory holds %v (%v), want nothing", ents, err)
	}
	if got := h.release(t); got != first {
		t.Errorf("current names release %q, want still %q", got, first)
	}
	if v := h.version(t); v != first {
		t.Errorf("the host serves %q, want still %q", v, first)
	}
	if n := len(h.events("upgrade.started")); n != 0 {
		t.Errorf("%d upgrades started, want none", n)
	}
	h.m.stop()
}
