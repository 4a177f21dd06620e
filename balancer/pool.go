package balancer

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/metrics"
)

// maxIdlePerWorker bounds the idle virtual connections the edge keeps to one worker.
const maxIdlePerWorker = 256

// Buffer sizes of a virtual connection. Buffers belong to a connection only while it
// carries a request: idle connections give them back, so memory follows the requests in
// flight, not the idle pool.
const (
	vcReadBuf  = 16 << 10
	vcWriteBuf = 8 << 10
)

var (
	vcReaderPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, vcReadBuf) }}
	vcWriterPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, vcWriteBuf) }}
)

// vconn is one virtual connection to a worker (the edge's end of a socketpair whose
// other end the worker serves like a client connection).
type vconn struct {
	c      net.Conn
	br     *bufio.Reader // nil while idle
	bw     *bufio.Writer // nil while idle
	idleAt time.Time
	reused bool // it carried a request before: the worker may have closed it meanwhile
	sent   atomic.Int64
}

func (vc *vconn) attach() {
	vc.br = vcReaderPool.Get().(*bufio.Reader)
	vc.br.Reset(vc.c)
	vc.bw = vcWriterPool.Get().(*bufio.Writer)
	vc.bw.Reset(vc)
	vc.sent.Store(0)
}

func (vc *vconn) detach() {
	if vc.br != nil {
		vc.br.Reset(nil)
		vcReaderPool.Put(vc.br)
		vc.br = nil
	}
	if vc.bw != nil {
		vc.bw.Reset(nil)
		vcWriterPool.Put(vc.bw)
		vc.bw = nil
	}
}

// close closes the connection and gives its buffers back.
func (vc *vconn) close() {
	vc.c.Close()
	vc.detach()
}

// Idle states of a virtual connection (vconn.probe).
const (
	probeIdle        = iota // nothing to read, the worker's end is open
	probeClosed             // the worker closed its end (or the socket failed)
	probeUnsolicited        // the worker sent bytes nobody asked for
)

// probe reports, without blocking, what waits on the connection. A pooled connection is
// reused only when it is idle: bytes a worker wrote after the end of a response (a body
// on a 204, bytes past Content-Length, a late second response) would otherwise be read as
// the answer to the next request — another client's — and shift every pairing after it.
// This is net/http's "unsolicited response received on idle HTTP channel".
func (vc *vconn) probe() int {
	sc, ok := vc.c.(syscall.Conn)
	if !ok {
		return probeIdle
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return probeClosed
	}
	state := probeClosed
	var b [1]byte
	rc.Control(func(fd uintptr) {
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case n > 0:
			state = probeUnsolicited
		case n < 0 && (err == unix.EAGAIN || err == unix.EWOULDBLOCK):
			state = probeIdle
		}
	})
	return state
}

// Write counts what the worker's socket accepted, so that a failed request can tell
// "never reached the worker" (safe to send elsewhere) from "may have been read".
func (vc *vconn) Write(p []byte) (int, error) {
	n, err := vc.c.Write(p)
	vc.sent.Add(int64(n))
	return n, err
}

// connPool holds a worker's idle virtual connections, most recently used on top (LIFO:
// the warm ones are reused, the rest age out). An idle connection is retired after
// idle, which is shorter than Node's keepAliveTimeout (5 s), so the edge does not pick a
// connection the worker is about to close.
type connPool struct {
	w    *Worker
	idle time.Duration

	mu     sync.Mutex
	conns  []*vconn // by idleAt, oldest first
	closed bool
	timer  *time.Timer
	armed  bool

	// counters caches RequestsProxied{worker, class} (index: status/100, 0 unused).
	countersOnce sync.Once
	counters     [6]prometheus.Counter
}

func newConnPool(w *Worker, idle time.Duration) *connPool {
	if idle <= 0 {
		idle = 4 * time.Second
	}
	return &connPool{w: w, idle: idle}
}

