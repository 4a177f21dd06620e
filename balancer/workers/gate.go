//go:build unix

package workers

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/metrics"
)

// ErrQueueFull means a pool's queue of waiting requests is full: the client gets 503 with
// Retry-After at once.
var ErrQueueFull = errors.New("balancer: the pool's queue is full")

// ErrQueueTimeout means a request waited for a worker of its pool longer than the pool's
// queue timeout.
var ErrQueueTimeout = errors.New("balancer: no worker of the pool was free within the queue timeout")

// ErrPoolDown means the pool has no worker and could not start one: its requests are
// answered at once instead of waiting for the queue timeout.
var ErrPoolDown = errors.New("balancer: the pool cannot start its workers")

// Gate admits requests to the workers of a named pool: at most Concurrency in flight on
// each worker, the others wait in a bounded first-in first-out queue until a worker has
// room (one finishes a request, or the pool grows). The pool's Supervisor watches the
// queue to start workers on demand; the edge asks the gate for a worker (Acquire) and
// gives it back when the answer is complete (Release).
//
// Requests bound to a session go to the session's worker whatever its load (Claim): a
// session exists only there, so the concurrency limit bounds what the pool takes on, not
// what a session already holds.
type Gate struct {
	Name        string        // the pool's name (metric label); "" is metrics.DefaultPool
	Concurrency int           // requests in flight per worker; 0: no limit (then the gate only waits for a first worker)
	MaxQueue    int           // requests waiting at once; 0: 1000
	Timeout     time.Duration // longest wait in the queue; 0: 30 s
	Metrics     *metrics.Metrics

	mu      sync.Mutex
	members []*Worker // the pool's workers in routing
	queue   []*waiter
	demand  chan struct{} // 1-buffered: a request started waiting (for the pool's Supervisor)
	qlen    prometheus.Gauge
	wait    prometheus.Observer
	down    string // SetDown's reason, until a worker joins
}

type waiter struct {
	anyWorker bool // a WebSocket: it needs a worker, not room for a request
	skip      func(*Worker) bool
	ch        chan *Worker // 1-buffered: the worker granted
	since     time.Time
}

// Label is the pool's metric label value.
func (g *Gate) Label() string {
	if g.Name == "" {
		return metrics.DefaultPool
	}
	return g.Name
}

func (g *Gate) initLocked() {
	if g.demand != nil {
		return
	}
	g.demand = make(chan struct{}, 1)
	m := g.Metrics
	if m == nil {
		m, _ = metrics.New(nil, false)
		g.Metrics = m
	}
	g.qlen = m.PoolQueueLength.WithLabelValues(g.Label())
	g.wait = m.PoolQueueWait.WithLabelValues(g.Label())
	m.PoolInFlight.WithLabelValues(g.Label())
}

// Demand is signalled when a request starts waiting: the pool may need another worker.
func (g *Gate) Demand() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.initLocked()
	return g.demand
}

// Waiting is the number of requests in the queue, and of those the ones that wait for room
// on a worker (the rest are WebSockets waiting for the pool's first worker).
func (g *Gate) Waiting() (all, forRoom int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, wt := range g.queue {
		if !wt.anyWorker {
			forRoom++
		}
	}
	return len(g.queue), forRoom
}

func (g *Gate) maxQueue() int {
	if g.MaxQueue <= 0 {
		return 1000
	}
	return g.MaxQueue
}

func (g *Gate) timeout() time.Duration {
	if g.Timeout <= 0 {
		return 30 * time.Second
	}
	return g.Timeout
}

// Join adds w to the pool's workers and gives it the requests that wait.
func (g *Gate) Join(w *Worker) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.initLocked()
	w.SetInFlightGauge(g.Metrics.PoolInFlight.WithLabelValues(g.Label()))
	g.members = append(slices.DeleteFunc(g.members, func(o *Worker) bool { return o.Slot == w.Slot }), w)
	g.down = ""
	g.dispatchLocked()
}

// SetDown records that the pool could not start a worker (reason says why): while it has
// none, waiting requests and new ones fail at once with ErrPoolDown. A worker that joins
// ends it.
func (g *Gate) SetDown(reason string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.initLocked()
	g.down = reason
	if len(g.members) > 0 {
		return
	}
	for _, wt := range g.queue {
		wt.ch <- nil
	}
	clear(g.queue)
	g.queue = g.queue[:0]
	g.qlen.Set(0)
}

func (g *Gate) downErr() error { return fmt.Errorf("%w: %s", ErrPoolDown, g.down) }

// Leave removes w from the pool's workers. Its requests in flight still Release it.
func (g *Gate) Leave(w *Worker) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.members = slices.DeleteFunc(g.members, func(o *Worker) bool { return o == w })
}

// Kick gives waiting requests to workers that have room again for another reason than a
// finished request (a drain undone, a stuck mark expired).
func (g *Gate) Kick() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dispatchLocked()
}

