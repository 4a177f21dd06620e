package balancer

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"syscall"
	"time"

	"github.com/stickyd/stickyd/metrics"
)

// ServeTLS accepts TLS connections on ln until Shutdown, as Serve does plain ones. The
// edge terminates TLS: it reads the decrypted request heads and routes them as on a
// plain port; WebSockets are tunnelled (the edge holds the TLS state, so it cannot hand
// the socket to a worker) and proxied requests go to workers as usual.
func (b *Balancer) ServeTLS(ln net.Listener, cfg *tls.Config) error {
	return b.Serve(&tlsListener{Listener: ln, cfg: cfg})
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
	b.proxyConn(cc, nil)
}

// rawConn returns the socket under c: the connection itself, or a TLS connection's.
func rawConn(c net.Conn) net.Conn {
	if tc, ok := c.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return c
}
