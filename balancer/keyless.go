package balancer

import (
	"math/rand/v2"
	"sync"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
)

// leastConnected picks, by two random choices, the worker holding the fewest connections
// without an identity: the WebSockets it reports (a backend's are the edge's own tunnels,
// counted exactly) plus those routed to it in the last second or two, which a worker's
// report (once a second) does not show yet.
func (b *Balancer) leastConnected(tried uint64, now time.Time) *workers.Worker {
	ws := *b.workers.Load()
	var arr [64]sticky.Candidate
	cands := b.candidates(arr[:0], ws, tried)
	for i := range cands {
		w := b.worker(cands[i].Slot)
		cands[i].Load += int(w.WebSockets()) + recentFor(w).count(now)
	}
	i := sticky.LeastLoaded(cands, rand.Uint64())
	if i < 0 {
		return nil
	}
	w := b.worker(cands[i].Slot)
	recentFor(w).add(now)
	return w
}

// recentRoutes counts the keyless connections routed to one worker in the current and
// the previous second.
type recentRoutes struct {
	mu        sync.Mutex
	sec       int64
	cur, prev int
}

// recent holds a recentRoutes per worker in routing (RemoveWorker deletes its entry).
var recent sync.Map // *workers.Worker → *recentRoutes

func recentFor(w *workers.Worker) *recentRoutes {
	if r, ok := recent.Load(w); ok {
		return r.(*recentRoutes)
	}
	r, _ := recent.LoadOrStore(w, new(recentRoutes))
	return r.(*recentRoutes)
}

func (r *recentRoutes) roll(now time.Time) {
	switch s := now.Unix(); {
	case s == r.sec:
	case s == r.sec+1:
		r.sec, r.prev, r.cur = s, r.cur, 0
	default:
		r.sec, r.prev, r.cur = s, 0, 0
	}
}

func (r *recentRoutes) add(now time.Time) {
	r.mu.Lock()
	r.roll(now)
	r.cur++
	r.mu.Unlock()
}

func (r *recentRoutes) count(now time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.roll(now)
	return r.cur + r.prev
}
