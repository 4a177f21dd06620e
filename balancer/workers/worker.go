//go:build unix

package workers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stickyd/stickyd/fdpass"
)

// ErrWorkerTimeout means a worker did not take a connection in time.
var ErrWorkerTimeout = errors.New("workers: worker did not take the connection in time")

// Channel delivers connections to one worker process.
type Channel interface {
	// Deliver hands conn to the worker. On success the worker owns the connection and
	// the caller closes its own copy; on error the caller still owns it.
	Deliver(ctx context.Context, conn syscall.Conn, meta fdpass.Meta) error
	// CanReplay reports whether Deliver honours meta.Consumed (Go workers do; Node's
	// handle protocol has no place for bytes the edge already read).
	CanReplay() bool
	// Done is closed when the worker's channel is gone (the process exited or hung up).
	Done() <-chan struct{}
	// WebSockets is the number of WebSockets the worker last reported holding (0 until it
	// reports; Go workers through fdpass, Node workers through the preload).
	WebSockets() int64
	Close() error
}

// AsyncChannel is a Channel that can hand a connection over without its caller waiting
// for the worker's answer. Node workers are: they take one handle at a time, and their
// channel sends the next one from its reader as soon as the worker has acknowledged the
// one before, so a burst of handoffs wakes no goroutine per connection.
type AsyncChannel interface {
	// DeliverFunc is Deliver without the wait: done gets Deliver's result exactly once,
	// usually later from the channel's own goroutine (it must not block; it may also run
	// before DeliverFunc returns), and conn must stay open until then. When DeliverFunc returns an error nothing was sent and done is not called.
	DeliverFunc(conn syscall.Conn, meta fdpass.Meta, done func(error)) error
}

// WorkerState is where a worker is in its life.
type WorkerState int32

const (
	StateStarting WorkerState = iota
	StateReady
	StateDraining
	StateGone
)

func (s WorkerState) String() string {
	switch s {
	case StateStarting:
		return "starting"
	case StateReady:
		return "ready"
	case StateDraining:
		return "draining"
	case StateGone:
		return "gone"
	}
	return "unknown"
}

// Worker is one worker process as the edge sees it.
type Worker struct {
	Slot int
	PID  int
	// PoolName is the -pool the worker belongs to; "" for the default pool.
	PoolName string

	ch         Channel
	state      atomic.Int32
	stuckUntil atomic.Int64 // unix nanos: a handoff timed out; skip the worker until then
	pool       *Pool        // idle virtual connections for proxied requests
	label      string
	handoffAt  atomic.Int64                     // unix nanos of the last connection handed over (NoteHandoff)
	inflight   atomic.Int32                     // proxied requests sent and not yet answered
	idleSince  atomic.Int64                     // unix nanos: in flight last fell to zero (or the worker joined)
	gauge      atomic.Pointer[prometheus.Gauge] // the pool's in-flight gauge, if the edge keeps one
}

// InFlight is the number of proxied requests the worker has not answered yet.
func (w *Worker) InFlight() int { return int(w.inflight.Load()) }

// IdleSince is when the worker last had no request in flight (its start, if never busy);
// the zero time while requests are in flight.
func (w *Worker) IdleSince() time.Time {
	if w.inflight.Load() > 0 {
		return time.Time{}
	}
	return time.Unix(0, w.idleSince.Load())
}

// SetInFlightGauge makes BeginRequest and EndRequest keep g (the pool's
// stickyd_pool_requests_in_flight) in step.
func (w *Worker) SetInFlightGauge(g prometheus.Gauge) { w.gauge.Store(&g) }

// BeginRequest counts a proxied request sent to the worker. A pool's Gate calls it for
// the requests it admits; the edge calls it for the others.
func (w *Worker) BeginRequest() {
	w.inflight.Add(1)
	if g := w.gauge.Load(); g != nil {
		(*g).Inc()
	}
}