// Acquire returns a worker of the pool with room for one more request, counted in its
// InFlight until Release; skip, if set, excludes workers (ones that just failed this
// request). With none free it waits in the queue, in arrival order, until one is, the
// queue timeout passes (ErrQueueTimeout) or ctx ends; a full queue is ErrQueueFull.
func (g *Gate) Acquire(ctx context.Context, skip func(*Worker) bool) (*Worker, error) {
	return g.acquire(ctx, skip, false)
}

// AcquireAny returns a worker that takes new sessions (a WebSocket, which is a session,
// not a request in flight: nothing is counted, nothing to Release), waiting in the queue
// while the pool has none — a pool of min=0 before its first request.
func (g *Gate) AcquireAny(ctx context.Context, skip func(*Worker) bool) (*Worker, error) {
	return g.acquire(ctx, skip, true)
}

func (g *Gate) acquire(ctx context.Context, skip func(*Worker) bool, anyWorker bool) (*Worker, error) {
	wt := &waiter{anyWorker: anyWorker, skip: skip}
	g.mu.Lock()
	g.initLocked()
	// Only the first in line may take a free worker: a request never overtakes one that
	// waits (WebSockets never wait behind requests: they need no room).
	if wt.anyWorker || len(g.queue) == 0 {
		if w := g.pickLocked(wt, time.Now()); w != nil {
			g.mu.Unlock()
			return w, nil
		}
	}
	if g.down != "" && len(g.members) == 0 {
		err := g.downErr()
		g.mu.Unlock()
		return nil, err
	}
	if len(g.queue) >= g.maxQueue() {
		g.mu.Unlock()
		return nil, ErrQueueFull
	}
	wt.ch = make(chan *Worker, 1)
	wt.since = time.Now()
	g.queue = append(g.queue, wt)
	g.qlen.Set(float64(len(g.queue)))
	g.mu.Unlock()
	select {
	case g.demand <- struct{}{}:
	default:
	}

	t := time.NewTimer(g.timeout())
	defer t.Stop()
	var err error
	select {
	case w := <-wt.ch:
		if w == nil {
			g.mu.Lock()
			defer g.mu.Unlock()
			return nil, g.downErr()
		}
		return w, nil
	case <-t.C:
		err = ErrQueueTimeout
	case <-ctx.Done():
		err = ctx.Err()
	}
	g.mu.Lock()
	if i := slices.Index(g.queue, wt); i >= 0 {
		g.queue = slices.Delete(g.queue, i, i+1)
		g.qlen.Set(float64(len(g.queue)))
		g.mu.Unlock()
		g.wait.Observe(time.Since(wt.since).Seconds())
		return nil, err
	}
	g.mu.Unlock()
	// Granted (or failed) as the wait ended: give the room back to the next in line.
	if w := <-wt.ch; w != nil && !anyWorker {
		g.Release(w)
	}
	return nil, err
}

// Claim counts a request for w that is bound to it (a session's), whatever w's load.
func (g *Gate) Claim(w *Worker) { w.BeginRequest() }

// Release ends a request counted by Acquire or Claim and gives the room to the first
// request waiting.
func (g *Gate) Release(w *Worker) {
	g.mu.Lock()
	defer g.mu.Unlock()
	w.EndRequest()
	g.dispatchLocked()
}

// dispatchLocked grants free workers to waiting requests in arrival order. g.mu held.
func (g *Gate) dispatchLocked() {
	if len(g.queue) == 0 {
		return
	}
	now := time.Now()
	roomLeft := true
	kept := g.queue[:0]
	for _, wt := range g.queue {
		var w *Worker
		if wt.anyWorker || roomLeft {
			w = g.pickLocked(wt, now)
		}
		if w == nil {
			// Later requests for room would find none either — unless this one's skip
			// excluded the free worker: a request retried after a failure must not hold
			// up the queue behind it.
			roomLeft = roomLeft && (wt.anyWorker || wt.skip != nil)
			kept = append(kept, wt)
			continue
		}
		g.wait.Observe(now.Sub(wt.since).Seconds())
		wt.ch <- w
	}
	clear(g.queue[len(kept):])
	g.queue = kept
	g.qlen.Set(float64(len(g.queue)))
}

// pickLocked returns the member with the fewest requests in flight that takes new work
// and, unless wt only needs a worker, has room; it counts the request. Ties start from a
// random member so equal workers share the load. g.mu held.
func (g *Gate) pickLocked(wt *waiter, now time.Time) *Worker {
	n := len(g.members)
	if n == 0 {
		return nil
	}
	start := int(rand.Uint64N(uint64(n)))
	var best *Worker
	bestLoad := 0
	for k := range n {
		w := g.members[(start+k)%n]
		if !w.TakesNew(now) || (wt.skip != nil && wt.skip(w)) {
			continue
		}
		load := w.InFlight()
		if !wt.anyWorker && g.Concurrency > 0 && load >= g.Concurrency {
			continue
		}
		if best == nil || load < bestLoad {
			best, bestLoad = w, load
		}
	}
	if best != nil && !wt.anyWorker {
		best.BeginRequest()
	}
	return best
}
