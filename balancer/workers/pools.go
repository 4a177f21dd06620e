//go:build unix

package workers

import (
	"context"
	"maps"
	"runtime"
	"slices"
	"time"

	"github.com/stickyd/stickyd/metrics"
)

// A named pool is a Supervisor with Max set, run under the default pool's Supervisor
// (Pools). Its size follows demand: a worker starts when requests wait in the pool's Gate
// and every worker is at the pool's concurrency, up to Max; a worker with nothing in
// flight, no session and no WebSocket for Idle is drained and stopped, down to Min. A
// pool of Min 0 runs no process until its first request.

// owner returns the supervisor (s or one of its pools) whose worker runs in slot.
func (s *Supervisor) owner(slot int) *Supervisor {
	for _, pool := range s.Pools {
		pool.mu.Lock()
		_, ok := pool.procs[slot]
		pool.mu.Unlock()
		if ok {
			return pool
		}
	}
	return s
}

// runningSlots lists the slots with a ready worker, in order: s's own, then its pools'.
func (s *Supervisor) runningSlots() []int {
	s.mu.Lock()
	slots := slices.Sorted(maps.Keys(s.procs))
	s.mu.Unlock()
	for _, pool := range s.Pools {
		slots = append(slots, pool.runningSlots()...)
	}
	return slots
}

// PoolOf names the pool of the worker in slot ("" for the default pool).
func (s *Supervisor) PoolOf(slot int) string { return s.owner(slot).Name }

func (s *Supervisor) idle() time.Duration {
	if s.Idle <= 0 {
		return 30 * time.Second
	}
	return s.Idle
}

// maxSpawning bounds the workers of one pool starting at once: a burst of requests must
// not fork Max processes onto a machine that is already busy (Node takes ~0.3 s of CPU
// to start).
func maxSpawning() int { return max(2, runtime.NumCPU()) }

// spawnPause is how long a pool waits after a worker could not start at all before it
// tries again, however many requests wait: the same failure would only repeat.
const spawnPause = 10 * time.Second

type slotRun struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// runOnDemand runs a named pool until ctx ends.
func (s *Supervisor) runOnDemand(ctx context.Context) {
	m := s.Edge.WorkerSettings().Metrics
	label := s.Gate.Label()
	spawns, retirements := m.PoolSpawns.WithLabelValues(label), m.PoolRetirements.WithLabelValues(label)
	starting := m.PoolWorkers.WithLabelValues(label, metrics.WorkerStarting)
	running := map[int]*slotRun{}
	retiring := map[int]bool{} // slots told to stop, still in running until they end
	// countStarting: running, not serving yet, and not on its way out (a retiring worker
	// has left the edge's lists: counted, it read as a worker starting after a shrink and
	// held back the next growth).
	countStarting := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		n := 0
		for slot := range running {
			if _, serving := s.procs[slot]; !serving && !retiring[slot] {
				n++
			}
		}
		return n
	}
	ended := make(chan int, s.Max+len(s.adopt))
	start := func(slot int) {
		sctx, cancel := context.WithCancel(ctx)
		r := &slotRun{cancel: cancel, done: make(chan struct{})}
		running[slot] = r
		go func() {
			defer close(r.done)
			s.runSlot(sctx, slot)
			ended <- slot
		}()
	}
	freeSlot := func() int {
		for i := range s.Max {
			if running[s.FirstSlot+i] == nil {
				return s.FirstSlot + i
			}
		}
		return -1
	}
	s.mu.Lock()
	adopted := slices.Sorted(maps.Keys(s.adopt))
	s.mu.Unlock()
	for _, slot := range adopted {
		start(slot)
	}
	for len(running) < s.Min {
		start(freeSlot())
	}
	if s.Min == 0 {
		// Nothing to wait for: the edge may accept at once.
		s.mu.Lock()
		close(s.ready)
		close(s.settled)
		s.slotDone = map[int]bool{}
		s.mu.Unlock()
	}
	var pauseUntil time.Time // a worker could not start: no new attempt before then
	tick := time.NewTicker(min(time.Second, max(s.idle()/4, 50*time.Millisecond)))
	defer tick.Stop()
	demand := s.Gate.Demand()
	for {
		s.mu.Lock()
		changed := s.changedC()
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			for _, r := range running {
				<-r.done
			}
			return
		case slot := <-ended:
			delete(running, slot)
			delete(retiring, slot)
			s.mu.Lock()
			reason, failed := s.gaveUp[slot]
			s.mu.Unlock()
			if failed && ctx.Err() == nil {
				pauseUntil = time.Now().Add(spawnPause)
				s.Gate.SetDown(reason)
				s.Logger.Error("pool cannot start a worker; trying again later (its waiting requests get 503 after the queue timeout)",
					"worker", slot, "err", reason, "retry_in", spawnPause)
			}
		case <-demand:
		case <-changed:
		case <-tick.C:
			// A worker whose stuck mark expired has room again.
			s.Gate.Kick()
		}
		if s.isFrozen() || s.killing.Load() {
			continue // the next edge image supervises them; nothing starts or stops
		}
		spawning := countStarting()
		all, forRoom := s.Gate.Waiting()
		need := 0
		switch {
		case all == 0:
		case s.Gate.Concurrency == 0 || forRoom == 0:
			// No limit per worker (or only WebSockets wait): one worker takes them all.
			if len(running) == 0 {
				need = 1
			}
		default:
			need = (forRoom+s.Gate.Concurrency-1)/s.Gate.Concurrency - spawning
		}
		need = min(need, s.Max-len(running), maxSpawning()-spawning)
		if time.Now().Before(pauseUntil) {
			need = 0
		}
		for range need {
			slot := freeSlot()
			s.Logger.Info("pool growing: requests are waiting", "worker", slot,
				"waiting", all, "workers", len(running)+1, "max", s.Max)
			start(slot)
			spawns.Inc()
		}
		if all == 0 {
			left := len(running)
			for _, slot := range s.idleWorkers(left - s.Min) {
				left--
				s.Logger.Info("pool shrinking: worker idle", "worker", slot, "idle", s.idle(), "workers", left, "min", s.Min)
				running[slot].cancel()
				retiring[slot] = true
				retirements.Inc()
			}
		}
		starting.Set(float64(countStarting()))
	}
}

// idleWorkers drains up to n workers idle for the pool's idle time and returns their
// slots, to be stopped. A worker counts as idle with no request in flight, no session or
// key pinned to it and no WebSocket.
func (s *Supervisor) idleWorkers(n int) []int {
	if n <= 0 {
		return nil
	}
	now := time.Now()
	s.mu.Lock()
	procs := slices.Collect(maps.Values(s.procs))
	s.mu.Unlock()
	// The longest idle go first.
	slices.SortFunc(procs, func(a, b *proc) int { return a.w.IdleSince().Compare(b.w.IdleSince()) })
	var out []int
	for _, p := range procs {
		w := p.w
		since := w.IdleSince()
		if len(out) == n || since.IsZero() || now.Sub(since) < s.idle() || w.State() != StateReady ||
			s.Edge.Load(p.slot) > 0 || w.WebSockets() > 0 || w.recentHandoff(now) {
			continue
		}
		// Out of routing first; a request admitted in between keeps the worker.
		s.Edge.Drain(p.slot)
		if w.InFlight() > 0 {
			w.CompareAndSwapState(StateDraining, StateReady)
			continue
		}
		out = append(out, p.slot)
	}
	return out
}