// EndRequest counts the end of a request BeginRequest counted.
func (w *Worker) EndRequest() {
	if w.inflight.Add(-1) == 0 {
		w.idleSince.Store(time.Now().UnixNano())
	}
	if g := w.gauge.Load(); g != nil {
		(*g).Dec()
	}
}

// statsLag bounds how long a worker's WebSocket count can lag a handoff: Go workers
// report once a second (fdpass.Listener.ReportWebSocketsFrom), Node's preload every 250 ms.
const statsLag = 1500 * time.Millisecond

// NoteHandoff records that the worker was just handed a connection: until its WebSocket
// count can include it, a drain does not take the count's word that it holds none.
func (w *Worker) NoteHandoff(t time.Time) { w.handoffAt.Store(t.UnixNano()) }

// recentHandoff reports whether a connection handed over lately may be missing from the
// worker's last WebSocket count.
func (w *Worker) recentHandoff(now time.Time) bool {
	return now.UnixNano()-w.handoffAt.Load() < int64(statsLag)
}

// NewWorker returns a ready worker for the process pid in slot, reached through ch.
// idle retires its idle virtual connections (0: 4 s).
func NewWorker(slot, pid int, ch Channel, idle time.Duration) *Worker {
	return newWorker(slot, pid, ch, idle)
}

// Channel is how the worker gets connections.
func (w *Worker) Channel() Channel { return w.ch }

// Pool holds the worker's idle virtual connections.
func (w *Worker) Pool() *Pool { return w.pool }

// Label is the worker's slot as a metric label value.
func (w *Worker) Label() string { return w.label }

// SetState sets the worker's state.
func (w *Worker) SetState(s WorkerState) { w.state.Store(int32(s)) }

// CompareAndSwapState moves the worker from old to new state if it is in old.
func (w *Worker) CompareAndSwapState(old, new WorkerState) bool {
	return w.state.CompareAndSwap(int32(old), int32(new))
}

func newWorker(slot, pid int, ch Channel, idle time.Duration) *Worker {
	w := &Worker{Slot: slot, PID: pid, ch: ch, label: fmt.Sprint(slot)}
	w.state.Store(int32(StateReady))
	w.idleSince.Store(time.Now().UnixNano())
	// Idle virtual connections are retired after idle, shorter than Node's default
	// keepAliveTimeout (5 s), so the edge does not reuse one the worker is closing.
	w.pool = newPool(w, idle)
	return w
}

// TakesNew reports whether the worker may get new sessions now: it is ready and not
// marked stuck.
func (w *Worker) TakesNew(now time.Time) bool {
	return w.State() == StateReady && now.UnixNano() >= w.stuckUntil.Load()
}

// stuckFor is how long a worker that stopped taking work gets no new sessions.
const stuckFor = 5 * time.Second

// MarkStuck takes the worker out of routing for new sessions for stuckFor; the sessions
// it holds stay (they exist nowhere else).
func (w *Worker) MarkStuck(log *slog.Logger, why string) {
	until := time.Now().Add(stuckFor).UnixNano()
	if prev := w.stuckUntil.Swap(until); prev < time.Now().UnixNano() {
		log.Warn("worker takes no new sessions for a while: "+why, "worker", w.Slot, "pid", w.PID, "for", stuckFor)
	}
}

// WebSockets is the number of WebSockets the worker last reported holding.
func (w *Worker) WebSockets() int64 { return w.ch.WebSockets() }

// State returns the worker's current state.
func (w *Worker) State() WorkerState { return WorkerState(w.state.Load()) }

