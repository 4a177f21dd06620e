//go:build unix

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// tlsRig is a test CA and a certificate for localhost/127.0.0.1 issued by it, on disk.
type tlsRig struct {
	dir, caFile, cert, key string
	caCert                 *x509.Certificate
	caKey                  *ecdsa.PrivateKey
	pool                   *x509.CertPool
}

func newTLSRig(t *testing.T) *tlsRig {
	t.Helper()
	r := &tlsRig{dir: t.TempDir()}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "stickyd e2e CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	r.caCert, _ = x509.ParseCertificate(der)
	r.caKey = key
	r.pool = x509.NewCertPool()
	r.pool.AddCert(r.caCert)
	r.caFile = filepath.Join(r.dir, "ca.pem")
	os.WriteFile(r.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	r.cert, r.key = filepath.Join(r.dir, "edge.crt"), filepath.Join(r.dir, "edge.key")
	r.issue(t)
	return r
}

// issue writes a new leaf for localhost and 127.0.0.1 over the edge's files, through
// renames (as cert-manager and certbot do), and returns its serial number.
func (r *tlsRig) issue(t *testing.T) *big.Int {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(30 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.caCert, &key.PublicKey, r.caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	// The key first: a watcher that sees only the new key keeps the old pair (it does
	// not load), and the next look sees both.
	for path, data := range map[string][]byte{
		r.key:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
		r.cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
	} {
		if err := os.WriteFile(path+".tmp", data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(err)
		}
	}
	return serial
}

func (r *tlsRig) client() *tls.Config { return &tls.Config{RootCAs: r.pool, ServerName: "localhost"} }

// tlsAddr waits for the daemon's second "edge listening" line: its TLS listener.
func tlsAddr(t *testing.T, d *daemon) string {
	t.Helper()
	var addr string
	waitFor(t, "the TLS listener", 30*time.Second, func() bool {
		for _, m := range listenRE.FindAllStringSubmatch(d.logs.String(), -1) {
			if m[1] != d.addr {
				addr = m[1]
				return true
			}
		}
		return false
	})
	return addr
}

func serialAt(t *testing.T, addr string, cfg *tls.Config) *big.Int {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("TLS handshake with the edge: %v", err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber
}

func rejections(t *testing.T, d *daemon, reason string) float64 {
	t.Helper()
	return sioSum(sioScrape(t, d), "stickyd_rejections_total", map[string]string{"reason": reason})
}

// TestTLSEdge: `stickyd demo` terminating TLS — https requests, wss:// WebSockets
// through the edge, a certificate replaced on disk under 100 open wss:// connections
// (none dropped, new handshakes get the new certificate), hostile handshakes closed and
// counted while the edge keeps serving, and the plain port redirecting to https.
func TestTLSEdge(t *testing.T) {
	r := newTLSRig(t)
	d := startDaemon(t, "", "demo", "-tls-listen", "127.0.0.1:0", "-tls-cert", r.cert, "-tls-key", r.key,
		"-redirect-https", "-head-timeout", "2s", "-tls-watch", "200ms")
	addr := tlsAddr(t, d)
	httpc := &http.Client{Transport: &http.Transport{TLSClientConfig: r.client(), ForceAttemptHTTP2: true}, Timeout: 10 * time.Second}

	resp, err := httpc.Get("https://" + addr + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Proto != "HTTP/1.1" || !strings.Contains(string(body), `"worker"`) {
		t.Fatalf("https: %s %s %q", resp.Proto, resp.Status, body)
	}

	// 100 wss:// connections, each echoing through the edge's tunnel.
	dialer := websocket.Dialer{TLSClientConfig: r.client(), HandshakeTimeout: 10 * time.Second}
	conns := make([]*websocket.Conn, 100)
	for i := range conns {
		c, _, err := dialer.Dial("wss://"+addr+"/ws", nil)
		if err != nil {
			t.Fatalf("wss %d: %v", i, err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, hello, err := c.ReadMessage(); err != nil || !strings.Contains(string(hello), `"hello"`) {
			t.Fatalf("wss %d hello: %q %v", i, hello, err)
		}
		conns[i] = c
	}
	echo := func(stage string) {
		t.Helper()
		for i, c := range conns {
			msg := fmt.Sprintf("%s %d", stage, i)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
				t.Fatalf("%s: wss %d: %v", stage, i, err)
			}
			if _, got, err := c.ReadMessage(); err != nil || string(got) != msg {
				t.Fatalf("%s: wss %d echoed %q %v", stage, i, got, err)
			}
		}
	}
	echo("before")

	old := serialAt(t, addr, r.client())
	fresh := r.issue(t)
	if fresh.Cmp(old) == 0 {
		t.Fatal("the test issued the same serial twice")
	}
	waitFor(t, "new handshakes to present the new certificate", 15*time.Second, func() bool {
		return serialAt(t, addr, r.client()).Cmp(fresh) == 0
	})
	echo("after the certificate changed") // none of the 100 dropped

	// Hostile input: each a clean close and a count, the edge still serving.
	before := rejections(t, d, "tls_handshake")
	garbage := func(payload []byte) {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(payload)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("after %q: %v, want the edge to close", payload[:min(len(payload), 16)], err)
		}
	}
	garbage([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))                                         // plain HTTP on the TLS port
	garbage(append([]byte{0x16, 0x03, 0x01, 0x00, 0x40}, []byte(strings.Repeat("\xff", 64))...)) // a broken ClientHello
	garbage(nil)                                                                                 // a slow handshake: nothing at all, cut at -head-timeout
	if c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "nothing.invalid", InsecureSkipVerify: true}); err != nil {
		t.Fatalf("unknown SNI: %v, want the default certificate", err)
	} else {
		c.Close()
	}
	if _, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "localhost", RootCAs: r.pool, NextProtos: []string{"h2"}}); err == nil {
		t.Fatal("an h2-only client was accepted")
	}
	waitFor(t, "the hostile handshakes to be counted", 10*time.Second, func() bool {
		return rejections(t, d, "tls_handshake")-before >= 4
	})
	echo("after hostile clients")

	// An edge upgrade keeps the TLS listener TLS (the next image wraps it again); the
	// wss:// tunnels, whose TLS sessions live in the edge image, are cut and reconnect.
	d.signal(syscall.SIGUSR2)
	waitFor(t, "the upgraded edge", 30*time.Second, func() bool {
		resp, err := http.Get("http://" + d.metrics + "/admin/workers")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var v struct{ Generation int }
		json.NewDecoder(resp.Body).Decode(&v)
		return v.Generation == 1
	})
	if resp, err := httpc.Get("https://" + addr + "/whoami"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("https after an edge upgrade: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if c, _, err := dialer.Dial("wss://"+addr+"/ws", nil); err != nil {
		t.Fatalf("wss after an edge upgrade: %v", err)
	} else {
		c.Close()
	}

	// The plain port sends browsers to https.
	plain := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }, Timeout: 10 * time.Second}
	resp, err = plain.Get("http://" + d.addr + "/whoami?x=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(addr)
	if want := "https://127.0.0.1:" + port + "/whoami?x=1"; resp.StatusCode != 308 || resp.Header.Get("Location") != want {
		t.Fatalf("plain port: %s Location %q, want 308 %s", resp.Status, resp.Header.Get("Location"), want)
	}
}

