package balancer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/nodeipc"
	"github.com/stickyd/stickyd/sticky"
)

// An edge upgrade replaces the edge's program image in place (execve): the pid stays, so
// the workers stay its children and systemd, Docker (pid 1) and terminals see one process
// throughout. Before the exec the edge freezes: it stops accepting (listeners stay open;
// new clients wait in the backlog), lets in-flight heads and proxied requests finish, and
// collects every descriptor the next image needs — listeners, the keep-alive client
// connections it holds between requests, worker channels and output pipes — with the
// learned session table. Handed-off WebSockets live in the workers and never notice.

// HandoverConn is a client connection handed to the next edge image between requests.
type HandoverConn struct {
	FD       int
	Buffered []byte `json:",omitempty"` // bytes already read from it (a pipelined request)
}

// HandoverWorker is a worker process handed to the next edge image.
type HandoverWorker struct {
	Slot, PID               int
	Kind                    string                // "go" or "node"
	Channel, Stdout, Stderr int                   // descriptors
	Node                    *nodeipc.PrimaryState `json:",omitempty"` // a Node worker's IPC state
}

// HandoverState is everything the next edge image adopts.
type HandoverState struct {
	Generation int
	Listeners  []int
	Conns      []HandoverConn
	Supervisor SupervisorHandover
	Sessions   []sticky.Entry
}

// ErrFrozen is returned by Serve when the edge froze for an upgrade; its listener stays open.
var ErrFrozen = errors.New("balancer: frozen for an edge upgrade")

func (b *Balancer) frozen() bool { return b.freezing.Load() }

// Freeze stops accepting and waits, up to ctx, until every connection the edge holds is
// either finished or parked between requests; parked ones are handed over. It returns
// the listeners (still open) and the parked connections. On error the edge is thawed.
func (b *Balancer) Freeze(ctx context.Context) ([]net.Listener, []HandoverConn, error) {
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return nil, nil, ErrClosed
	}
	b.freezing.Store(true)
	b.frozenLns = nil
	b.handed = nil
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

	waited := make(chan struct{})
	go func() { b.wg.Wait(); close(waited) }()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-waited:
			b.mu.Lock()
			lns, conns := b.frozenLns, b.handed
			b.mu.Unlock()
			return lns, conns, nil
		case <-tick.C:
			b.mu.Lock()
			b.wakeIdle() // requests that finished since are parked now
			b.mu.Unlock()
		case <-ctx.Done():
			b.Thaw()
			<-waited
			return nil, nil, fmt.Errorf("balancer: requests still in flight: %w", ctx.Err())
		}
	}
}

// Thaw undoes Freeze after a failed upgrade: the edge serves its listeners and the parked
// connections again.
func (b *Balancer) Thaw() {
	b.mu.Lock()
	lns, conns := b.frozenLns, b.handed
	b.frozenLns, b.handed = nil, nil
	b.freezing.Store(false)
	for ln := range b.listeners {
		if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			dl.SetDeadline(time.Time{})
		}
	}
	parked := b.parked
	b.parked = nil
	b.mu.Unlock()
	for _, ln := range lns {
		if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			dl.SetDeadline(time.Time{})
		}
		if sc, ok := ln.(syscall.Conn); ok {
			closeOnExec(sc)
		}
		go b.Serve(ln)
	}
	// The parked connections are still open in this image: serve them again.
	for i, c := range parked {
		closeOnExec(c.(syscall.Conn))
		b.resume(c, conns[i].Buffered)
	}
}

// park hands a client connection to the next edge image instead of closing it. The
// caller's goroutine ends without touching c again.
func (b *Balancer) park(c net.Conn, buffered []byte) bool {
	fd, err := rawFD(c)
	if err != nil {
		return false
	}
	b.mu.Lock()
	b.handed = append(b.handed, HandoverConn{FD: fd, Buffered: append([]byte(nil), buffered...)})
	b.parked = append(b.parked, c) // keeps the descriptor open until the exec
	b.mu.Unlock()
	return true
}

// Adopt serves connections a previous edge image parked.
func (b *Balancer) Adopt(conns []HandoverConn) {
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
		go func() { defer b.untrack(cc); b.proxyConn(cc) }()
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

// rawFD returns c's descriptor, marked to survive execve. The descriptor stays owned by
// c; nothing is duplicated, so nothing changes on the shared file description.
func rawFD(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, errors.New("balancer: connection has no descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var ferr error
	err = raw.Control(func(u uintptr) {
		fd = int(u)
		_, ferr = unix.FcntlInt(u, unix.F_SETFD, 0)
	})
	if err == nil {
		err = ferr
	}
	return fd, err
}

// InheritFD marks a descriptor to survive the exec of the next image and returns it.
func InheritFD(c any) (int, error) { return rawFD(c) }
