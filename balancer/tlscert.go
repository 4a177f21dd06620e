//go:build unix

package balancer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// CertPair names a certificate chain and its key, PEM files as cert-manager and certbot
// write them.
type CertPair struct{ CertFile, KeyFile string }

// Certificates serves the edge's TLS certificates: every pair is loaded, a client's SNI
// picks the certificate whose names match (the first pair is the default for clients
// without SNI or with an unknown name), and the files are reloaded when they change —
// atomic renames included — without dropping anything: connections keep the
// certificate they started with, new handshakes get the new one. A pair that fails to
// load keeps the previous one and is logged. The zero value is unusable; set Pairs and
// call Load.
type Certificates struct {
	Pairs  []CertPair
	Logger *slog.Logger // nil: slog.Default()
	// OnLoad, if set, is told each certificate in use after every (re)load: its name
	// (the first DNS name, or the cert file) and when it expires.
	OnLoad func(name string, notAfter time.Time)

	reloadMu sync.Mutex
	set      atomic.Pointer[certSet]
}

type certSet struct {
	certs  []*tls.Certificate // by pair; never nil after a successful Load
	stamps []pairStamp
}

// pairStamp identifies the file contents a certificate was loaded from: a rename over
// the file changes the inode, an edit in place the size or the modification time.
type pairStamp [2]fileStamp

type fileStamp struct {
	ino, size int64
	mtime     time.Time
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = int64(sys.Ino)
	}
	return st, nil
}

// ErrNoCertificate means no certificate pair was configured.
var ErrNoCertificate = errors.New("balancer: TLS needs at least one certificate: give -tls-cert FILE -tls-key FILE")

// Load reads every pair; any failure is an error naming the pair (at start-up a broken
// certificate must stop the edge, not serve without it).
func (c *Certificates) Load() error {
	if len(c.Pairs) == 0 {
		return ErrNoCertificate
	}
	set := &certSet{certs: make([]*tls.Certificate, len(c.Pairs)), stamps: make([]pairStamp, len(c.Pairs))}
	for i, p := range c.Pairs {
		cert, st, err := loadPair(p)
		if err != nil {
			return err
		}
		set.certs[i], set.stamps[i] = cert, st
	}
	c.set.Store(set)
	c.report(set)
	return nil
}

func loadPair(p CertPair) (*tls.Certificate, pairStamp, error) {
	var st pairStamp
	var err error
	if st[0], err = stampOf(p.CertFile); err == nil {
		st[1], err = stampOf(p.KeyFile)
	}
	if err != nil {
		return nil, st, fmt.Errorf("TLS certificate %s / key %s: %w", p.CertFile, p.KeyFile, err)
	}
	cert, err := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
	if err != nil {
		return nil, st, fmt.Errorf("TLS certificate %s / key %s: %w", p.CertFile, p.KeyFile, err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, st, fmt.Errorf("TLS certificate %s: %w", p.CertFile, err)
		}
	}
	return &cert, st, nil
}

// Reload loads the pairs whose files changed since the last load. A pair that fails
// keeps its previous certificate; the errors are returned joined (and logged).
func (c *Certificates) Reload() (changed int, err error) {
	c.reloadMu.Lock()
	defer c.reloadMu.Unlock()
	old := c.set.Load()
	if old == nil {
		return 0, c.Load()
	}
	next := &certSet{certs: append([]*tls.Certificate(nil), old.certs...), stamps: append([]pairStamp(nil), old.stamps...)}
	var errs []error
	for i, p := range c.Pairs {
		var st pairStamp
		var e1, e2 error
		st[0], e1 = stampOf(p.CertFile)
		st[1], e2 = stampOf(p.KeyFile)
		if e1 == nil && e2 == nil && st == old.stamps[i] {
			continue
		}
		cert, st, err := loadPair(p)
		if err != nil {
			// Often a half-written pair (the cert renamed before the key): the next
			// look sees it whole. Until then the old certificate serves.
			errs = append(errs, err)
			continue
		}
		next.certs[i], next.stamps[i] = cert, st
		changed++
	}
	if changed > 0 {
		c.set.Store(next)
		c.report(next)
		c.logger().Info("TLS certificates reloaded", "changed", changed)
	}
	err = errors.Join(errs...)
	if err != nil {
		c.logger().Warn("TLS certificate reload failed; the previous certificate keeps serving", "err", err)
	}
	return changed, err
}

// Watch reloads changed files every interval (0: 2 s) until ctx ends.
func (c *Certificates) Watch(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = 2 * time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Reload()
		}
	}
}

func (c *Certificates) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

func (c *Certificates) report(set *certSet) {
	if c.OnLoad == nil {
		return
	}
	for i, cert := range set.certs {
		c.OnLoad(certName(cert, c.Pairs[i]), cert.Leaf.NotAfter)
	}
}

func certName(cert *tls.Certificate, p CertPair) string {
	if len(cert.Leaf.DNSNames) > 0 {
		return cert.Leaf.DNSNames[0]
	}
	return p.CertFile
}

// GetCertificate picks the certificate for a handshake (tls.Config.GetCertificate): the
// first whose names match the client's SNI, else the first pair's.
func (c *Certificates) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	set := c.set.Load()
	if set == nil {
		return nil, ErrNoCertificate
	}
	if hello.ServerName != "" {
		for _, cert := range set.certs {
			if hello.SupportsCertificate(cert) == nil && cert.Leaf.VerifyHostname(hello.ServerName) == nil {
				return cert, nil
			}
		}
	}
	return set.certs[0], nil
}

// TLSConfig is the edge's server configuration: TLS 1.2 and 1.3 with Go's default
// suites, HTTP/1.1 only over ALPN (a client that offers h2 too gets http/1.1; one that
// offers only h2 is refused with no_application_protocol and falls back), session
// tickets with keys Go generates and rotates itself, and no renegotiation (a Go server
// never renegotiates).
func (c *Certificates) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"http/1.1"},
		GetCertificate: c.GetCertificate,
	}
}

// Names lists the certificates in use, for logs.
func (c *Certificates) Names() string {
	set := c.set.Load()
	if set == nil {
		return ""
	}
	var names []string
	for i, cert := range set.certs {
		names = append(names, certName(cert, c.Pairs[i]))
	}
	return strings.Join(names, ",")
}
