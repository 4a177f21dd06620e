//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// fastTunnels counts the tunnels the accept loop gave to an event loop as raw descriptors
// (tests check the fast path was taken, not silently left to the general path).
var fastTunnels atomic.Int64

// fastFallbacks counts fast tunnels whose connect failed in the loop and whose client
// went to the general path (tests).
var fastFallbacks atomic.Int64

// fastConnectFailures counts fast tunnels whose backend connect failed (tests).
var fastConnectFailures atomic.Int64

// fastTunnel is the accept loop's way for a WebSocket upgrade to a backend at a TCP
// address (stickyd proxy) whose complete head it peeked: the accepted descriptor goes
// straight to a tunnel loop with the backend's connect, and the accept loop moves on. The
// general path for the same client builds a net.Conn (net.FileConn: a duplicate, four
// system calls and a poller registration), starts a goroutine that peeks the head again
// under read deadlines, waits for the connect, reads the head, and then duplicates the
// socket for the loop and closes its own — none of which happens here.
//
// It reports false with nfd untouched and nothing read from it when it does not apply (a
// unix or named backend, the edge at its connection limit or shutting down, a connect
// that failed at once: the general path then retries it elsewhere); true when nfd is the
// loop's. The client's bytes stay in its socket until the backend accepted the connect:
// the loop then reads exactly the head the peek saw (it is there, and nothing else reads
// the socket) and writes it, rewritten for the backend, before anything else. A connect
// that fails in the loop (refused, timed out) is reported to passive health as the
// general path does, and the client, still unread, goes to the general path, which routes
// it again — away from a refusing backend, which passive health took out of routing.
//
// Counting is the general path's: the tunnel is tracked (MaxConns, MaxConnsPerIP by its
// peer; b.conns, where Freeze and Shutdown find its stand-in loopConn; b.wg) from here
// until the loop ends it, once (a client given back to the general path is untracked
// first, and admit counts it again);
// TunnelOpened, the handoff and accept metrics once the backend took it.
func (b *Balancer) fastTunnel(nfd int, peer, local netip.AddrPort, h *upgrade.Head, raw []byte, r *route) bool {
	ch, ok := r.w.Channel().(*workers.BackendChannel)
	if !ok || ch.Network != "tcp" {
		return false // a unix or named backend: the general path dials it
	}
	ap, err := netip.ParseAddrPort(ch.Address)
	if err != nil {
		return false
	}
	select {
	case <-ch.Done():
		return false // it left routing: the general path tries another
	default:
	}
	size := h.Size
	if size <= 0 || size > len(raw) || size > loopChunk {
		return false
	}
	l, err := pickLoop()
	if err != nil {
		return false
	}
	w := r.w
	kind, tableKey := r.key.Kind, r.tableKey
	start := time.Now()
	// The head for the backend, built now: raw is the peek buffer, reused after this call.
	var hb bytes.Buffer
	bw := bufio.NewWriterSize(&hb, size+256)
	writeTunnelHead(bw, raw[:size], peer.Addr(), b.cfg.Rules.Trusts(peer.Addr()), "http")
	bw.Flush()
	bfd, err := connectSocket(ap)
	if err != nil {
		// Refused at once (or the edge's own shortage): reported as the loop would; the
		// general path, with the client unread, tries another backend.
		b.fastConnectFailed(w, ch, kind, tableKey, start, err)
		return false
	}
	// Everything the loop reads of t is set before t is visible to another goroutine
	// (b.conns, where Freeze's kill finds it; the loop's start queue).
	t := &loopTunnel{l: l, fd: [2]int{nfd, bfd}, dialed: true, connecting: true}
	t.d[0].pending = hb.Bytes() // written first once the backend is connected
	loopHeld.Add(int64(len(t.d[0].pending)))
	tcc := &clientConn{c: &loopConn{b: b, t: t, local: net.TCPAddrFromAddrPort(local), remote: net.TCPAddrFromAddrPort(peer)}}
	tcc.state.Store(connHead) // Freeze's and Shutdown's wake-up ends it
	t.ended = func() { b.untrack(tcc) }
	t.onConnect = func(err error) bool {
		t.timer.Stop()
		if err != nil {
			// The client's socket leaves the tunnel unread: end closes only the
			// backend's (and untracks), and the general path takes the client.
			cfd := t.fd[0]
			t.fd[0] = -1
			t.d[0].release()
			t.end(false)
			b.fastConnectFailed(w, ch, kind, tableKey, start, err)
			b.fastTunnelFallback(cfd)
			return false
		}
		fastTunnels.Add(1)
		closed := ch.TunnelOpened()
		t.ended = func() {
			closed()
			b.untrack(tcc)
		}
		w.NoteHandoff(time.Now())
		b.m.Handoffs.WithLabelValues(w.Label(), metrics.HandoffOK).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptTunneled).Inc()
		// The head the peek saw, out of the client's socket: the loop's buffer takes it
		// (its rewritten copy is pending for the backend).
		n, err := unix.Read(t.fd[0], t.l.buf[:size])
		if err != nil || n != size {
			t.end(err != nil) // the client left (a reset, or closed before its head was read)
			return false
		}
		if err := t.l.register(t, 0); err != nil {
			t.end(true)
			return false
		}
		t.running = true
		t.pump(0) // the head first, then what the client sent after it
		t.pump(1)
		return !t.done
	}
	if b.track(tcc) != trackOK {
		// At a limit or closing: the general path answers as it always does.
		t.d[0].release()
		unix.Close(bfd)
		return false
	}
	// Only the loop reads the timer (onConnect, after the start below); a timer that
	// fires after the tunnel ended finds it done.
	t.timer = time.AfterFunc(min(b.cfg.HandoffTimeout, backendConnectTimeout), func() {
		t.timedOut.Store(true)
		l.enqueue(&l.kills, t)
	})
	if kind == sticky.KindNone && !b.isHandshake(h) {
		countTunnel(w) // as handoff does for a keyless tunnel
	}
	l.enqueue(&l.starts, t)
	// Freeze may have swept b.conns before tcc was in it.
	if b.frozen() || b.isClosing() {
		t.kill()
	}
	return true
}