// get returns an idle connection with its buffers attached, or dials a new one. Idle
// connections that turn out closed are dropped; ones holding unsolicited bytes are
// dropped and counted in unsolicited.
func (p *connPool) get(ctx context.Context) (vc *vconn, unsolicited int, err error) {
	for {
		vc := p.getIdle()
		if vc == nil {
			break
		}
		switch vc.probe() {
		case probeIdle:
			vc.attach()
			return vc, unsolicited, nil
		case probeUnsolicited:
			unsolicited++
		}
		vc.c.Close()
	}
	vc, err = p.dial(ctx)
	return vc, unsolicited, err
}

// getIdle pops the most recently used idle connection, without buffers.
func (p *connPool) getIdle() *vconn {
	now := time.Now()
	p.mu.Lock()
	n := len(p.conns)
	if n == 0 {
		p.mu.Unlock()
		return nil
	}
	vc := p.conns[n-1]
	p.conns[n-1] = nil
	p.conns = p.conns[:n-1]
	var stale []*vconn
	if now.Sub(vc.idleAt) >= p.idle {
		// The newest is stale, so are all below it.
		stale = append(p.conns[:0:0], p.conns...)
		clear(p.conns)
		p.conns = p.conns[:0]
		stale = append(stale, vc)
		vc = nil
	}
	p.mu.Unlock()
	for _, s := range stale {
		s.c.Close()
	}
	return vc
}

// dial opens a fresh virtual connection.
func (p *connPool) dial(ctx context.Context) (*vconn, error) {
	c, err := p.w.dialVirtual(ctx)
	if err != nil {
		return nil, err
	}
	vc := &vconn{c: c}
	vc.attach()
	return vc, nil
}

// put returns a connection whose last exchange ended cleanly; it keeps it idle unless
// the pool is closed or full. It reports false when the worker had already sent bytes
// past the end of the response: the connection is closed, never reused. (Bytes that
// arrive later are found by get's probe.)
func (p *connPool) put(vc *vconn) bool {
	if vc.br.Buffered() > 0 {
		vc.close()
		return false
	}
	vc.detach()
	vc.reused = true
	vc.idleAt = time.Now()
	p.mu.Lock()
	if p.closed || len(p.conns) >= maxIdlePerWorker {
		p.mu.Unlock()
		vc.c.Close()
		return true
	}
	p.conns = append(p.conns, vc)
	if !p.armed {
		p.armed = true
		if p.timer == nil {
			p.timer = time.AfterFunc(p.idle, p.sweep)
		} else {
			p.timer.Reset(p.idle)
		}
	}
	p.mu.Unlock()
	return true
}

// sweep closes connections idle for longer than p.idle and rearms for the next one.
func (p *connPool) sweep() {
	now := time.Now()
	p.mu.Lock()
	i := 0
	for i < len(p.conns) && now.Sub(p.conns[i].idleAt) >= p.idle {
		i++
	}
	stale := append([]*vconn(nil), p.conns[:i]...)
	n := copy(p.conns, p.conns[i:])
	clear(p.conns[n:])
	p.conns = p.conns[:n]
	if n > 0 && !p.closed {
		p.timer.Reset(p.idle - now.Sub(p.conns[0].idleAt) + time.Millisecond)
	} else {
		p.armed = false
	}
	p.mu.Unlock()
	for _, s := range stale {
		s.c.Close()
	}
}

// closeIdle closes every idle connection and every one returned later (the worker left).
func (p *connPool) closeIdle() {
	p.mu.Lock()
	p.closed = true
	stale := p.conns
	p.conns = nil
	if p.timer != nil {
		p.timer.Stop()
	}
	p.armed = false
	p.mu.Unlock()
	for _, s := range stale {
		s.c.Close()
	}
}

// requests returns the RequestsProxied counter of this worker for status.
func (p *connPool) requests(m *metrics.Metrics, status int) prometheus.Counter {
	p.countersOnce.Do(func() {
		for c := 1; c <= 5; c++ {
			p.counters[c] = m.RequestsProxied.WithLabelValues(p.w.label, metrics.StatusClass(c*100))
		}
	})
	if c := status / 100; c >= 1 && c <= 5 {
		return p.counters[c]
	}
	return m.RequestsProxied.WithLabelValues(p.w.label, metrics.StatusClass(status))
}