// DialVirtual creates a socketpair, hands one end to the worker like a client connection,
// and returns the other end for the edge's per-request proxy. A backend reached by
// address (a Dialer) is dialed instead.
func (w *Worker) DialVirtual(ctx context.Context) (net.Conn, error) {
	if d, ok := w.ch.(Dialer); ok {
		c, err := d.Dial(ctx)
		if err != nil {
			return nil, fmt.Errorf("worker %d: %w", w.Slot, err)
		}
		return c, nil
	}
	mine, theirs, err := fdpass.SocketPair(unix.SOCK_STREAM)
	if err != nil {
		return nil, err
	}
	defer theirs.Close()
	if err := w.ch.Deliver(ctx, theirs, fdpass.Meta{Kind: fdpass.KindVirtual}); err != nil {
		mine.Close()
		return nil, fmt.Errorf("worker %d: virtual connection: %w", w.Slot, err)
	}
	return mine, nil
}

// TrySender is a Channel that can hand over a raw descriptor without waiting (the edge's
// accept-loop fast path).
type TrySender interface {
	TrySend(nfd int, meta fdpass.Meta) error
}

// TrySend hands the descriptor nfd to the worker with one non-blocking sendmsg: a full
// channel is an error at once (the caller takes a slower path that waits). The caller
// still owns nfd.
func (c *GoChannel) TrySend(nfd int, meta fdpass.Meta) error { return fdpass.TrySend(c.uc, nfd, meta) }

// GoChannel speaks stickyd's own protocol (package fdpass) with a Go worker.
type GoChannel struct {
	uc      *net.UnixConn
	timeout time.Duration
	hello   chan int // the worker's pid, once
	done    chan struct{}
	once    sync.Once

	ws      atomic.Int64 // the count the worker last reported
	onStats atomic.Pointer[func(n int64)]
}

// NewGoChannel wraps the edge's end of a worker's SEQPACKET channel. timeout bounds each
// handoff (0: 5 s); onStats, if set, is called with each WebSocket count the worker reports.
func NewGoChannel(uc *net.UnixConn, timeout time.Duration, onStats func(n int64)) *GoChannel {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	// A small send buffer bounds how many connections can queue for a worker that stopped
	// reading its channel before handoffs to it start timing out and go elsewhere.
	uc.SetWriteBuffer(32 << 10)
	c := &GoChannel{uc: uc, timeout: timeout, hello: make(chan int, 1), done: make(chan struct{})}
	c.SetOnStats(onStats)
	go c.receive()
	return c
}

func (c *GoChannel) receive() {
	defer c.Close()
	for {
		conn, m, err := fdpass.Recv(c.uc)
		if conn != nil {
			conn.Close() // workers never send connections back
		}
		if err != nil {
			if errors.Is(err, fdpass.ErrBadMeta) || errors.Is(err, fdpass.ErrTruncated) {
				continue
			}
			return
		}
		switch m.Kind {
		case fdpass.KindHello:
			select {
			case c.hello <- int(m.Value):
			default:
			}
		case fdpass.KindStats:
			c.ws.Store(int64(m.Value))
			if f := c.onStats.Load(); f != nil && *f != nil {
				(*f)(int64(m.Value))
			}
		}
	}
}

// SetOnStats sets the function called with each WebSocket count the worker reports.
func (c *GoChannel) SetOnStats(f func(n int64)) { c.onStats.Store(&f) }

// Hello returns the worker's pid once it has announced itself.
func (c *GoChannel) Hello() <-chan int { return c.hello }

// Deliver sends conn with one sendmsg. The write deadline turns a worker that stopped
// reading its channel into an error instead of a blocked edge.
func (c *GoChannel) Deliver(ctx context.Context, conn syscall.Conn, meta fdpass.Meta) error {
	deadline := time.Now().Add(c.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.uc.SetWriteDeadline(deadline)
	err := fdpass.Send(c.uc, conn, meta)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: worker did not take the connection within %v", ErrWorkerTimeout, c.timeout)
	}
	return err
}

func (c *GoChannel) CanReplay() bool { return true }

// WebSockets is the count the worker last reported.
func (c *GoChannel) WebSockets() int64 { return c.ws.Load() }

func (c *GoChannel) Done() <-chan struct{} { return c.done }

func (c *GoChannel) Close() error {
	c.once.Do(func() {
		close(c.done)
		c.uc.Close()
	})
	return nil
}