// TestTLSSocketIOClients: 200 socket.io clients over https, polling then the WebSocket
// upgrade, sessions sticky through the edge's TLS.
func TestTLSSocketIOClients(t *testing.T) {
	dir := nodeFixtures(t)
	r := newTLSRig(t)
	t.Setenv("NODE_EXTRA_CA_CERTS", r.caFile) // Node's clients trust the test CA
	d := startDaemon(t, dir, "run", "-workers", "4", "-tls-listen", "127.0.0.1:0", "-tls-cert", r.cert, "-tls-key", r.key,
		"--", "node", "server-listen.js")
	addr := tlsAddr(t, d)
	sioWaitWorkers(t, d, 4, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res := runClients(t, ctx, "--url", "https://localhost:"+strings.TrimPrefix(addr, "127.0.0.1:"), "--timeout-ms", "120000",
		"--clients", "200", "--expect-upgrade", "--messages", "3")
	checkAllClientsOK(t, res, true, false)
	sioCheckSpread(t, res, 4)
}

// TestTLSFlagsNameTheFix: TLS flags that do not go together fail the start with the fix.
func TestTLSFlagsNameTheFix(t *testing.T) {
	r := newTLSRig(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-tls-cert", r.cert}, "give them in pairs"},
		{[]string{"-tls-cert", r.cert, "-tls-key", r.key}, "needs -tls-listen"},
		{[]string{"-tls-listen", "127.0.0.1:0"}, "need -tls-cert"},
		{[]string{"-tls-listen", "127.0.0.1:0", "-tls-cert", r.cert, "-tls-key", r.cert}, r.cert},
	} {
		var stderr strings.Builder
		err := run(context.Background(), append([]string{"demo", "-listen", "127.0.0.1:0", "-metrics", ""}, tc.args...), io.Discard, &stderr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error naming %q", tc.args, err, tc.want)
		}
	}
}

// TestTLSDemoPageInChromium: the demo page over https in a real Chromium that trusts the
// edge's certificate opens its wss:// WebSocket through the edge.
func TestTLSDemoPageInChromium(t *testing.T) {
	r := newTLSRig(t)
	d := startDaemon(t, "", "demo", "-tls-listen", "127.0.0.1:0", "-tls-cert", r.cert, "-tls-key", r.key)
	addr := tlsAddr(t, d)
	pemBytes, err := os.ReadFile(r.cert)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemBytes)
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	t.Setenv("CHROMIUM_SPKI", base64.StdEncoding.EncodeToString(spki[:]))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, port, _ := net.SplitHostPort(addr)
	res := runDemoPage(t, ctx, "https://localhost:"+port+"/", 4)
	if res.Connected != 4 || res.Echoed != 4 {
		t.Fatalf("demo page over https: %+v", res)
	}
}

// TestTLSReloadOnAdminCall: with file watching off, `POST /admin/reload` (stickyd
// reload, SIGHUP) puts a renewed certificate in force.
func TestTLSReloadOnAdminCall(t *testing.T) {
	r := newTLSRig(t)
	d := startDaemon(t, "", "demo", "-tls-listen", "127.0.0.1:0", "-tls-cert", r.cert, "-tls-key", r.key, "-tls-watch", "0")
	addr := tlsAddr(t, d)
	old := serialAt(t, addr, r.client())
	fresh := r.issue(t)
	if got := serialAt(t, addr, r.client()); got.Cmp(old) != 0 {
		t.Fatalf("the certificate changed without a reload (watching is off)")
	}
	out, err := exec.Command(stickydBinary(t), "reload", d.metrics).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "TLS certificates: 1 reloaded") {
		t.Fatalf("stickyd reload: %v\n%s", err, out)
	}
	if got := serialAt(t, addr, r.client()); got.Cmp(fresh) != 0 {
		t.Fatalf("after the reload the edge shows serial %v, want %v", got, fresh)
	}
}
