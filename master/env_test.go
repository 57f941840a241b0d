package master

import (
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// TestWorkerEnv_OnlyTheDocumentedRule: of the master's environment a
// worker keeps PATH, the locale, TZ and the Go runtime's settings; never a
// secret, the keeper's pid, systemd's, tableflip's or molt's own handover plumbing, or the
// master's HOME when it runs as another user; Config.Env and then the
// protocol replace what they name.
func TestWorkerEnv_OnlyTheDocumentedRule(t *testing.T) {
	base := []string{
		"PATH=/usr/bin", "LANG=C.UTF-8", "LC_ALL=C", "LANGUAGE=en", "TZ=UTC",
		"GORACE=halt_on_error=1", "GOMAXPROCS=2", "GOMEMLIMIT=1GiB", "GOGC=50", "GODEBUG=x=1", "GOTRACEBACK=all",
		"HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/bash",
		"AWS_SECRET_ACCESS_KEY=hunter2", "MOLT_KEEPER_PID=1", "NOTIFY_SOCKET=/run/systemd/notify",
		"LISTEN_FDS=2", "TABLEFLIP_HAS_PARENT_7DIU3=1", "MOLT_HANDOVER_FDS=molt.ready:3,molt.parent:4", "GOPROXY=https://user:token@proxy", "MOLT_ROLE=exec",
		"MOLT_RESURRECTIONS=2", "MOLT_RESURRECTED_BECAUSE=the master was killed by signal: killed",
	}
	kept := []string{"PATH=/usr/bin", "LANG=C.UTF-8", "LC_ALL=C", "LANGUAGE=en", "TZ=UTC",
		"GORACE=halt_on_error=1", "GOMAXPROCS=2", "GOMEMLIMIT=1GiB", "GOGC=50", "GODEBUG=x=1", "GOTRACEBACK=all"}

	// The master's own user: its own identity.
	got := workerEnv(base, nil, []string{"APP=1", "TZ=Europe/Paris"})
	want := append(append([]string{}, kept...), "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/bash", "APP=1", "TZ=Europe/Paris")
	if !slices.Equal(got, want) {
		t.Errorf("same user:\n got %q\nwant %q", got, want)
	}
	merged := mergeEnv(got, []string{"NOTIFY_SOCKET=@molt/1/x", "APP=protocol"})
	if v := lookup(merged, "TZ"); v != "Europe/Paris" {
		t.Errorf("Config.Env does not replace the master's TZ: %q", v)
	}
	if v := lookup(merged, "APP"); v != "protocol" {
		t.Errorf("the protocol does not replace Config.Env: %q", v)
	}
	if n := strings.Count(strings.Join(merged, "\n"), "TZ="); n != 1 {
		t.Errorf("TZ %d times in %q", n, merged)
	}

	// Another user: its passwd entry, never the master's HOME.
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	cred := &syscall.Credential{Uid: 65534}
	if nobody.Uid != "65534" {
		t.Skipf("nobody is uid %s", nobody.Uid)
	}
	got = workerEnv(base, cred, nil)
	for k, v := range map[string]string{"HOME": nobody.HomeDir, "USER": "nobody", "LOGNAME": "nobody"} {
		if g := lookup(got, k); g != v {
			t.Errorf("as nobody: %s=%q, want %q", k, g, v)
		}
	}
	if g, w := lookup(got, "SHELL"), loginShell(passwdFile, "65534"); g != w || g == "" {
		t.Errorf("as nobody: SHELL=%q, want %q", g, w)
	}
	for _, kv := range got {
		k, _, _ := strings.Cut(kv, "=")
		if !keptEnv(k) && !slices.Contains(identityVars, k) {
			t.Errorf("as nobody: %s passed", kv)
		}
	}
}

func lookup(env []string, k string) string {
	for _, kv := range env {
		if key, v, _ := strings.Cut(kv, "="); key == k {
			return v
		}
	}
	return ""
}

func TestLoginShell(t *testing.T) {
	path := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(path, []byte("root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/srv/app:\nbad:x:7\n"), 0o644)
	for uid, want := range map[string]string{"0": "/bin/bash", "1000": "/bin/sh", "7": "/bin/sh", "42": "/bin/sh"} {
		if got := loginShell(path, uid); got != want {
			t.Errorf("uid %s: %q, want %q", uid, got, want)
		}
	}
	if got := loginShell(filepath.Join(t.TempDir(), "none"), "0"); got != "/bin/sh" {
		t.Errorf("no passwd file: %q", got)
	}
}

// TestWorkerEnv_DefaultGOMAXPROCS: where neither molt's environment nor
// Config.Env sets GOMAXPROCS, workers get the CPUs shared out among the
// configured workers, at least 1; a GOMAXPROCS the user set, even empty
// (Go's own default), is kept as it is.
func TestWorkerEnv_DefaultGOMAXPROCS(t *testing.T) {
	for _, c := range []struct{ cpus, workers, want int }{
		{1, 1, 1}, {2, 1, 2}, {2, 2, 1}, {2, 4, 1}, {8, 2, 4}, {8, 3, 2}, {16, 4, 4}, {4, 0, 4},
	} {
		if got := defaultGOMAXPROCS(c.cpus, c.workers); got != c.want {
			t.Errorf("defaultGOMAXPROCS(%d cpus, %d workers) = %d, want %d", c.cpus, c.workers, got, c.want)
		}
	}
	env := withGOMAXPROCS(workerEnv([]string{"PATH=/bin"}, nil, []string{"APP=1"}), 8, 2)
	if v := lookup(env, "GOMAXPROCS"); v != "4" {
		t.Errorf("unset: GOMAXPROCS=%q, want 4 (in %q)", v, env)
	}
	for _, c := range []struct {
		name      string
		base, cfg []string
		want      string
	}{
		{"molt's environment", []string{"GOMAXPROCS=3"}, nil, "3"},
		{"--env", nil, []string{"GOMAXPROCS=5"}, "5"},
		{"--env over molt's", []string{"GOMAXPROCS=3"}, []string{"GOMAXPROCS=5"}, "5"},
		{"--env empty", nil, []string{"GOMAXPROCS="}, ""},
	} {
		env := mergeEnv(withGOMAXPROCS(workerEnv(c.base, nil, c.cfg), 8, 2))
		if v := lookup(env, "GOMAXPROCS"); v != c.want {
			t.Errorf("%s: GOMAXPROCS=%q, want %q (in %q)", c.name, v, c.want, env)
		}
		if n := strings.Count(strings.Join(env, "\n"), "GOMAXPROCS="); n != 1 {
			t.Errorf("%s: GOMAXPROCS %d times in %q", c.name, n, env)
		}
	}
}
