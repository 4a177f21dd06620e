//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/upgrade"
)

// The tunnel event loop. A tunnel between two plain sockets (the client's TCP or unix
// socket, a backend's dialed one) costs, in the goroutine design, two goroutines parked on
// the netpoller: their stacks were most of the 19.5 KiB an idle tunnel held in the edge.
// Here both descriptors of every such tunnel sit in one epoll instance per loop, and a
// loop goroutine moves bytes when one is ready: an idle tunnel is a small struct and two
// epoll registrations, nothing else.
//
// How the bytes move: read(2) into the loop's one buffer, write(2) to the other side.
// splice(2) through pooled pipes was the alternative; WebSocket traffic is small messages,
// where splice costs the same two system calls plus page references, and a pipe that
// could not be emptied into a full destination is a kernel ring held by that direction.
// A direction whose destination is full keeps what it could not write (at most one read,
// loopChunk) and stops reading its source until the destination is writable again: a
// backend that never reads holds the edge to one chunk per direction, and the client's
// own send buffer fills.
//
// Edge-triggered registrations (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, as Go's own netpoller
// does): no epoll_ctl ever after the two ADDs, a hang-up is reported once instead of on
// every wait, and pausing a direction is a flag, not a syscall. The price is that a
// direction must read until the socket is drained; a read shorter than the buffer is
// taken as drained (any byte that arrives later is a new edge), so a busy tunnel makes
// one read and one write per message.
//
// The loop goroutines do not block in epoll_wait on threads of their own: each epoll
// descriptor is itself registered with Go's netpoller (os.NewFile of a non-blocking
// descriptor), the loop waits for it like any socket and then collects the ready
// tunnels with epoll_wait(0). An idle loop is a parked goroutine.

const (
	loopChunk  = 64 << 10 // one read; what a blocked direction holds at most
	loopEvents = 256      // events per epoll_wait
	loopBurst  = 16       // reads per direction before the other ready tunnels get a turn
)

// loopHeld is the number of bytes blocked directions hold (a destination that does not
// read): tests check it stays bounded.
var loopHeld atomic.Int64

var loopChunks = sync.Pool{New: func() any { b := make([]byte, loopChunk); return &b }}

var tunnelLoops struct {
	mu    sync.Mutex
	loops []*tunnelLoop
	next  atomic.Uint32
}

// loopCount is how many loops run: one per GOMAXPROCS, so that the tunnels' copying can
// use every core the edge has (on 2 cores, one loop measured ~0.8× the handshake rate of
// two). STICKYD_TUNNEL_LOOPS overrides it (measurement only), read once.
var loopCount = sync.OnceValue(func() int {
	if v, err := strconv.Atoi(os.Getenv("STICKYD_TUNNEL_LOOPS")); err == nil && v > 0 && v <= 256 {
		return v
	}
	return runtime.GOMAXPROCS(0)
})

// pickLoop returns a loop for a new tunnel, round robin, starting the loops on first use
// (and again after a failure to create one, e.g. out of descriptors).
func pickLoop() (*tunnelLoop, error) {
	tl := &tunnelLoops
	tl.mu.Lock()
	if want := loopCount(); len(tl.loops) < want {
		for len(tl.loops) < want {
			l, err := newTunnelLoop()
			if err != nil {
				if len(tl.loops) == 0 {
					tl.mu.Unlock()
					return nil, err
				}
				break
			}
			tl.loops = append(tl.loops, l)
			go l.run()
		}
	}
	loops := tl.loops
	tl.mu.Unlock()
	return loops[int(tl.next.Add(1))%len(loops)], nil
}

// tunnelLoop is one epoll instance and the goroutine that serves it.
type tunnelLoop struct {
	epfd int
	efd  int      // eventfd: a tunnel to end from another goroutine (Freeze, Shutdown)
	ep   *os.File // epfd as Go's netpoller sees it; keeps epfd open

	mu     sync.Mutex
	sides  map[int32]loopSide // by descriptor: both of every tunnel
	starts []*loopTunnel      // set up by their goroutines, to register and start
	kills  []*loopTunnel

	// The loop goroutine's own.
	buf    []byte
	events []unix.EpollEvent
	batch  []loopEvent
	again  []*loopTunnel // directions that stopped at loopBurst with input left
}

