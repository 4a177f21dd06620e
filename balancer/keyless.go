//go:build unix

package balancer

import (
	"math/rand/v2"
	"sync"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
)

// leastConnected picks the worker holding the fewest connections
// without an identity: the WebSockets it reports (a backend's are the edge's own tunnels,
// counted exactly), or more while connections routed to it lately are not in that count
// yet (a worker reports once a second).
func (b *Balancer) leastConnected(ws []*workers.Worker, tried uint64, now time.Time) *workers.Worker {
	var arr [64]sticky.Candidate
	cands := b.candidates(arr[:0], ws, tried)
	if len(cands) == 0 {
		return nil
	}
	// The least loaded of all, ties broken from a random start: a keyless connection has
	// no session to keep apart from others, and its route is counted at once (add), so the
	// herd that two random choices guard against is only the routes decided at the same
	// instant. (Two random choices left 200 WebSockets over 4 at max/mean up to 1.08.)
	start := int(rand.Uint64N(uint64(len(cands))))
	var w *workers.Worker
	bestLoad := 0
	for k := range cands {
		i := (start + k) % len(cands)
		c := b.worker(cands[i].Slot)
		if c == nil {
			continue // removed since ws was taken (it died): not a candidate any more
		}
		load := recentFor(c).estimate(now, cands[i].Load+int(c.WebSockets()))
		if w == nil || load < bestLoad {
			w, bestLoad = c, load
		}
	}
	if w == nil {
		return nil
	}
	if _, dials := w.Channel().(workers.Dialer); !dials {
		// A backend's route is counted where the edge tunnels to it (countTunnel): the
		// accept loop's fast path routes every WebSocket first, finds no descriptor
		// channel, and leaves it to the general path, which routes it again.
		recentFor(w).add()
	}
	return w
}

// countTunnel counts a keyless connection about to be tunnelled to a backend, until its
// tunnel shows in the backend's count.
func countTunnel(w *workers.Worker) { recentFor(w).add() }

// recentWindow is how long routes are counted on top of a worker's load as it was when
// the window began.
const recentWindow = 2 * time.Second

// recentRoutes keeps a worker's load honest during a burst. A load (learned sessions,
// reported WebSockets) lags the routing decisions: a session counts once its worker
// answered its handshake, a WebSocket once the worker reported it. Counting recent routes
// on top of the load would count every answered one twice, and favour the slowest worker
// (fewest answers so far) — a feedback that piled 61 of 200 sessions on one of 4. Instead
// the estimate is the load at the window's start plus every route since, or the load now
// if that is more (what was routed before the window and answered since).
type recentRoutes struct {
	mu     sync.Mutex
	start  time.Time
	base   int
	routed int
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

// estimate is the worker's load for a routing decision, given its load now.
func (r *recentRoutes) estimate(now time.Time, load int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now.Sub(r.start) >= recentWindow {
		r.start, r.base, r.routed = now, load, 0
	}
	return max(load, r.base+r.routed)
}

// add counts one route to the worker.
func (r *recentRoutes) add() {
	r.mu.Lock()
	r.routed++
	r.mu.Unlock()
}
