//go:build unix

package balancer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/platform"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/upgrade"
)

// The fast path: most WebSocket clients send their upgrade request at once, so by the time
// accept returns (TCP_DEFER_ACCEPT helps) the whole head is in the socket. The edge then
// peeks, routes and hands the raw descriptor to a Go worker right in the accept loop: no
// net.Conn, no poller registration and removal, no setsockopt, no goroutine to wake. Every
// other case (partial head, plain HTTP, a Node worker, a full worker channel) takes the
// general path, which is unchanged.

// serveTCP is Serve for TCP listeners.
func (b *Balancer) serveTCP(ln *net.TCPListener) error {
	// A listener's RawConn offers Control only, so accept4 runs on a non-blocking duplicate
	// wrapped in an os.File, whose RawConn waits in the poller. Shutdown and Freeze reach
	// it through b.rawLns.
	lrc, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	dup := -1
	var derr error
	if err := lrc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return err
	}
	if derr != nil {
		return fmt.Errorf("balancer: duplicate listener: %w", derr)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return err
	}
	lf := os.NewFile(uintptr(dup), "listener")
	defer lf.Close()
	b.mu.Lock()
	if b.closing || b.frozen() {
		b.mu.Unlock()
		return ErrClosed
	}
	b.rawLns[ln] = lf
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.rawLns, ln)
		b.mu.Unlock()
	}()
	rc, err := lf.SyscallConn()
	if err != nil {
		return err
	}
	local := addrPort(ln.Addr())
	wildcard := local.Addr().IsUnspecified()
	var delay time.Duration
	for {
		nfd := -1
		var sa unix.Sockaddr
		var aerr error
		err := rc.Read(func(fd uintptr) bool {
			nfd, sa, aerr = platform.Accept(int(fd))
			return !errors.Is(aerr, unix.EAGAIN) // EAGAIN: park until the next client
		})
		if err != nil {
			switch {
			case b.isClosing():
				return ErrClosed
			case b.frozen():
				return ErrFrozen
			}
			return fmt.Errorf("balancer: accept on %s: %w", ln.Addr(), err)
		}
		if aerr != nil {
			if errors.Is(aerr, unix.EINTR) || errors.Is(aerr, unix.ECONNABORTED) {
				continue
			}
			if fdutil.TemporaryAccept(aerr) {
				if !b.backOff(&delay, aerr) {
					return ErrClosed
				}
				continue
			}
			return fmt.Errorf("balancer: accept on %s: %w", ln.Addr(), aerr)
		}
		peer := sockaddrAddrPort(sa)
		if b.fastHandoff(nfd, peer, local, wildcard) {
			delay = 0
			continue
		}
		c, err := fdConn(nfd)
		if err != nil {
			// Out of descriptors for the general path (it duplicates the socket): the
			// client is shed, as at accept, and the loop backs off until fds are free.
			b.m.Rejections.WithLabelValues(metrics.RejectOverload).Inc()
			if !b.backOff(&delay, err) {
				return ErrClosed
			}
			continue
		}
		delay = 0
		if !b.admit(c) {
			return ErrClosed
		}
	}
}

// fastHandoff hands nfd to a Go worker if its complete WebSocket upgrade head is already
// there and the worker's channel takes it without waiting, or to a tunnel loop if the
// route is a backend reached by address (fastTunnel). It reports true when nfd is no
// longer the caller's; otherwise nfd is untouched and the general path takes over.
func (b *Balancer) fastHandoff(nfd int, peer, local netip.AddrPort, wildcard bool) bool {
	if b.frozen() {
		return false // nothing new starts; the general path parks or answers it
	}
	// Per-address limits need the connection tracked: a descriptor handed to a worker
	// leaves the edge untracked, so only tunnels (tracked by fastTunnel) take the fast
	// path then — decided before the route where possible, since routing a client twice
	// counts a keyless route twice.
	perIP := b.cfg.MaxConnsPerIP > 0
	if perIP && !onlyBackends(b.Workers()) {
		return false
	}
	pb := getPeekBuf(b.cfg.MaxHeadBytes)
	defer putPeekBuf(pb)
	n, _, err := unix.Recvfrom(nfd, pb.buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err != nil || n <= 0 {
		return false
	}
	if upgrade.ParseInto(&pb.head, pb.buf[:n], b.cfg.MaxHeadBytes) != nil || !pb.head.WebSocket {
		return false
	}
	r := b.route(&pb.head, peer.Addr(), 0)
	if r.unknownSID || r.w == nil {
		return false
	}
	if _, dials := r.w.Channel().(workers.Dialer); dials {
		return b.fastTunnel(nfd, peer, local, &pb.head, pb.buf[:n], &r)
	}
	if perIP {
		return false // a pool of workers taking descriptors beside the backends
	}
	ts, ok := r.w.Channel().(workers.TrySender)
	if !ok {
		return false // Node's handle protocol waits for an acknowledgement
	}
	if wildcard {
		if sa, err := unix.Getsockname(nfd); err == nil {
			local = sockaddrAddrPort(sa)
		}
	}
	start := time.Now()
	meta := fdpass.Meta{Kind: fdpass.KindConn, ConnID: b.connID.Add(1), Remote: peer, Local: local}
	// One non-blocking sendmsg: a full channel sends this client down the general path,
	// which waits for the worker with a deadline or picks another.
	if err := ts.TrySend(nfd, meta); err != nil {
		return false
	}
	unix.Close(nfd) // the worker holds its own descriptor now
	b.handedOff(r.w, start)
	return true
}

// onlyBackends reports whether every worker in ws is a backend reached by address
// (stickyd proxy), which the fast path tunnels, tracked.
func onlyBackends(ws []*workers.Worker) bool {
	for _, w := range ws {
		if _, ok := w.Channel().(workers.Dialer); !ok {
			return false
		}
	}
	return true
}

// fdConn turns an accepted descriptor into a net.Conn (net.FileConn duplicates it, so the
// original is closed here).
func fdConn(nfd int) (net.Conn, error) {
	f := os.NewFile(uintptr(nfd), "client")
	c, err := net.FileConn(f)
	f.Close()
	return c, err
}

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}