type loopSide struct {
	t *loopTunnel
	s int
}

type loopEvent struct {
	loopSide
	ev uint32
}

func newTunnelLoop() (*tunnelLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(efd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(efd)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		unix.Close(efd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	return &tunnelLoop{
		epfd:   epfd,
		efd:    efd,
		ep:     os.NewFile(uintptr(epfd), "stickyd-tunnels-epoll"),
		sides:  map[int32]loopSide{},
		buf:    make([]byte, loopChunk),
		events: make([]unix.EpollEvent, loopEvents),
	}, nil
}

// run serves the loop for the life of the process (loops are shared by every Balancer in
// it and hold no tunnel when idle).
func (l *tunnelLoop) run() {
	// STICKYD_TUNNEL_WAIT=block (measurement only): the loop blocks in epoll_wait on its
	// thread; it measured slower than waiting through the netpoller (handshakes ~0.6×).
	if rc, err := l.ep.SyscallConn(); err == nil && os.Getenv("STICKYD_TUNNEL_WAIT") != "block" {
		// Returns only if the netpoller cannot wait on an epoll descriptor.
		rc.Read(func(uintptr) bool { l.drain(); return false })
	}
	// Fallback: wait in epoll_wait on a thread of the loop's own.
	for {
		timeout := -1
		if len(l.again) > 0 {
			timeout = 0
		}
		n, err := unix.EpollWait(l.epfd, l.events, timeout)
		if err == nil && n > 0 {
			l.handle(l.events[:n])
		}
		l.runAgain()
	}
}

// drain serves ready tunnels until none is left; then the loop can park.
func (l *tunnelLoop) drain() {
	for {
		n, err := unix.EpollWait(l.epfd, l.events, 0)
		if err != nil && err != unix.EINTR {
			n = 0
		}
		if n <= 0 && len(l.again) == 0 {
			return
		}
		if n > 0 {
			l.handle(l.events[:n])
		}
		l.runAgain()
	}
}

// runAgain gives the directions that stopped at loopBurst their next turn.
func (l *tunnelLoop) runAgain() {
	if len(l.again) == 0 {
		return
	}
	again := l.again
	l.again = nil
	for _, t := range again {
		t.queued = false
		if !t.done {
			t.pump(0)
			t.pump(1)
		}
	}
	clear(again)
	if l.again == nil {
		l.again = again[:0]
	}
}

func (l *tunnelLoop) handle(evs []unix.EpollEvent) {
	wake := false
	for i := range evs {
		if evs[i].Fd == int32(l.efd) {
			wake = true
		}
	}
	if wake {
		// Reset the eventfd before taking the queues, never after: a tunnel queued
		// between the two would otherwise be stranded — its write's edge is dropped by
		// epoll when it finds the counter back at 0 — until the next queueing (a kill
		// lost that way held Shutdown forever).
		var b [8]byte
		unix.Read(l.efd, b[:])
	}
	l.mu.Lock()
	for i := range evs {
		fd := evs[i].Fd
		if fd == int32(l.efd) {
			continue
		}
		if s, ok := l.sides[fd]; ok {
			l.batch = append(l.batch, loopEvent{s, evs[i].Events})
		}
	}
	var starts, kills []*loopTunnel
	if wake {
		starts, l.starts = l.starts, nil
		kills, l.kills = l.kills, nil
	}
	l.mu.Unlock()
	for _, e := range l.batch {
		t := e.t
		if t.done {
			continue // ended earlier in this batch
		}
		if t.connecting {
			// Only the backend's side is registered, for its connect.
			if e.ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
				continue
			}
			t.connecting = false
			err := connectResult(t.fd[1], e.ev)
			if t.onConnect != nil {
				// A fast tunnel (fasttunnel_linux.go): the rest of its start is here.
				if !t.onConnect(err) {
					continue
				}
			} else {
				t.connected <- err
				if err != nil {
					t.end(false)
					continue
				}
			}
		}
		if e.ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			t.d[e.s].readable = true
		}
		if e.ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			t.d[e.s].ending = true
		}
		if !t.running {
			continue // its goroutine is still setting it up: start pumps what was noted
		}
		if e.ev&unix.EPOLLERR != 0 {
			if v, err := unix.GetsockoptInt(t.fd[e.s], unix.SOL_SOCKET, unix.SO_ERROR); err != nil || v != 0 {
				t.end(true) // a reset (or a dead peer): the other side is reset too
				continue
			}
		}
		// Writable: what waits for this side goes first, then what this side sent.
		t.pump(1 - e.s)
		t.pump(e.s)
	}
	clear(l.batch)
	l.batch = l.batch[:0]
	if wake {
		for _, t := range starts {
			t.start()
		}
		for _, t := range kills {
			switch {
			case t.done:
			case t.timedOut.Load() && !t.killed.Load():
				// A fast tunnel's connect timer: it fails the connect if still pending
				// (the client goes to the general path); after the connect, nothing.
				if t.connecting {
					t.connecting = false
					t.onConnect(unix.ETIMEDOUT)
				}
			default:
				t.end(false)
			}
		}
	}
}

