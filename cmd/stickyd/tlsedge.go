//go:build unix

package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/handover"
	"github.com/stickyd/stickyd/metrics"
)

// tlsFlags are the flags of TLS at the edge (every mode).
type tlsFlags struct {
	certs, keys   fileList
	listen        string
	redirectHTTPS bool
	watch         time.Duration
}

func (t *tlsFlags) register(fs *flag.FlagSet) {
	fs.Var(&t.certs, "tls-cert", "TLS certificate chain (PEM); repeat with -tls-key for several, picked by SNI (the first is the default)")
	fs.Var(&t.keys, "tls-key", "the key of the -tls-cert at the same position (PEM)")
	fs.StringVar(&t.listen, "tls-listen", "", "address of the TLS listener (wss://, https://), next to -listen's plain one (-listen \"\" for TLS only)")
	fs.BoolVar(&t.redirectHTTPS, "redirect-https", false, "the plain -listen answers every request with a 308 to the same URL on -tls-listen")
	fs.DurationVar(&t.watch, "tls-watch", 2*time.Second, "how often the certificate files are checked for changes (renames included); 0: only on reload")
}

// fileList is a repeatable flag of paths (also "a,b" from the environment or config file).
type fileList []string

func (l *fileList) String() string { return strings.Join(*l, ",") }

func (l *fileList) Set(v string) error {
	for item := range strings.SplitSeq(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			*l = append(*l, item)
		}
	}
	return nil
}

var errTLSFlags = errors.New("TLS flags")

// enabled reports whether TLS is configured, checking the flags go together.
func (t *tlsFlags) enabled() (bool, error) {
	switch {
	case len(t.certs) != len(t.keys):
		return false, fmt.Errorf("%w: %d -tls-cert but %d -tls-key: give them in pairs", errTLSFlags, len(t.certs), len(t.keys))
	case len(t.certs) > 0 && t.listen == "":
		return false, fmt.Errorf("%w: -tls-cert needs -tls-listen ADDR (e.g. -tls-listen :8443)", errTLSFlags)
	case len(t.certs) == 0 && (t.listen != "" || t.redirectHTTPS):
		return false, fmt.Errorf("%w: -tls-listen and -redirect-https need -tls-cert FILE -tls-key FILE", errTLSFlags)
	}
	return len(t.certs) > 0, nil
}

// tlsPort is the port of the first TLS listener, where -redirect-https sends clients.
func tlsPort(lns []net.Listener) string {
	for _, ln := range lns {
		if balancer.IsTLSListener(ln) {
			if _, port, err := net.SplitHostPort(ln.Addr().String()); err == nil {
				return port
			}
		}
	}
	return "443"
}

// edgeTLS is TLS at the edge once set up: the certificates and their configuration.
type edgeTLS struct {
	certs *balancer.Certificates
	cfg   *tls.Config
}

// setup loads the certificates (a broken pair stops the start, naming the file), reports
// their expiry, and watches their files until ctx ends.
func (t *tlsFlags) setup(ctx context.Context, m *metrics.Metrics, log *slog.Logger) (*edgeTLS, error) {
	on, err := t.enabled()
	if err != nil || !on {
		return nil, err
	}
	certs := &balancer.Certificates{Logger: log, OnLoad: func(name string, notAfter time.Time) {
		m.TLSCertExpiry.WithLabelValues(name).Set(float64(notAfter.Unix()))
		if until := time.Until(notAfter); until < 14*24*time.Hour {
			log.Warn("TLS certificate expires soon", "name", name, "not_after", notAfter, "in", until.Round(time.Hour))
		}
	}}
	for i := range t.certs {
		certs.Pairs = append(certs.Pairs, balancer.CertPair{CertFile: t.certs[i], KeyFile: t.keys[i]})
	}
	if err := certs.Load(); err != nil {
		return nil, fmt.Errorf("-tls-cert/-tls-key: %w", err)
	}
	if t.watch > 0 {
		go certs.Watch(ctx, t.watch)
	}
	log.Info("TLS certificates loaded", "names", certs.Names())
	return &edgeTLS{certs: certs, cfg: certs.TLSConfig()}, nil
}

// listeners returns the client listeners to serve, TLS ones wrapped: inherited from a
// previous image (its TLS ones named in prev.TLS), or plain ones plus a new TLS listener.
func (e *edgeTLS) listeners(ctx context.Context, lns []net.Listener, prev *handover.State, tlsAddr string) ([]net.Listener, error) {
	if prev != nil {
		out := make([]net.Listener, len(lns))
		for i, ln := range lns {
			out[i] = ln
			if i < len(prev.Listeners) && slices.Contains(prev.TLS, prev.Listeners[i]) {
				if e == nil {
					return nil, fmt.Errorf("the previous edge served TLS on %s: give -tls-cert and -tls-key (or restart without TLS)", ln.Addr())
				}
				out[i] = balancer.TLSListener(ln, e.cfg)
			}
		}
		return out, nil
	}
	if e == nil {
		return lns, nil
	}
	tl, err := balancer.ListenConfig{}.Listen(ctx, tlsAddr)
	if err != nil {
		return nil, fmt.Errorf("-tls-listen: %w", err)
	}
	for _, ln := range tl {
		lns = append(lns, balancer.TLSListener(ln, e.cfg))
	}
	return lns, nil
}
