package balancer

import (
	"bufio"
	"context"
	"net"
	"sync"
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
}

func (vc *vconn) attach() {
	vc.br = vcReaderPool.Get().(*bufio.Reader)
	vc.br.Reset(vc.c)
	vc.bw = vcWriterPool.Get().(*bufio.Writer)
	vc.bw.Reset(vc.c)
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

// alive reports, without blocking, whether the worker's end still looks open: no EOF and
// no unexpected bytes are waiting. Used before a request whose body cannot be replayed.
func (vc *vconn) alive() bool {
	sc, ok := vc.c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	ok = false
	var b [1]byte
	rc.Read(func(fd uintptr) bool {
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		ok = n < 0 && (err == unix.EAGAIN || err == unix.EWOULDBLOCK)
		return true
	})
	return ok
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

// get returns an idle connection with its buffers attached, or dials a new one.
func (p *connPool) get(ctx context.Context) (*vconn, error) {
	if vc := p.getIdle(); vc != nil {
		return vc, nil
	}
	return p.dial(ctx)
}

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
	if vc != nil {
		vc.attach()
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
// the pool is closed or full.
func (p *connPool) put(vc *vconn) {
	if vc.br.Buffered() > 0 {
		vc.close() // the worker sent bytes nobody asked for
		return
	}
	vc.detach()
	vc.reused = true
	vc.idleAt = time.Now()
	p.mu.Lock()
	if p.closed || len(p.conns) >= maxIdlePerWorker {
		p.mu.Unlock()
		vc.c.Close()
		return
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
