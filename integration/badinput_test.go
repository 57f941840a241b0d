package integration

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/molt-server/molt/test"
)

// TestBadInput_RefusedBeforeAnythingStarts: each bad input gets its exit
// code and a message that names the problem; no pid file is written and
// no worker is started.
func TestBadInput_RefusedBeforeAnythingStarts(t *testing.T) {
	t.Parallel()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	notExec := filepath.Join(t.TempDir(), "app")
	os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644)
	cases := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unparsable address", []string{"--listen", "127.0.0.1"}, 2, "want host:port"},
		{"bad port", []string{"--listen", "127.0.0.1:99999"}, 2, "not a number from 0 to 65535"},
		{"unbindable address", []string{"--listen", "192.0.2.1:80"}, 3, "cannot assign requested address"},
		{"port in use", []string{"--listen", busy.Addr().String()}, 3, "address already in use"},
		{"missing command", []string{"--listen", "127.0.0.1:0", "--", "/nonexistent/app"}, 2, "not found"},
		{"command not executable", []string{"--listen", "127.0.0.1:0", "--", notExec}, 2, "not executable"},
		{"zero workers", []string{"--listen", "127.0.0.1:0", "--workers", "0"}, 2, "--workers 0: want at least 1"},
		{"negative workers", []string{"--listen", "127.0.0.1:0", "--workers", "-2"}, 2, "want at least 1"},
		{"pid-file directory missing", []string{"--listen", "127.0.0.1:0", "--pid-file", "/nonexistent/dir/molt.pid"}, 2, "directory /nonexistent/dir does not exist"},
		{"bad ready", []string{"--listen", "127.0.0.1:0", "--ready", "sometime"}, 2, "want notify or delay:DUR"},
		{"uncatchable stop signal", []string{"--listen", "127.0.0.1:0", "--worker-stop-signal", "KILL"}, 2, "cannot be caught"},
		{"unknown flag", []string{"--listen", "127.0.0.1:0", "--frobnicate"}, 2, "flag provided but not defined"},
		{"bad socket mode", []string{"--listen", "unix:/tmp/x.sock", "--socket-mode", "999"}, 2, "want an octal permission"},
		{"duplicate listener name", []string{"--listen", "a=127.0.0.1:0", "--listen", "a=127.0.0.1:0"}, 2, "used twice"},
		{"log-file directory missing", []string{"--listen", "127.0.0.1:0", "--log-file", "/nonexistent/dir/molt.log"}, 2, "log file"},
		{"negative backlog", []string{"--listen", "127.0.0.1:0", "--backlog", "-1"}, 2, "--backlog -1"},
		{"bad umask", []string{"--listen", "127.0.0.1:0", "--umask", "0999"}, 2, "--umask"},
		{"bad env name", []string{"--listen", "127.0.0.1:0", "--env", "1BAD=x"}, 2, "--env \"1BAD=x\""},
		{"chdir missing", []string{"--listen", "127.0.0.1:0", "--chdir", "/nonexistent/dir"}, 2, "--chdir /nonexistent/dir: not a directory"},
		{"config file missing", []string{"--config", "/nonexistent/molt.hcl"}, 2, "config file: stat /nonexistent/molt.hcl"},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			dir := t.TempDir()
			args := append([]string{"run"}, c.args...)
			if !slices.Contains(c.args, "--pid-file") {
				args = append(args[:1], append([]string{"--pid-file", filepath.Join(dir, "molt.pid")}, args[1:]...)...)
			}
			p := test.Start(t, test.Opts{Path: bins.molt, Args: args, Dir: dir})
			if code := p.Wait(stepTimeout); code != c.code {
				t.Errorf("exit code %d, want %d; output:\n%s", code, c.code, p.Log())
			}
			if !strings.Contains(p.Log(), c.msg) {
				t.Errorf("output does not say %q:\n%s", c.msg, p.Log())
			}
			if _, err := os.Stat(filepath.Join(dir, "molt.pid")); err == nil {
				t.Error("a pid file was written")
			}
			if kids := test.Children(p.Pid); len(kids) > 0 {
				t.Errorf("processes started: %v", kids)
			}
		})
	}
}

// TestBadInput_SecondMasterOnTheSamePidFileIsRefused: while a master
// lives, another "molt run" with its pid file exits 4 and names it; the
// first one is undisturbed.
func TestBadInput_SecondMasterOnTheSamePidFileIsRefused(t *testing.T) {
	t.Parallel()
	m := start(t, runOpts{Args: []string{"--listen", "127.0.0.1:0", "--workers", "1"}})
	addr := m.addr()
	m.waitServing()
	p := test.Start(t, test.Opts{Path: bins.molt, Dir: m.dir, Log: filepath.Join(m.dir, "second.out"),
		Args: []string{"run", "--pid-file", m.pidFile, "--listen", "127.0.0.1:0", "--workers", "1"}})
	if code := p.Wait(stepTimeout); code != 4 {
		t.Errorf("second master exit %d, want 4; output:\n%s", code, p.Log())
	}
	if !strings.Contains(p.Log(), "already runs") || !strings.Contains(p.Log(), "pid "+strconv.Itoa(m.Pid)) {
		t.Errorf("second master's message does not name the running one (pid %d):\n%s", m.Pid, p.Log())
	}
	if got := m.current(); got != m.Pid {
		t.Errorf("pid file now %d, want %d", got, m.Pid)
	}
	get(t, addr, "/")
	m.stop()
}
