//go:build unix

package balancer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/upgrade"
)

// ServeTLS accepts TLS connections on ln until Shutdown, as Serve does plain ones. The
// edge terminates TLS: it reads the decrypted request heads and routes them as on a
// plain port; WebSockets are tunnelled (the edge holds the TLS state, so it cannot hand
// the socket to a worker) and proxied requests go to workers as usual.
func (b *Balancer) ServeTLS(ln net.Listener, cfg *tls.Config) error {
	return b.Serve(TLSListener(ln, cfg))
}

// TLSListener wraps ln so that Serve terminates TLS on it with cfg.
func TLSListener(ln net.Listener, cfg *tls.Config) net.Listener {
	return &tlsListener{Listener: ln, cfg: cfg}
}

// IsTLSListener reports whether ln serves TLS (TLSListener): an edge handover tells the
// next image which of its listeners to wrap again.
func IsTLSListener(ln net.Listener) bool {
	_, ok := ln.(*tlsListener)
	return ok
}

// tlsListener wraps accepted connections in TLS. It keeps the inner listener's
// SetDeadline and descriptor, which an edge freeze and handover use.
type tlsListener struct {
	net.Listener
	cfg *tls.Config
}

func (l *tlsListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return tls.Server(c, l.cfg), nil
}

func (l *tlsListener) SetDeadline(t time.Time) error {
	if dl, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
		return dl.SetDeadline(t)
	}
	return errors.ErrUnsupported
}

func (l *tlsListener) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := l.Listener.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// serveTLSConn runs a client's TLS handshake under the head limits (HeadTimeout, the
// pending-heads cap), then serves its requests.
func (b *Balancer) serveTLSConn(cc *clientConn, tc *tls.Conn) {
	select {
	case b.pending <- struct{}{}:
	default:
		// No plain-text answer can reach a client that is still shaking hands.
		b.m.Rejections.WithLabelValues(metrics.RejectOverload).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		tc.NetConn().Close()
		return
	}
	deadline := time.Now().Add(b.cfg.HeadTimeout)
	tc.SetDeadline(deadline)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	<-b.pending
	if err != nil {
		b.m.Rejections.WithLabelValues(metrics.RejectTLSHandshake).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		b.log.Debug("TLS handshake failed", "client", tc.RemoteAddr().String(), "err", err)
		tc.NetConn().Close() // no close_notify to a peer that never finished the handshake
		return
	}
	tc.SetWriteDeadline(time.Time{})
	tc.SetReadDeadline(deadline) // the first request head, within the same bound
	b.proxyConn(cc, nil, false)  // a TLS connection is never parked idle: nothing to untrack elsewhere
}

// rawConn returns the socket under c: the connection itself, or a TLS connection's.
func rawConn(c net.Conn) net.Conn {
	if tc, ok := c.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return c
}

// SetRedirectHTTPS makes plain-HTTP connections answer 308 to https on port (the TLS
// listener's, known once it is bound); "" serves them again. Call it before Serve: the
// accept-loop fast path is chosen when Serve starts.
func (b *Balancer) SetRedirectHTTPS(port string) { b.redirect.Store(&port) }

func (b *Balancer) redirectPort() string {
	if p := b.redirect.Load(); p != nil {
		return *p
	}
	return b.cfg.RedirectHTTPS
}

// redirectHTTPS answers a plain-HTTP client with a permanent redirect to the same URL over
// https (RedirectHTTPS), and closes.
func (b *Balancer) redirectHTTPS(c net.Conn, h *upgrade.Head) {
	host := h.Host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		host = hh
	} else if strings.HasPrefix(host, "[") { // [v6] without a port
		host = strings.Trim(host, "[]")
	}
	if host == "" {
		b.reject(c, 400, "this port only redirects to https, and the request names no Host", true)
		return
	}
	if port := b.redirectPort(); port != "443" {
		host = net.JoinHostPort(host, port)
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	target := h.Target
	if len(target) == 0 || target[0] != '/' {
		target = h.Path
		if h.RawQuery != "" {
			target += "?" + h.RawQuery
		}
	}
	loc := "https://" + host + target
	body := "moved to " + loc + "\n"
	c.SetWriteDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(c, "HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s",
		loc, len(body), body)
	closeGracefully(c, true)
}
