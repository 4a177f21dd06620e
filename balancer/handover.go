//go:build unix

package balancer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
)

// parkExchange records an exchange for the next image; the caller leaves both
// connections open and untouched.
func (b *Balancer) parkExchange(px parkedExchange) bool {
	cfd, err := fdutil.Inherit(px.c)
	if err != nil {
		return false
	}
	vfd, err := fdutil.Inherit(px.vc)
	if err != nil {
		return false
	}
	px.st.Client.FD, px.st.Worker = cfd, vfd
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.frozen() {
		return false
	}
	b.handedX = append(b.handedX, px.st)
	b.parkedX = append(b.parkedX, px)
	return true
}

// The edge's part of an edge upgrade (package balancer/handover runs the whole): Freeze
// stops accepting (listeners stay open; new clients wait in the backlog) and parks the
// client connections it holds — between requests, or waiting for an answer that has not
// started — for the next image; Thaw undoes it after a failed exec; Adopt serves what a
// previous image parked. Handed-off WebSockets live in the workers and never notice.

// HandoverConn is a client connection handed to the next edge image between requests.
type HandoverConn struct {
	FD       int
	Buffered []byte `json:",omitempty"` // bytes already read from it (a pipelined request)
}

// HandoverExchange is a proxied request handed to the next edge image while its worker
// had not started to answer (a long-poll, typically): the request was sent whole, and
// the next image relays the answer, then serves the client connection on.
type HandoverExchange struct {
	Client     HandoverConn
	Worker     int // the edge's end of the virtual connection the request went out on
	Slot       int
	IsHead     bool `json:",omitempty"`
	Handshake  bool `json:",omitempty"`
	Close      bool `json:",omitempty"`
	Idempotent bool `json:",omitempty"`
	ProtoMinor int
}

// parkedExchange is a HandoverExchange with its connections, in either image.
type parkedExchange struct {
	c, vc net.Conn
	st    HandoverExchange
}

// ErrFrozen is returned by Serve when the edge froze for an upgrade; its listener stays open.
var ErrFrozen = errors.New("balancer: frozen for an edge upgrade")

func (b *Balancer) frozen() bool { return b.freezing.Load() }

// Freeze stops accepting and waits, up to ctx, until every connection the edge holds is
// finished or parked: between requests, or with a request whose answer has not started
// (a long-poll: the next image relays the answer). Listeners are taken at once, so new
// clients wait in the backlog only for the exec. It returns the listeners (still open),
// the parked connections and exchanges. On error the edge is thawed and serving again.
func (b *Balancer) Freeze(ctx context.Context) ([]net.Listener, []HandoverConn, []HandoverExchange, error) {
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return nil, nil, nil, ErrClosed
	}
	b.freezing.Store(true)
	b.frozenLns = nil
	b.handed = nil
	b.handedX = nil
	for ln := range b.listeners {
		b.frozenLns = append(b.frozenLns, ln)
	}
	for ln := range b.listeners {
		if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			dl.SetDeadline(time.Unix(1, 0)) // wakes Accept without closing the socket
		}
	}
	for _, lf := range b.rawLns {
		lf.SetReadDeadline(time.Unix(1, 0))
	}
	b.wakeIdle()
	b.mu.Unlock()

	// Polled rather than waited on b.wg: after a failed freeze, connections admitted
	// again would race a Wait still running.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		b.mu.Lock()
		if len(b.conns) == 0 {
			lns, conns, xs := b.frozenLns, b.handed, b.handedX
			b.mu.Unlock()
			return lns, conns, xs, nil
		}
		b.wakeIdle() // requests that finished since are parked now
		b.mu.Unlock()
		select {
		case <-tick.C:
		case <-ctx.Done():
			b.Thaw()
			return nil, nil, nil, fmt.Errorf("balancer: requests still in flight (a request body or a response being streamed): %w", ctx.Err())
		}
	}
}

