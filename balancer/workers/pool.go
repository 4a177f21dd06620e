//go:build unix

package workers

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
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

// Conn is one virtual connection to a worker (the edge's end of a socketpair whose
// other end the worker serves like a client connection).
type Conn struct {
	C      net.Conn
	BR     *bufio.Reader // nil while idle
	BW     *bufio.Writer // nil while idle
	Reused bool          // it carried a request before: the worker may have closed it meanwhile
	idleAt time.Time
	sent   atomic.Int64
	// Probe's, made on its first call and kept: a probe per request allocates nothing.
	rc     syscall.RawConn
	peekFn func(fd uintptr)
	peeked int
}

func (vc *Conn) Attach() {
	vc.BR = vcReaderPool.Get().(*bufio.Reader)
	vc.BR.Reset(vc.C)
	vc.BW = vcWriterPool.Get().(*bufio.Writer)
	vc.BW.Reset(vc)
	vc.sent.Store(0)
}

func (vc *Conn) Detach() {
	if vc.BR != nil {
		vc.BR.Reset(nil)
		vcReaderPool.Put(vc.BR)
		vc.BR = nil
	}
	if vc.BW != nil {
		vc.BW.Reset(nil)
		vcWriterPool.Put(vc.BW)
		vc.BW = nil
	}
}

// Close closes the connection and gives its buffers back.
func (vc *Conn) Close() {
	vc.C.Close()
	vc.Detach()
}

// Idle states of a virtual connection (Conn.Probe).
const (
	ProbeIdle        = iota // nothing to read, the worker's end is open
	ProbeClosed             // the worker closed its end (or the socket failed)
	ProbeUnsolicited        // the worker sent bytes nobody asked for
)

// Probe reports, without blocking, what waits on the connection. A pooled connection is
// reused only when it is idle: bytes a worker wrote after the end of a response (a body
// on a 204, bytes past Content-Length, a late second response) would otherwise be read as
// the answer to the next request — another client's — and shift every pairing after it.
// This is net/http's "unsolicited response received on idle HTTP channel".
func (vc *Conn) Probe() int {
	if vc.rc == nil {
		sc, ok := vc.C.(syscall.Conn)
		if !ok {
			return ProbeIdle
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return ProbeClosed
		}
		vc.rc = rc
		vc.peekFn = func(fd uintptr) { vc.peeked, _ = fdutil.Peek(fd) }
	}
	vc.peeked = fdutil.PeekError
	if err := vc.rc.Control(vc.peekFn); err != nil {
		return ProbeClosed
	}
	switch vc.peeked {
	case fdutil.PeekEmpty:
		return ProbeIdle
	case fdutil.PeekData:
		return ProbeUnsolicited
	}
	return ProbeClosed
}

// Sent is the number of bytes the worker's socket accepted since the connection was
// taken from the pool.
func (vc *Conn) Sent() int64 { return vc.sent.Load() }

// Write counts what the worker's socket accepted, so that a failed request can tell
// "never reached the worker" (safe to send elsewhere) from "may have been read".
func (vc *Conn) Write(p []byte) (int, error) {
	n, err := vc.C.Write(p)
	vc.sent.Add(int64(n))
	return n, err
}

// Pool holds a worker's idle virtual connections, most recently used on top (LIFO:
// the warm ones are reused, the rest age out). An idle connection is retired after
// idle, which is shorter than Node's keepAliveTimeout (5 s), so the edge does not pick a
// connection the worker is about to close.
type Pool struct {
	w    *Worker
	idle time.Duration

	mu     sync.Mutex
	conns  []*Conn // by idleAt, oldest first
	closed bool
	timer  *time.Timer
	armed  bool

	// counters caches RequestsProxied{worker, class} (index: status/100, 0 unused).
	countersOnce sync.Once
	counters     [6]prometheus.Counter
}

func newPool(w *Worker, idle time.Duration) *Pool {
	if idle <= 0 {
		idle = 4 * time.Second
	}
	return &Pool{w: w, idle: idle}
}

// Get returns an idle connection with its buffers attached, or dials a new one. Idle
// connections that turn out closed are dropped; ones holding unsolicited bytes are
// dropped and counted in unsolicited.
func (p *Pool) Get(ctx context.Context) (vc *Conn, unsolicited int, err error) {
	for {
		vc := p.getIdle()
		if vc == nil {
			break
		}
		switch vc.Probe() {
		case ProbeIdle:
			vc.Attach()
			return vc, unsolicited, nil
		case ProbeUnsolicited:
			unsolicited++
		}
		vc.C.Close()
	}
	vc, err = p.Dial(ctx)
	return vc, unsolicited, err
}

// getIdle pops the most recently used idle connection, without buffers.
func (p *Pool) getIdle() *Conn {
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
	var stale []*Conn
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
		s.C.Close()
	}
	return vc
}

// Dial opens a fresh virtual connection.
func (p *Pool) Dial(ctx context.Context) (*Conn, error) {
	c, err := p.w.DialVirtual(ctx)
	if err != nil {
		return nil, err
	}
	vc := &Conn{C: c}
	vc.Attach()
	return vc, nil
}

// Put returns a connection whose last exchange ended cleanly; it keeps it idle unless
// the pool is closed or full. It reports false when the worker had already sent bytes
// past the end of the response: the connection is closed, never reused. (Bytes that
// arrive later are found by Get's probe.)
func (p *Pool) Put(vc *Conn) bool {
	if vc.BR.Buffered() > 0 {
		vc.Close()
		return false
	}
	vc.Detach()
	vc.Reused = true
	vc.idleAt = time.Now()
	p.mu.Lock()
	if p.closed || len(p.conns) >= maxIdlePerWorker {
		p.mu.Unlock()
		vc.C.Close()
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
func (p *Pool) sweep() {
	now := time.Now()
	p.mu.Lock()
	i := 0
	for i < len(p.conns) && now.Sub(p.conns[i].idleAt) >= p.idle {
		i++
	}
	stale := append([]*Conn(nil), p.conns[:i]...)
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
		s.C.Close()
	}
}

// CloseIdle closes every idle connection and every one returned later (the worker left).
func (p *Pool) CloseIdle() {
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
		s.C.Close()
	}
}

// Requests returns the RequestsProxied counter of this worker for status.
func (p *Pool) Requests(m *metrics.Metrics, status int) prometheus.Counter {
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
