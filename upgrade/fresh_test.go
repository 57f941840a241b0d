package upgrade

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestParseHandoverEnv: a new master started by molt's own handover
// takes only what it knows, each fd once and open; anything else is a
// clear error naming the variable (the master then refuses to start and
// the old generation keeps serving).
func TestParseHandoverEnv(t *testing.T) {
	open := func() int {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(); w.Close() })
		// A fresh number the test owns, without close-on-exec, as an
		// inherited one arrives.
		fd, err := unix.Dup(int(r.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	a, b, c, d := open(), open(), open(), open()
	closed := open()
	unix.Close(closed)

	good := fmt.Sprintf("molt.ready:%d,molt.parent:%d,molt.channel:%d,molt.listener.http-1.x_y:%d", a, b, c, d)
	files, err := parseHandoverEnv(good)
	if err != nil {
		t.Fatalf("parse %q: %v", good, err)
	}
	want := map[string]int{readyFile: a, parentFile: b, channelFile: c, "molt.listener.http-1.x_y": d}
	if len(files) != len(want) {
		t.Errorf("got %v, want %v", files, want)
	}
	for name, fd := range want {
		if files[name] != fd {
			t.Errorf("%s: fd %d, want %d", name, files[name], fd)
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s (fd %d) not made close-on-exec: flags %#x, %v", name, fd, flags, err)
		}
	}

	pipes := fmt.Sprintf("molt.ready:%d,molt.parent:%d", a, b)
	for _, tt := range []struct{ val, why string }{
		{"", "empty"},
		{pipes + ",", "is not name:fd"},
		{pipes + fmt.Sprintf(",molt.file.pidlock=%d", c), "is not name:fd"},
		{pipes + fmt.Sprintf(",tableflip:%d", c), `unknown name "tableflip"`},
		{pipes + fmt.Sprintf(",molt.listener.:%d", c), "unknown name"},
		{pipes + fmt.Sprintf(",molt.listener.a b:%d", c), "unknown name"},
		{pipes + fmt.Sprintf(",molt.listener.a/../b:%d", c), "unknown name"},
		{pipes + ",molt.channel:x", "is not a number"},
		{pipes + ",molt.channel:2", "is not a number from 3 up"},
		{pipes + ",molt.channel:-5", "is not a number"},
		{pipes + fmt.Sprintf(",molt.channel:0%d", c), "is not a number"},
		{pipes + fmt.Sprintf(",molt.channel:%d,molt.channel:%d", c, d), "molt.channel named twice"},
		{pipes + fmt.Sprintf(",molt.channel:%d,molt.file.pidlock:%d", c, c), "named twice"},
		{pipes + fmt.Sprintf(",molt.channel:%d", closed), "is not open"},
		{fmt.Sprintf("molt.parent:%d,molt.channel:%d", b, c), "no molt.ready"},
		{fmt.Sprintf("molt.ready:%d", a), "no molt.parent"},
	} {
		_, err := parseHandoverEnv(tt.val)
		if err == nil {
			t.Errorf("parse %q: accepted", tt.val)
			continue
		}
		if !errors.Is(err, ErrHandoverEnv) || !strings.Contains(err.Error(), HandoverEnv) || !strings.Contains(err.Error(), tt.why) {
			t.Errorf("parse %q: error %q, want one naming %s that says %q", tt.val, err, HandoverEnv, tt.why)
		}
	}
}
