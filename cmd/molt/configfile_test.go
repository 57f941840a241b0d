package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeConfig writes an HCL file and returns its path.
func writeConfig(t testing.TB, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "molt.hcl")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// parseWith parses command-line args and the config file as molt run does.
func parseWith(t *testing.T, args []string) (runFlags, []string, error) {
	t.Helper()
	var f runFlags
	fs := newRunFlagSet(&f, io.Discard)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	cmd := fs.Args()
	if f.configFile != "" {
		fc, err := applyConfigFile(f.configFile, fs)
		if err != nil {
			return f, nil, err
		}
		if len(cmd) == 0 {
			cmd = fc
		}
	}
	return f, cmd, nil
}

func TestConfigFile_EveryKeyAndFlagsOverride(t *testing.T) {
	path := writeConfig(t, `
listen             = ["web=127.0.0.1:0", "unix:/tmp/molt-test.sock"]
socket_mode        = "0660"
workers            = 3
pid_file           = "/tmp/m.pid"
control_socket     = "/tmp/m.sock"
log_file           = "/tmp/m.log"
log_level          = "debug"
log_json           = true
ready              = "delay:2s"
ready_timeout      = "20s"
drain_timeout      = "15s"
worker_stop_signal = "QUIT"
probation          = "5s"
commit             = "manual"
chdir              = "/tmp"
env                = { APP_ENV = "production", B = "2" }
pass_env           = ["DATABASE_URL"]
worker_log         = "/tmp/w.log"
allow_new_privs    = true
umask              = "0027"
backlog            = 512
command            = ["/bin/true", "--flag"]
`)
	f, cmd, err := parseWith(t, []string{"--config", path, "--workers", "7"})
	if err != nil {
		t.Fatal(err)
	}
	if f.workers != 7 {
		t.Errorf("workers %d: the command line must override the file", f.workers)
	}
	if strings.Join(f.listen, ",") != "web=127.0.0.1:0,unix:/tmp/molt-test.sock" || f.socketMode != "0660" || f.pidFile != "/tmp/m.pid" ||
		f.control != "/tmp/m.sock" || f.logFile != "/tmp/m.log" || f.logLevel != "debug" || !f.logJSON || f.ready != "delay:2s" ||
		f.readyTimeout != 20*time.Second || f.drainTimeout != 15*time.Second || f.stopSignal != "QUIT" || f.probation != 5*time.Second ||
		f.commit != "manual" || f.chdir != "/tmp" || strings.Join(f.env, ",") != "APP_ENV=production,B=2,DATABASE_URL" ||
		f.workerLog != "/tmp/w.log" || !f.newPrivs || f.umask != "0027" || f.backlog != 512 {
		t.Errorf("settings from the file: %+v", f)
	}
	if strings.Join(cmd, " ") != "/bin/true --flag" {
		t.Errorf("command %v", cmd)
	}
	// A COMMAND on the command line overrides the file's.
	_, cmd, err = parseWith(t, []string{"--config", path, "--", "/bin/false"})
	if err != nil || strings.Join(cmd, " ") != "/bin/false" {
		t.Errorf("command %v, %v", cmd, err)
	}
	// So does a --listen: the file's list is not merged in.
	f, _, _ = parseWith(t, []string{"--config", path, "--listen", "127.0.0.1:9"})
	if strings.Join(f.listen, ",") != "127.0.0.1:9" {
		t.Errorf("listen %v", f.listen)
	}
}