// fastConnectFailed does for a fast tunnel's failed connect what handoff does for a
// failed attempt: passive health told (connectFailed), the metrics, a stuck mark for a
// timeout, a pin to the backend forgotten, so the general path routes the client afresh.
func (b *Balancer) fastConnectFailed(w *workers.Worker, ch *workers.BackendChannel, kind sticky.Kind, tableKey string, start time.Time, err error) {
	fastConnectFailures.Add(1)
	werr := connectFailed(w, ch, err)
	result := metrics.HandoffError
	if errors.Is(werr, workers.ErrWorkerTimeout) {
		result = metrics.HandoffTimeout
		w.MarkStuck(b.log, "a backend's connect timed out")
	}
	b.m.HandoffDuration.Observe(time.Since(start).Seconds())
	b.m.Handoffs.WithLabelValues(w.Label(), result).Inc()
	b.warnf("handoff failed", "worker", w.Slot, "err", werr)
	if kind != sticky.KindSID && tableKey != "" {
		b.tableFor(kind).Delete(tableKey)
	}
	b.m.Handoffs.WithLabelValues(w.Label(), metrics.HandoffRetried).Inc()
}

// fastTunnelFallback gives a client whose fast tunnel could not connect (nothing read
// from it) to the general path, which routes it again and retries as it does for its own.
func (b *Balancer) fastTunnelFallback(cfd int) {
	fastFallbacks.Add(1)
	c, err := fdConn(cfd)
	if err != nil {
		b.m.Rejections.WithLabelValues(metrics.RejectOverload).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		return
	}
	b.admit(c)
}
