package worker

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// selfSigned returns a TLS config for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "molt-test"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"h2", "http/1.1"}}, pool
}

// TestServeHTTP_DrainHTTP2SendsGoAwayAndLosesNothing: two TLS servers on
// one socket; an HTTP/2 client multiplexes requests on its connection to
// A while A drains. A's HTTP/2 connection gets GOAWAY, the client moves to
// a new connection (served by B), no request fails, and the drain ends
// long before the drain timeout: an HTTP/2 connection must not be waited
// for as if it were an idle HTTP/1 one.
func TestServeHTTP_DrainHTTP2SendsGoAwayAndLosesNothing(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	t.Setenv(EnvDrainTimeout, "20s")
	tlsConf, pool := selfSigned(t)
	shared, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()
	url := "https://" + shared.Addr().String() + "/"
	srvA, srvB := serverNamed("A", nil), serverNamed("B", nil)
	srvA.TLSConfig, srvB.TLSConfig = tlsConf.Clone(), tlsConf.Clone()
	lnA := tls.NewListener(dupListener(t, shared), srvA.TLSConfig)
	lnB := tls.NewListener(dupListener(t, shared), srvB.TLSConfig)
	go srvB.Serve(lnB)
	defer srvB.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- serveHTTP(ctx, srvA, nil, []net.Listener{lnA}) }()

	var client *http.Client
	for i := 0; i < 2000 && client == nil; i++ {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
		c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("negotiated %s, want HTTP/2", resp.Proto)
		}
		if resp.Header.Get("X-Server") == "A" {
			client = c
		} else {
			tr.CloseIdleConnections()
		}
	}
	if client == nil {
		t.Fatal("server A never got the HTTP/2 connection")
	}
	var failures, byA, byB atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				resp, err := client.Get(url)
				if err != nil {
					failures.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.Header.Get("X-Server") == "A" {
					byA.Add(1)
				} else {
					byB.Add(1)
				}
			}
		}()
	}
	for i := 0; byA.Load() < 50; i++ {
		if i == 1000 {
			t.Fatal("no HTTP/2 traffic on A")
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeHTTP: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the drain did not end within 15s")
	}
	drained := time.Since(start)
	bBefore := byB.Load()
	for i := 0; byB.Load() < bBefore+50; i++ {
		if i == 1000 {
			t.Fatal("the client did not move to server B")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Errorf("%d HTTP/2 requests failed during the drain", n)
	}
	if drained > 5*time.Second {
		t.Errorf("drain took %v: HTTP/2 connections must be drained by GOAWAY, not waited for", drained)
	}
	t.Logf("drain took %v; %d answers by A, %d by B", drained.Round(time.Millisecond), byA.Load(), byB.Load())
}