func TestConfigFile_ErrorsNameFileLineAndKey(t *testing.T) {
	tests := []struct {
		body string
		want []string
	}{
		{"workerz = 2\n", []string{":1:1: Unsupported argument", `Did you mean "workers"?`}},
		{"workers = \"four\"\n", []string{":1:11: workers: want a number"}},
		{"workers = 1.5\n", []string{":1:11: workers: want a whole number"}},
		{"\nworkers = 0\n", []string{":2:11: workers: workers must be at least 1, not 0"}},
		{"ready_timeout = \"soon\"\n", []string{":1:17: ready_timeout:"}},
		{"drain_timeout = \"-1s\"\n", []string{":1:17: drain_timeout:", "positive duration"}},
		{"ready = \"eventually\"\n", []string{":1:9: ready:", "want notify or delay:DUR"}},
		{"worker_stop_signal = \"KILL\"\n", []string{":1:22: worker_stop_signal:", "cannot be caught"}},
		{"commit = \"maybe\"\n", []string{":1:10: commit:", "want auto or manual"}},
		{"listen = [\"127.0.0.1\"]\n", []string{":1:10: listen:", "want host:port"}},
		{"listen = [1, 2]\n", []string{":1:10: listen: want a list of strings"}},
		{"socket_mode = \"999\"\n", []string{":1:15: socket_mode:", "octal"}},
		{"env = { \"1BAD\" = \"x\" }\n", []string{":1:7: env:", "not a valid environment variable name"}},
		{"env = [\"A=B\"]\n", []string{":1:7: env: want an object of strings"}},
		{"pass_env = [\"A=B\"]\n", []string{":1:12: pass_env:", "want a variable name"}},
		{"pass_env = [\"1A\"]\n", []string{":1:12: pass_env:", "not a valid environment variable name"}},
		{"allow_new_privs = \"yes\"\n", []string{":1:19: allow_new_privs: want true or false"}},
		{"log_json = \"yes\"\n", []string{":1:12: log_json: want true or false"}},
		{"log_level = \"loud\"\n", []string{":1:13: log_level:"}},
		{"workers = 2\nworkers = 3\n", []string{":2:1: Attribute redefined"}},
		{"workers = var.n\n", []string{":1:11: workers: must be a constant value"}},
		{"listen {\n}\n", []string{"Unsupported block type"}},
		{"workers = \n", []string{":1:"}},
		// several problems are reported together
		{"workers = 0\ncommit = \"x\"\nbogus = 1\n", []string{":1:11: workers", ":2:10: commit", ":3:1: Unsupported argument"}},
	}
	for _, tt := range tests {
		path := writeConfig(t, tt.body)
		_, _, err := parseWith(t, []string{"--config", path})
		var ce *configError
		if !errors.As(err, &ce) {
			t.Errorf("%q: error %v, want a configError", tt.body, err)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q: error\n%v\ndoes not contain %q", tt.body, err, w)
			}
		}
		if !strings.HasPrefix(err.Error(), path) && !strings.Contains(tt.body, "listen {") {
			t.Errorf("%q: error does not start with the file name: %v", tt.body, err)
		}
	}
}

func TestConfigFile_MissingOrDirectory(t *testing.T) {
	for _, path := range []string{filepath.Join(t.TempDir(), "none.hcl"), t.TempDir()} {
		var f runFlags
		fs := newRunFlagSet(&f, io.Discard)
		_, err := applyConfigFile(path, fs)
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v, want an error naming it", path, err)
		}
	}
}

func FuzzConfigFile(f *testing.F) {
	for _, s := range []string{"workers = 2\n", "listen = [\"a=:1\"]\nenv = { A = \"b\" }\n", "command = [\"/x\"]\n", "x {\n", "\"\n"} {
		f.Add(s)
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, body string) {
		path := filepath.Join(dir, "fuzz.hcl")
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		var rf runFlags
		_, _ = applyConfigFile(path, newRunFlagSet(&rf, io.Discard)) // must not panic
	})
}

// TestConfigFile_Gates: the gates and the canary from the file and the
// flags, and their refusals.
func TestConfigFile_Gates(t *testing.T) {
	path := writeConfig(t, `
max_error_rate     = "1.5%"
max_latency_factor = 2.5
min_requests       = 50
canary             = 1
`)
	f, _, err := parseWith(t, []string{"--config", path, "--canary", "2"})
	if err != nil {
		t.Fatal(err)
	}
	g, err := f.gates()
	if err != nil || !g.ErrorGate || g.MaxErrorRate != 1.5 || g.MaxLatencyFactor != 2.5 || g.MinRequests != 50 || f.canary != 2 {
		t.Fatalf("gates %+v canary %d, %v", g, f.canary, err)
	}
	// Off by default; --min-requests alone judges nothing.
	f, _, _ = parseWith(t, nil)
	if g, err := f.gates(); err != nil || g.On() || f.canary != 0 {
		t.Fatalf("defaults: gates %+v (on %v) canary %d, %v", g, g.On(), f.canary, err)
	}
	for _, bad := range []string{`max_error_rate = "lots"`, `max_error_rate = "101%"`, `max_latency_factor = "2"`, `min_requests = 1.5`} {
		if _, _, err := parseWith(t, []string{"--config", writeConfig(t, bad)}); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
	for _, args := range [][]string{{"--max-latency-factor", "0.5"}, {"--min-requests", "-1"}, {"--max-error-rate", "-1%"}} {
		f, _, _ := parseWith(t, args)
		if _, err := f.gates(); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}