// enqueue hands t to the loop goroutine on list (starts or kills) and wakes it.
func (l *tunnelLoop) enqueue(list *[]*loopTunnel, t *loopTunnel) {
	l.mu.Lock()
	*list = append(*list, t)
	l.mu.Unlock()
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1) // eventfd adds a host-order uint64
	unix.Write(l.efd, one[:])
}

// register adds side s of t to the epoll set.
func (l *tunnelLoop) register(t *loopTunnel, s int) error {
	l.mu.Lock()
	l.sides[int32(t.fd[s])] = loopSide{t, s}
	l.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(t.fd[s])}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, t.fd[s], &ev); err != nil {
		l.mu.Lock()
		delete(l.sides, int32(t.fd[s]))
		l.mu.Unlock()
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

// start registers what is not registered yet and moves what is already there (the rest
// of a head, a 101 that came before the start). Only the loop goroutine registers,
// starts and closes, so a tunnel's descriptors are never closed under a goroutine that
// still sets them up.
func (t *loopTunnel) start() {
	if t.done {
		return // killed first
	}
	if t.connecting {
		// A fast tunnel: only its backend's connect is registered now; onConnect
		// registers the client once the backend took the connection.
		if err := t.l.register(t, 1); err != nil {
			t.connecting = false
			t.onConnect(err)
		}
		return
	}
	for s := range 2 {
		if s == 1 && t.dialed {
			continue // registered for its connect
		}
		if err := t.l.register(t, s); err != nil {
			t.end(true) // out of kernel memory for epoll (ENOMEM, max_user_watches)
			return
		}
	}
	t.running = true
	t.pump(0)
	t.pump(1)
}

// loopTunnel is one tunnel in a loop: side 0 is the client, side 1 the backend; d[s] is
// the direction that reads side s and writes the other. Only the loop goroutine touches
// it after add, except kill.
type loopTunnel struct {
	l          *tunnelLoop
	fd         [2]int // -1 until set
	d          [2]loopDir
	done       bool
	queued     bool // in l.again
	running    bool // started: events move bytes (before, they are only noted)
	dialed     bool // the loop dialed side 1 (registered for its connect)
	connecting bool // side 1's connect has not finished
	connected  chan error
	killed     atomic.Bool
	// A fast tunnel's (fasttunnel_linux.go): called in the loop with its connect's
	// result, true if the tunnel runs; its connect timer, and whether that fired.
	onConnect func(err error) bool
	timer     *time.Timer
	timedOut  atomic.Bool
	ended     func() // TunnelOpened's closer, untrack: the tunnel's end for the edge; nil before
}

type loopDir struct {
	readable bool   // the source may have input (an edge came, no EAGAIN since)
	ending   bool   // the source's FIN (or error) is queued: read to the end, no edge will come
	eof      bool   // the source ended (read 0)
	shut     bool   // the destination got its FIN (shutdown SHUT_WR)
	pending  []byte // read, not yet written: the destination was full
	chunk    *[]byte
}

// kill ends the tunnel from any goroutine: the loop closes it (only the loop closes its
// descriptors, so a number is never reused under a read).
func (t *loopTunnel) kill() {
	if !t.killed.CompareAndSwap(false, true) {
		return
	}
	t.l.enqueue(&t.l.kills, t)
}

// pump moves direction d (side d to side 1-d) as far as it goes without blocking.
func (t *loopTunnel) pump(d int) {
	dir := &t.d[d]
	dst := t.fd[1-d]
	for reads := 0; !t.done; {
		if dir.pending != nil && !t.flush(dir, dst) {
			return // full (EPOLLOUT will say when) or failed
		}
		if dir.eof {
			if !dir.shut {
				dir.shut = true
				if t.d[1-d].shut {
					t.end(false) // both directions ended: the close sends this FIN
					return
				}
				// Half-close: the FIN goes on; the other direction keeps flowing.
				if err := unix.Shutdown(dst, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
					t.end(true)
				}
			}
			return
		}
		if !dir.readable {
			return
		}
		if reads == loopBurst {
			if !t.queued {
				t.queued = true
				t.l.again = append(t.l.again, t)
			}
			return
		}
		reads++
		n, err := unix.Read(t.fd[d], t.l.buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			dir.readable = false
			return
		case err != nil:
			t.end(true)
			return
		case n == 0:
			dir.eof, dir.readable = true, false
			continue
		case n < len(t.l.buf) && !dir.ending:
			// Drained: anything that arrives later is a new edge. Not so for a FIN
			// that came with the data: its edge is the one being served.
			dir.readable = false
		}
		w, err := writeSome(dst, t.l.buf[:n])
		if err != nil {
			t.end(true)
			return
		}
		if w < n {
			dir.chunk = loopChunks.Get().(*[]byte)
			dir.pending = (*dir.chunk)[:copy(*dir.chunk, t.l.buf[w:n])]
			loopHeld.Add(int64(len(dir.pending)))
			return
		}
	}
}

// flush writes a direction's pending bytes; false while the destination is full or after
// a failure (the tunnel ended).
func (t *loopTunnel) flush(dir *loopDir, dst int) bool {
	w, err := writeSome(dst, dir.pending)
	if err != nil {
		t.end(true)
		return false
	}
	loopHeld.Add(-int64(w))
	dir.pending = dir.pending[w:]
	if len(dir.pending) > 0 {
		return false
	}
	dir.release()
	return true
}

func (dir *loopDir) release() {
	loopHeld.Add(-int64(len(dir.pending)))
	if dir.chunk != nil {
		loopChunks.Put(dir.chunk)
	}
	dir.chunk, dir.pending = nil, nil
}

// writeSome writes until p is written or the socket is full (EAGAIN): a short write is
// retried once more, so that the EPOLLOUT edge the loop then waits for is certain to
// come (the kernel flags a full socket only on the write that found it full).
func writeSome(fd int, p []byte) (int, error) {
	written := 0
	for written < len(p) {
		n, err := unix.Write(fd, p[written:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return written, nil
		case err != nil:
			return written, err
		}
		written += n
	}
	return written, nil
}

// end closes the tunnel. reset: it ended on an error (a reset, a failed write); the other
// side is reset too (SO_LINGER 0), so its peer does not mistake the end for a clean one.
func (t *loopTunnel) end(reset bool) {
	if t.done {
		return
	}
	t.done = true
	l := t.l
	l.mu.Lock()
	delete(l.sides, int32(t.fd[0]))
	delete(l.sides, int32(t.fd[1]))
	l.mu.Unlock()
	for s := range 2 {
		if t.fd[s] < 0 {
			continue
		}
		if reset {
			unix.SetsockoptLinger(t.fd[s], unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		}
		// No EPOLL_CTL_DEL: the loop holds the only descriptor of each socket (see
		// tunnelInLoop), so closing it leaves the epoll set. A fork that has not exec'd
		// yet may hold a copy for a moment; its events then name a number the loop
		// may have given to a new tunnel, which costs that tunnel a read that finds
		// nothing (events are hints here, never data).
		unix.Close(t.fd[s])
		t.d[s].release()
	}
	if t.ended != nil {
		t.ended()
	}
}

// dupConnFD returns a close-on-exec duplicate of a socket's descriptor.
func dupConnFD(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	return nfd, derr
}

// loopSocket returns c's socket when the loop can carry it: a TCP or unix stream socket
// with no bytes of the edge's own in front of it (a TLS session, a connection adopted
// from the previous image with bytes it had read).
func loopSocket(c net.Conn) (syscall.Conn, bool) {
	if pc, ok := c.(*prefixConn); ok {
		if len(pc.pending) > 0 {
			return nil, false
		}
		c = pc.Conn
	}
	switch c := c.(type) {
	case *net.TCPConn:
		return c, true
	case *net.UnixConn:
		return c, true
	}
	return nil, false
}

// tunnelInLoop gives a tunnel between the client c and the backend connection vc (the
// upgrade head already written) to an event loop and reports true; then c and vc are
// closed and the caller's goroutine may end. It reports false, with c and vc untouched,
// when the tunnel must stay on goroutines (not two plain sockets, the edge freezing or
// shutting down, no loop).
//
// The descriptors leave Go's net.Conns by dup (F_DUPFD_CLOEXEC) and the conns are closed:
// keeping the conns and using their descriptors through Control would leave both sockets
// registered with Go's netpoller too, which would wake for every message of every tunnel
// with nobody waiting (and keep each conn's runtime poll descriptor). Closing a conn
// removes its registration (EPOLL_CTL_DEL) and closes its number; the socket lives on in
// the duplicate, which the loop alone closes.
//
// The tunnel stays counted where Freeze and Shutdown look (b.conns, b.wg, the per-address
// count): a clientConn of its own, whose conn is loopConn — their wake-up (a read
// deadline in the past) and Shutdown's forced Close end the tunnel in its loop.
func (b *Balancer) tunnelInLoop(cc *clientConn, c, vc net.Conn, closed func()) bool {
	csc, ok := loopSocket(c)
	if !ok {
		return false
	}
	bsc, ok := loopSocket(vc)
	if !ok {
		return false
	}
	l, err := pickLoop()
	if err != nil {
		b.warnf("tunnels fall back to goroutines", "err", err)
		return false
	}
	cfd, err := dupConnFD(csc)
	if err != nil {
		return false
	}
	bfd, err := dupConnFD(bsc)
	if err != nil {
		unix.Close(cfd)
		return false
	}
	t := &loopTunnel{l: l, fd: [2]int{cfd, bfd}}
	if !b.startTunnel(t, cc, closed) {
		unix.Close(cfd)
		unix.Close(bfd)
		return false // freezing or closing: the goroutine path ends it as it always did
	}
	c.Close()
	vc.Close()
	return true
}

// startTunnel counts t as the edge's (retrack) and gives it to its loop; false, with t
// untouched, if the edge is freezing or closing. closed is TunnelOpened's closer.
func (b *Balancer) startTunnel(t *loopTunnel, cc *clientConn, closed func()) bool {
	tcc := &clientConn{c: &loopConn{b: b, t: t, local: cc.c.LocalAddr(), remote: cc.c.RemoteAddr()}}
	tcc.state.Store(connHead)
	t.ended = func() {
		closed()
		b.untrack(tcc)
	}
	if !b.retrack(tcc, cc) {
		t.ended = nil
		return false
	}
	t.l.enqueue(&t.l.starts, t)
	// Freeze may have swept b.conns before tcc was in it.
	if b.frozen() || b.isClosing() {
		t.kill()
	}
	return true
}

// tunnelDialInLoop is tunnel() for a backend at a TCP address and a plain client socket,
// with the backend's connect in the loop too: a non-blocking connect(2) registered in
// the loop, the head written straight to the socket. Against net.Dialer and then moving
// the socket into the loop, each handshake saves the poller registration and removal, the
// getsockname/getpeername of a new net.TCPConn, the duplicate and its close, and their
// allocations. handled is false, with nothing done, when it does not apply; otherwise err
// is tunnel()'s: non-nil only when the backend could not be reached (the client
// untouched, the caller may pick another worker).
func (b *Balancer) tunnelDialInLoop(cc *clientConn, w *workers.Worker, h *upgrade.Head, consumed []byte) (handled bool, err error) {
	ch, ok := w.Channel().(*workers.BackendChannel)
	if !ok || ch.Network != "tcp" {
		return false, nil
	}
	c := cc.c
	csc, ok := loopSocket(c)
	if !ok {
		return false, nil
	}
	ap, err := netip.ParseAddrPort(ch.Address)
	if err != nil {
		return false, nil // a name: net.Dialer resolves it
	}
	select {
	case <-ch.Done():
		return true, fmt.Errorf("worker %d: %w: %s left routing", w.Slot, workers.ErrBackendDown, ch)
	default:
	}
	l, err := pickLoop()
	if err != nil {
		return false, nil
	}
	t, err := l.dial(ap)
	if err == nil {
		timer := time.NewTimer(min(b.cfg.HandoffTimeout, backendConnectTimeout))
		select {
		case err = <-t.connected:
		case <-timer.C:
			t.kill()
			err = unix.ETIMEDOUT
		}
		timer.Stop()
	}
	if err != nil {
		return true, connectFailed(w, ch, err)
	}

	// Connected: from here on as tunnel() after its dial.
	closed := ch.TunnelOpened()
	abandon := func() { // before the start: the loop closes the backend's socket
		t.ended = closed
		t.kill()
		c.Close()
	}
	w.NoteHandoff(time.Now())
	b.m.Handoffs.WithLabelValues(w.Label(), metrics.HandoffOK).Inc()
	b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptTunneled).Inc()
	cc.state.Store(connHead) // Freeze and Shutdown interrupt the head's read
	head := consumed
	if head == nil {
		head = make([]byte, h.Size)
		c.SetReadDeadline(time.Now().Add(b.cfg.HeadTimeout))
		_, err := io.ReadFull(c, head)
		c.SetReadDeadline(time.Time{})
		if err != nil {
			abandon() // the client left; nothing to tunnel
			return true, nil
		}
	}
	n := min(h.Size, len(head))
	var hb bytes.Buffer
	bw := bufio.NewWriterSize(&hb, n+256)
	peer := addrPort(c.RemoteAddr()).Addr()
	writeTunnelHead(bw, head[:n], peer, b.cfg.Rules.Trusts(peer), schemeOf(c))
	bw.Write(head[n:])
	bw.Flush()
	out := hb.Bytes()
	wrote, err := writeSome(t.fd[1], out)
	if err != nil {
		abandon()
		return true, nil
	}
	if wrote < len(out) {
		// A fresh socket takes a head at once; if not, the loop sends the rest.
		t.d[0].pending = out[wrote:]
		loopHeld.Add(int64(len(t.d[0].pending)))
	}
	cfd, err := dupConnFD(csc)
	if err != nil {
		abandon()
		return true, nil
	}
	t.fd[0] = cfd
	if !b.startTunnel(t, cc, closed) {
		abandon() // freezing or closing: tunnels do not go over
		return true, nil
	}
	c.Close()
	return true, nil
}

// connectFailed classifies a failed connect to a backend as BackendChannel.Dial does and
// reports it to passive health (a refusal takes the backend out of routing), except the
// edge's own shortage, which says nothing about the backend.
func connectFailed(w *workers.Worker, ch *workers.BackendChannel, err error) error {
	switch {
	case workers.LocalDialError(err):
		return fmt.Errorf("worker %d: connect to %s: %w", w.Slot, ch, os.NewSyscallError("connect", err))
	case err == unix.ETIMEDOUT:
		err = fmt.Errorf("%w: connect to %s: %v", workers.ErrWorkerTimeout, ch, os.NewSyscallError("connect", err))
	default:
		err = fmt.Errorf("%w: %s: %v", workers.ErrBackendDown, ch, os.NewSyscallError("connect", err))
	}
	if ch.OnDialError != nil {
		ch.OnDialError(err)
	}
	return fmt.Errorf("worker %d: %w", w.Slot, err)
}

// backendConnectTimeout bounds a backend's connect, as workers' backendDialTimeout does.
const backendConnectTimeout = 3 * time.Second

// dial starts a non-blocking connect to ap and registers the socket; the result comes on
// t.connected.
func (l *tunnelLoop) dial(ap netip.AddrPort) (*loopTunnel, error) {
	fd, err := connectSocket(ap)
	if err != nil {
		return nil, err
	}
	t := &loopTunnel{l: l, fd: [2]int{-1, fd}, dialed: true, connecting: true, connected: make(chan error, 1)}
	// Registered after connect: an unconnected socket polls as hung up. The result is
	// the first EPOLLOUT (connected) or EPOLLERR/EPOLLHUP (refused, unreachable).
	if err := l.register(t, 1); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return t, nil
}

// connectSocket starts a non-blocking connect to ap and returns its socket.
func connectSocket(ap netip.AddrPort) (int, error) {
	var sa unix.Sockaddr
	family := unix.AF_INET
	if a := ap.Addr().Unmap(); a.Is4() {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	// What net.Dialer sets: no Nagle delay for small frames, and keep-alive probes after
	// 15 s idle every 15 s (9 probes, the kernel's default count), so that a backend
	// host that vanished ends its tunnels.
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15)
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15)
	for {
		err = unix.Connect(fd, sa)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// connectResult is a non-blocking connect's outcome from its first event.
func connectResult(fd int, ev uint32) error {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	switch {
	case err != nil:
		return err
	case v != 0:
		return unix.Errno(v)
	case ev&unix.EPOLLOUT == 0:
		return unix.ECONNRESET
	}
	return nil
}

// retrack counts a loop tunnel as a connection of the edge, as track does for an accepted
// one, and moves the client's count per address from its connection (from) to the tunnel
// (cc): counted twice, the client's next connection could be refused in the moment
// between the tunnel's first bytes and the end of from's goroutine. False if the edge is
// freezing or shutting down.
func (b *Balancer) retrack(cc, from *clientConn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing || b.frozen() {
		return false
	}
	cc.ip, from.ip = from.ip, netip.Addr{}
	b.conns[cc] = struct{}{}
	b.wg.Add(1)
	return true
}

// loopConn stands for a loop tunnel in b.conns, where Freeze and Shutdown find the
// connections they must end: their wake-up of a connection mid-head (a read deadline in
// the past) ends the tunnel when the edge is freezing or closing, as endIfFrozen does for
// a goroutine tunnel, and Shutdown's forced Close ends it. Nothing reads or writes it.
type loopConn struct {
	b             *Balancer
	t             *loopTunnel
	local, remote net.Addr
}

func (c *loopConn) Read([]byte) (int, error)  { return 0, net.ErrClosed }
func (c *loopConn) Write([]byte) (int, error) { return 0, net.ErrClosed }
func (c *loopConn) Close() error              { c.t.kill(); return nil }
func (c *loopConn) LocalAddr() net.Addr       { return c.local }
func (c *loopConn) RemoteAddr() net.Addr      { return c.remote }
func (c *loopConn) SetDeadline(t time.Time) error {
	return c.SetReadDeadline(t)
}
func (c *loopConn) SetWriteDeadline(time.Time) error { return nil }
func (c *loopConn) SetReadDeadline(t time.Time) error {
	if !t.IsZero() && !t.After(time.Now()) && (c.b.frozen() || c.b.isClosing()) {
		c.t.kill()
	}
	return nil
}