// Thaw undoes Freeze after a failed upgrade: the edge serves its listeners, the parked
// connections and the parked exchanges again.
func (b *Balancer) Thaw() {
	b.mu.Lock()
	lns, conns := b.frozenLns, b.handed
	b.frozenLns, b.handed, b.handedX = nil, nil, nil
	b.freezing.Store(false)
	for ln := range b.listeners {
		if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			dl.SetDeadline(time.Time{})
		}
	}
	parked, parkedX := b.parked, b.parkedX
	b.parked, b.parkedX = nil, nil
	b.mu.Unlock()
	for _, ln := range lns {
		if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			dl.SetDeadline(time.Time{})
		}
		if sc, ok := ln.(syscall.Conn); ok {
			fdutil.CloseOnExec(sc)
		}
		go b.Serve(ln)
	}
	// The parked connections are still open in this image: serve them again.
	for i, c := range parked {
		fdutil.CloseOnExec(c.(syscall.Conn))
		b.resume(c, conns[i].Buffered)
	}
	for _, px := range parkedX {
		fdutil.CloseOnExec(px.c.(syscall.Conn))
		fdutil.CloseOnExec(px.vc.(syscall.Conn))
		b.resumeExchange(px)
	}
}

// park hands a client connection to the next edge image instead of closing it. The
// caller's goroutine ends without touching c again.
func (b *Balancer) park(c net.Conn, buffered []byte) bool {
	if _, ok := c.(*tls.Conn); ok {
		// A TLS session's keys live in this image and cannot cross the exec: the
		// connection closes between requests, and the client opens a new one (browsers
		// and HTTP clients retry a request on a kept-alive connection that closed).
		c.Close()
		return true
	}
	fd, err := fdutil.Inherit(c)
	if err != nil {
		return false
	}
	b.mu.Lock()
	b.handed = append(b.handed, HandoverConn{FD: fd, Buffered: append([]byte(nil), buffered...)})
	b.parked = append(b.parked, c) // keeps the descriptor open until the exec
	b.mu.Unlock()
	return true
}

// Adopt serves connections and exchanges a previous edge image parked.
func (b *Balancer) Adopt(conns []HandoverConn, xs []HandoverExchange) {
	for _, hx := range xs {
		c, err := adoptConn(hx.Client.FD, "client")
		if err != nil {
			b.log.Warn("adopting a client connection with a request in flight failed", "err", err)
			unix.Close(hx.Worker)
			continue
		}
		vc, err := adoptConn(hx.Worker, "worker")
		if err != nil {
			b.log.Warn("adopting a worker connection with a request in flight failed", "err", err)
			c.Close()
			continue
		}
		b.resumeExchange(parkedExchange{c: c, vc: vc, st: hx})
	}
	for _, hc := range conns {
		f := os.NewFile(uintptr(hc.FD), "client")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			b.log.Warn("adopting a client connection failed", "err", err)
			continue
		}
		b.resume(c, hc.Buffered)
	}
}

func adoptConn(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return net.FileConn(f)
}

// resumeExchange relays the answer of a parked exchange, then serves its client
// connection on.
func (b *Balancer) resumeExchange(px parkedExchange) {
	c := px.c
	if len(px.st.Client.Buffered) > 0 {
		c = &prefixConn{Conn: c, pending: px.st.Client.Buffered}
	}
	cc := &clientConn{c: c}
	if b.track(cc) != trackOK {
		c.Close()
		px.vc.Close()
		return
	}
	cc.state.Store(connActive)
	px.c = c
	go func() {
		if !b.proxyConn(cc, &px, false) {
			b.untrack(cc)
		}
	}()
}

// resume serves a parked connection: from its head if nothing of it was read, else
// through the proxy loop with the bytes already read replayed first.
func (b *Balancer) resume(c net.Conn, buffered []byte) {
	if len(buffered) > 0 {
		c = &prefixConn{Conn: c, pending: buffered}
	}
	cc := &clientConn{c: c}
	if b.track(cc) != trackOK {
		c.Close()
		return
	}
	if len(buffered) > 0 {
		go func() {
			if !b.proxyConn(cc, nil, false) {
				b.untrack(cc)
			}
		}()
	} else {
		go b.serveConn(cc)
	}
}

// prefixConn replays bytes a previous image had read before the socket's own.
type prefixConn struct {
	net.Conn
	pending []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

func (p *prefixConn) SyscallConn() (syscall.RawConn, error) {
	return p.Conn.(syscall.Conn).SyscallConn()
}

func (p *prefixConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// InheritFD marks a descriptor to survive the exec of the next image and returns it.
func InheritFD(c any) (int, error) { return fdutil.Inherit(c) }
