//go:build unix

package balancer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA issues certificates for tests: a real chain, verified by real clients.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "stickyd test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue writes a leaf for names, valid until notAfter, to dir/base.{crt,key} through a
// rename, as cert-manager and certbot replace files.
func (ca *testCA) issue(t testing.TB, dir, base string, notAfter time.Time, names ...string) CertPair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:   time.Now().Add(-time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	p := CertPair{CertFile: filepath.Join(dir, base+".crt"), KeyFile: filepath.Join(dir, base+".key")}
	writeRenamed(t, p.CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeRenamed(t, p.KeyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	return p
}

func writeRenamed(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// tlsHandshake connects to addr as a client asking for serverName and returns the leaf it
// was shown and the negotiated protocol.
func tlsHandshake(t testing.TB, addr, serverName string, pool *x509.CertPool, protos ...string) (*x509.Certificate, string, error) {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: serverName, RootCAs: pool, NextProtos: protos})
	if err != nil {
		return nil, "", err
	}
	defer c.Close()
	st := c.ConnectionState()
	return st.PeerCertificates[0], st.NegotiatedProtocol, nil
}

// tlsServer accepts TLS connections with certs' configuration until the test ends.
func tlsServer(t *testing.T, certs *Certificates) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", certs.TLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c.(*tls.Conn).Handshake()
				c.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

func TestCertificatesBySNIAndReload(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	week := time.Now().Add(7 * 24 * time.Hour)
	a := ca.issue(t, dir, "a", week, "a.example", "localhost")
	b := ca.issue(t, dir, "b", week, "b.example", "*.b.example")
	expiry := map[string]time.Time{}
	certs := &Certificates{Pairs: []CertPair{a, b}, OnLoad: func(name string, notAfter time.Time) { expiry[name] = notAfter }}
	if err := certs.Load(); err != nil {
		t.Fatal(err)
	}
	if len(expiry) != 2 || expiry["a.example"].IsZero() {
		t.Fatalf("expiry reported: %v", expiry)
	}
	addr := tlsServer(t, certs)

	for sni, want := range map[string]string{"a.example": "a.example", "b.example": "b.example", "x.b.example": "b.example", "": "a.example", "other.example": "a.example"} {
		leaf, proto, err := tlsHandshake(t, addr, sni, ca.pool, "h2", "http/1.1")
		if sni == "other.example" || sni == "" {
			// The default certificate does not name these: a verifying client refuses it,
			// which is the point; look at what was shown without verifying.
			c, derr := tls.Dial("tcp", addr, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
			if derr != nil {
				t.Fatalf("SNI %q: %v", sni, derr)
			}
			leaf = c.ConnectionState().PeerCertificates[0]
			c.Close()
			err = nil
			proto = "http/1.1"
		}
		if err != nil {
			t.Fatalf("SNI %q: %v", sni, err)
		}
		if leaf.Subject.CommonName != want || proto != "http/1.1" {
			t.Errorf("SNI %q: got %s over %q, want %s over http/1.1", sni, leaf.Subject.CommonName, proto, want)
		}
	}
	// Verified against the test CA, over ALPN http/1.1 (h2 is never chosen).
	if _, proto, err := tlsHandshake(t, addr, "a.example", ca.pool, "h2", "http/1.1"); err != nil || proto != "http/1.1" {
		t.Fatalf("verified handshake: %v, protocol %q", err, proto)
	}
	// A client that speaks only h2 is refused cleanly (and falls back, in a browser).
	if _, _, err := tlsHandshake(t, addr, "a.example", ca.pool, "h2"); err == nil || !strings.Contains(err.Error(), "no application protocol") {
		t.Fatalf("h2-only client: %v, want no_application_protocol", err)
	}

	// Replaced through renames while serving: new handshakes see the new certificate.
	before, _, _ := tlsHandshake(t, addr, "a.example", ca.pool)
	ca.issue(t, dir, "a", week.Add(24*time.Hour), "a.example", "localhost")
	if n, err := certs.Reload(); n != 1 || err != nil {
		t.Fatalf("reload: %d changed, %v", n, err)
	}
	after, _, err := tlsHandshake(t, addr, "a.example", ca.pool)
	if err != nil || after.SerialNumber.Cmp(before.SerialNumber) == 0 {
		t.Fatalf("after the reload: %v, serial %v (before %v)", err, after.SerialNumber, before.SerialNumber)
	}
	if !expiry["a.example"].After(week) {
		t.Fatalf("expiry not updated: %v", expiry["a.example"])
	}

	// A broken new pair keeps the old one.
	writeRenamed(t, a.KeyFile, []byte("not a key"))
	if n, err := certs.Reload(); n != 0 || err == nil {
		t.Fatalf("broken pair: %d changed, %v", n, err)
	}
	still, _, err := tlsHandshake(t, addr, "a.example", ca.pool)
	if err != nil || still.SerialNumber.Cmp(after.SerialNumber) != 0 {
		t.Fatalf("after a broken reload: %v, want the previous certificate", err)
	}
}

func TestCertificatesLoadErrorsNameTheFile(t *testing.T) {
	if err := (&Certificates{}).Load(); err != ErrNoCertificate {
		t.Fatalf("no pairs: %v", err)
	}
	dir := t.TempDir()
	err := (&Certificates{Pairs: []CertPair{{CertFile: filepath.Join(dir, "missing.crt"), KeyFile: filepath.Join(dir, "missing.key")}}}).Load()
	if err == nil || !strings.Contains(err.Error(), "missing.crt") {
		t.Fatalf("missing files: %v", err)
	}
}
