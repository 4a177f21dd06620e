//go:build unix

package balancer

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/upgrade"
)

// tunnel proxies an upgraded connection byte for byte through a connection of the
// worker's own: a virtual connection to a worker that cannot take bytes the edge already
// read with a descriptor (Node), or a dialed connection to a backend reached by address
// (stickyd proxy), where Go's io.Copy between two sockets splices in the kernel. The edge
// stays in the data path for this one connection: between two plain sockets in an event
// loop (tunnelloop_linux.go: no goroutine per tunnel), otherwise (a TLS client, a Node
// worker's socketpair, not Linux) in two goroutines. It returns an error, with the client
// untouched, only when the worker could not be reached: the caller may pick another.
// Tunnels do not go over in an edge upgrade: a freeze (or a shutdown) closes them, and
// their clients reconnect to the next image.
func (b *Balancer) tunnel(cc *clientConn, w *workers.Worker, h *upgrade.Head, consumed []byte) error {
	c := cc.c
	// A backend at a TCP address, a plain client socket: all of it in the event loop.
	if handled, err := b.tunnelDialInLoop(cc, w, h, consumed); handled {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.HandoffTimeout)
	vc, err := w.DialVirtual(ctx)
	cancel()
	if err != nil {
		return err
	}
	defer c.Close()
	defer vc.Close()
	closed := func() {}
	if tc, ok := w.Channel().(interface{ TunnelOpened() func() }); ok {
		closed = tc.TunnelOpened()
	}
	inLoop := false
	defer func() {
		if !inLoop {
			closed()
		}
	}()
	w.NoteHandoff(time.Now())
	b.m.Handoffs.WithLabelValues(w.Label(), metrics.HandoffOK).Inc()
	b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptTunneled).Inc()
	// A tunnel counts as a connection mid-head for Freeze and Shutdown: their wake-up
	// (a read deadline in the past) ends its client-to-worker copy, and the tunnel then
	// closes both ends instead of holding the upgrade for its whole grace period.
	cc.state.Store(connHead)
	_, dials := w.Channel().(workers.Dialer)
	if dials {
		// A backend sees the edge as its peer: the head goes with X-Forwarded-For, as on
		// the per-request path. A peeked head is still in the socket: read it now, within
		// the head timeout.
		head := consumed
		if head == nil {
			head = make([]byte, h.Size)
			c.SetReadDeadline(time.Now().Add(b.cfg.HeadTimeout))
			_, err := io.ReadFull(c, head)
			c.SetReadDeadline(time.Time{})
			if err != nil {
				return nil // the client left; nothing to tunnel
			}
		}
		n := min(h.Size, len(head))
		bw := bufio.NewWriterSize(vc, n+256)
		peer := addrPort(c.RemoteAddr()).Addr()
		writeTunnelHead(bw, head[:n], peer, b.cfg.Rules.Trusts(peer), schemeOf(c))
		bw.Write(head[n:])
		if bw.Flush() != nil {
			return nil
		}
	} else if len(consumed) > 0 {
		// The worker's end is a socketpair: the client's address goes in a field of the
		// edge's own, right after the request line (a client's field of that name comes
		// later, and the preload reads the first).
		if i := bytes.IndexByte(consumed, '\n'); i > 0 {
			bw := bufio.NewWriterSize(vc, len(consumed)+96)
			bw.Write(consumed[:i+1])
			writeClientAddr(bw, addrPort(c.RemoteAddr()))
			bw.Write(consumed[i+1:])
			if bw.Flush() != nil {
				return nil
			}
		} else if _, err := vc.Write(consumed); err != nil {
			return nil
		}
	}
	// Between two plain sockets the tunnel goes to an event loop (tunnelloop_linux.go):
	// no goroutine, buffer or pipe per idle tunnel, and this goroutine ends now.
	if dials && b.tunnelInLoop(cc, c, vc, closed) {
		inLoop = true
		return nil
	}
	// One direction in a goroutine, the other in this one (a goroutine's stack is most
	// of what an idle tunnel costs). Whichever ends first during a freeze or a shutdown
	// closes both, so the other ends too.
	endIfFrozen := func() {
		if b.frozen() || b.isClosing() {
			c.Close()
			vc.Close()
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pipe(vc, c)
		endIfFrozen()
	}()
	pipe(c, vc)
	endIfFrozen()
	<-done
	return nil
}

// pipe copies one direction of a tunnel and half-closes the far side at the end. Between
// two TCP (or unix stream) sockets the bytes go by splice(2), never through user space,
// and an idle direction holds no pipe (copyWhenReadable).
func pipe(dst, src net.Conn) {
	copyWhenReadable(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
}
