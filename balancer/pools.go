//go:build unix

package balancer

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/upgrade"
)

// Pool sends the requests it matches to the workers of a named pool instead of the
// default pool's: the first pool whose every set condition holds wins. A pool never takes
// another pool's traffic, and sessions stay inside the pool that opened them.
type Pool struct {
	Name string
	// Conditions; the empty ones are not checked.
	PathPrefix  string // the request path starts with it
	Host        string // the Host, without port, equals it (case-insensitive)
	Header      string // a field of this name ...
	HeaderValue string // ... with this value (any value if empty)
	// Gate admits the pool's requests (concurrency per worker, queue); required.
	Gate *workers.Gate
}

// matches reports whether h belongs to the pool.
func (p *Pool) matches(h *upgrade.Head) bool {
	if p.PathPrefix != "" && !strings.HasPrefix(h.Path, p.PathPrefix) {
		return false
	}
	if p.Host != "" {
		host := h.Host
		if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.HasSuffix(host, "]") {
			host = host[:i]
		}
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
		if !strings.EqualFold(host, p.Host) {
			return false
		}
	}
	if p.Header != "" {
		v, ok := headerValue(h, p.Header)
		if !ok || p.HeaderValue != "" && v != p.HeaderValue {
			return false
		}
	}
	return true
}

func headerValue(h *upgrade.Head, name string) (string, bool) {
	for i := range h.Fields {
		if strings.EqualFold(h.Fields[i].Name, name) {
			return strings.TrimSpace(h.Fields[i].Value), true
		}
	}
	return "", false
}

// pool is a Pool with the workers in its routing.
type pool struct {
	Pool
	workers atomic.Pointer[[]*workers.Worker]
}

func (b *Balancer) initPools() {
	b.defPool = &pool{}
	b.defPool.workers.Store(&[]*workers.Worker{})
	for _, p := range b.cfg.Pools {
		np := &pool{Pool: p}
		np.workers.Store(&[]*workers.Worker{})
		b.pools = append(b.pools, np)
	}
}

// poolOf returns the pool a request head belongs to.
func (b *Balancer) poolOf(h *upgrade.Head) *pool {
	for _, p := range b.pools {
		if p.matches(h) {
			return p
		}
	}
	return b.defPool
}

// poolNamed returns the pool of the workers named name (the default pool for "" or a
// name no -pool gives).
func (b *Balancer) poolNamed(name string) *pool {
	if name != "" {
		for _, p := range b.pools {
			if p.Name == name {
				return p
			}
		}
	}
	return b.defPool
}

// setPoolWorkers keeps the pools' own worker lists in step with all (b.mu held).
func (b *Balancer) setPoolWorkers(all []*workers.Worker) {
	for _, p := range append([]*pool{b.defPool}, b.pools...) {
		ws := make([]*workers.Worker, 0, len(all))
		for _, w := range all {
			if b.poolNamed(w.PoolName) == p {
				ws = append(ws, w)
			}
		}
		p.workers.Store(&ws)
	}
}

// publishPoolGauges sets stickyd_pool_workers for every pool (b.mu held).
func (b *Balancer) publishPoolGauges() {
	for _, p := range append([]*pool{b.defPool}, b.pools...) {
		var ready, draining float64
		for _, w := range *p.workers.Load() {
			switch w.State() {
			case workers.StateReady:
				ready++
			case workers.StateDraining:
				draining++
			}
		}
		label := metrics.DefaultPool
		if p.Gate != nil {
			label = p.Gate.Label()
		}
		b.m.PoolWorkers.WithLabelValues(label, metrics.WorkerReady).Set(ready)
		b.m.PoolWorkers.WithLabelValues(label, metrics.WorkerDraining).Set(draining)
	}
}

// retryAfter is what a client turned away by a full or slow pool queue is told to wait,
// in seconds.
const retryAfter = "5"

