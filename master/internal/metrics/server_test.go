package metrics

import (
	"bufio"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestServer_StopAnswersWhatItAccepted: a connection accepted just as
// serving stops is answered, and before Close returns (a master exits
// right after it). With http.Server.Shutdown, a request read after it
// began was dropped unanswered: the scrape met EOF (seen once in
// TestMetrics_CountersKeepCountingAcrossUpgrades, at the handover).
func TestServer_StopAnswersWhatItAccepted(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // f is a duplicate: the socket stays open
	s := NewServer(f)
	s.Publish(&Snapshot{})
	accepted, release := make(chan struct{}, 1), make(chan struct{})
	s.afterAccept = func() {
		accepted <- struct{}{}
		<-release
	}
	if err := s.Start(nil); err != nil {
		t.Fatal(err)
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("not accepted")
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	// Close must wait for the connection Serve has not seen yet: nothing
	// ends it during this window but a bug.
	select {
	case err := <-closed:
		close(release)
		t.Fatalf("Close returned (%v) before the accepted scrape was answered", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the scrape accepted before the stop: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status %d", resp.StatusCode)
	}
	select {
	case <-closed:
	case <-time.After(CloseWait + time.Second):
		t.Fatal("Close did not return")
	}
}