// acquire waits in r's pool gate for a worker with room for a request (or, for a
// WebSocket, for any worker), while the client stays; failed, if set, is the worker this
// request just failed on and is not given it again. (By identity, not by slot: a dead
// worker's replacement takes its slot, and is the one the retry should get.) On failure
// it has answered 503 with Retry-After.
func (b *Balancer) acquire(c net.Conn, r *route, failed *workers.Worker, anyWorker bool, drain bool) bool {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := watchClient(c, cancel)
	defer stop()
	var skip func(*workers.Worker) bool
	if failed != nil {
		skip = func(w *workers.Worker) bool { return w == failed }
	}
	var err error
	if anyWorker {
		r.w, err = r.pool.Gate.AcquireAny(ctx, skip)
	} else {
		r.w, err = r.pool.Gate.Acquire(ctx, skip)
	}
	switch {
	case err == nil:
		return true
	case errors.Is(err, workers.ErrQueueFull):
		b.m.Rejections.WithLabelValues(metrics.RejectQueueFull).Inc()
		b.warnf("pool queue full: requests answered 503; raise the pool's max= or queue=", "pool", r.pool.Name)
		b.rejectRetry(c, "the "+r.pool.Name+" pool is busy and its queue is full; try again", drain)
	case errors.Is(err, workers.ErrPoolDown):
		b.m.Rejections.WithLabelValues(metrics.RejectNoWorker).Inc()
		b.warnf("pool cannot start its workers: requests answered 503; see the worker errors above", "pool", r.pool.Name, "err", err)
		b.rejectRetry(c, "the "+r.pool.Name+" pool has no worker and cannot start one; try again later", drain)
	case errors.Is(err, workers.ErrQueueTimeout):
		b.m.Rejections.WithLabelValues(metrics.RejectQueueTimeout).Inc()
		b.warnf("pool queue wait timed out: requests answered 503; raise the pool's max= or queue-timeout=", "pool", r.pool.Name)
		b.rejectRetry(c, "no "+r.pool.Name+" worker was free in time; try again", drain)
	default:
		b.m.Rejections.WithLabelValues(metrics.RejectClientGone).Inc()
	}
	return false
}

// rejectRetry answers 503 with Retry-After and closes.
func (b *Balancer) rejectRetry(c net.Conn, msg string, drain bool) {
	b.rejectWith(c, 503, "Retry-After: "+retryAfter+"\r\n", msg, drain)
}

// watchClient calls cancel when the client closes its connection or it fails, checked
// once a second while a request waits in a pool's queue — by a timer, so a request that
// gets its worker at once (the usual case) starts no goroutine. stop ends the watch.
func watchClient(c net.Conn, cancel context.CancelFunc) (stop func()) {
	var mu sync.Mutex // guards stopped and t (the callback may run before t is assigned)
	stopped := false
	var t *time.Timer
	mu.Lock()
	defer mu.Unlock()
	t = time.AfterFunc(time.Second, func() {
		if clientGone(c) {
			cancel()
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !stopped {
			t.Reset(time.Second)
		}
	})
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}

// PoolStat is a pool's state at a glance (admin views).
type PoolStat struct {
	Name        string `json:"name"` // metrics.DefaultPool for the default pool
	Workers     int    `json:"workers"`
	Ready       int    `json:"ready"`
	InFlight    int    `json:"in_flight"`
	Waiting     int    `json:"waiting"`     // requests in the pool's queue
	Concurrency int    `json:"concurrency"` // per worker; 0: no limit
}

// PoolStats returns the default pool's state, then every named pool's, in -pool order.
func (b *Balancer) PoolStats() []PoolStat {
	var out []PoolStat
	for _, p := range append([]*pool{b.defPool}, b.pools...) {
		st := PoolStat{Name: metrics.DefaultPool}
		if p.Gate != nil {
			st.Name, st.Concurrency = p.Gate.Label(), p.Gate.Concurrency
			st.Waiting, _ = p.Gate.Waiting()
		}
		for _, w := range *p.workers.Load() {
			st.Workers++
			if w.State() == workers.StateReady {
				st.Ready++
			}
			st.InFlight += w.InFlight()
		}
		out = append(out, st)
	}
	return out
}
