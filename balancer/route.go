//go:build unix

package balancer

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// AddWorker puts w into routing (replacing whatever held its slot before).
func (b *Balancer) AddWorker(w *workers.Worker) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.workers.Load()
	next := make([]*workers.Worker, 0, len(old)+1)
	for _, o := range old {
		if o.Slot != w.Slot {
			next = append(next, o)
		}
	}
	next = append(next, w)
	slices.SortFunc(next, func(a, c *workers.Worker) int { return a.Slot - c.Slot })
	b.workers.Store(&next)
	b.setPoolWorkers(next)
	b.publishWorkerGauges(next)
	if g := b.poolNamed(w.PoolName).Gate; g != nil {
		g.Join(w)
	} else {
		w.SetInFlightGauge(b.m.PoolInFlight.WithLabelValues(metrics.DefaultPool))
	}
}

// RemoveWorker takes w out of routing at once and forgets its sessions: their clients
// get engine.io's "Session ID unknown" and reconnect to a survivor.
func (b *Balancer) RemoveWorker(w *workers.Worker) {
	b.mu.Lock()
	old := *b.workers.Load()
	next := make([]*workers.Worker, 0, len(old))
	for _, o := range old {
		if o != w {
			next = append(next, o)
		}
	}
	b.workers.Store(&next)
	b.setPoolWorkers(next)
	b.publishWorkerGauges(next)
	b.mu.Unlock()
	w.SetState(workers.StateGone)
	if g := b.poolNamed(w.PoolName).Gate; g != nil {
		g.Leave(w)
	}
	recent.Delete(w)
	if n := b.sessions.ForgetSlot(w.Slot) + b.pins.ForgetSlot(w.Slot); n > 0 {
		b.m.SessionEvictions.WithLabelValues(metrics.EvictWorkerGone).Add(float64(n))
	}
	b.m.Sessions.WithLabelValues(w.Label()).Set(0)
	w.Pool().CloseIdle()
}

// Drain stops routing new sessions to the worker in slot; its existing sessions stay.
func (b *Balancer) Drain(slot int) bool {
	w := b.worker(slot)
	if w == nil {
		return false
	}
	w.CompareAndSwapState(workers.StateReady, workers.StateDraining)
	b.mu.Lock()
	b.publishWorkerGauges(*b.workers.Load())
	b.mu.Unlock()
	return true
}

// Undrain puts a draining worker back into routing for new sessions (the undo of
// Drain); it reports whether slot holds a worker.
func (b *Balancer) Undrain(slot int) bool {
	w := b.worker(slot)
	if w == nil {
		return false
	}
	w.CompareAndSwapState(workers.StateDraining, workers.StateReady)
	b.mu.Lock()
	b.publishWorkerGauges(*b.workers.Load())
	b.mu.Unlock()
	if g := b.poolNamed(w.PoolName).Gate; g != nil {
		g.Kick()
	}
	return true
}

// Workers returns the workers in routing, by slot.
func (b *Balancer) Workers() []*workers.Worker { return *b.workers.Load() }

// SetDraining marks the whole edge as draining (for example from a Kubernetes preStop
// hook): Ready turns false so the orchestrator stops sending new clients, while the edge
// keeps serving those that still arrive and every session it has.
func (b *Balancer) SetDraining(on bool) { b.draining.Store(on) }

// Ready reports whether at least one worker takes new sessions and the edge is open.
func (b *Balancer) Ready() bool {
	if b.isClosing() || b.draining.Load() {
		return false
	}
	for _, w := range *b.workers.Load() {
		if w.State() == workers.StateReady {
			return true
		}
	}
	return false
}

func (b *Balancer) publishWorkerGauges(ws []*workers.Worker) {
	var ready, draining float64
	for _, w := range ws {
		switch w.State() {
		case workers.StateReady:
			ready++
		case workers.StateDraining:
			draining++
		}
	}
	b.m.Workers.WithLabelValues(metrics.WorkerReady).Set(ready)
	b.m.Workers.WithLabelValues(metrics.WorkerDraining).Set(draining)
	b.publishPoolGauges()
}

func (b *Balancer) worker(slot int) *workers.Worker {
	for _, w := range *b.workers.Load() {
		if w.Slot == slot {
			return w
		}
	}
	return nil
}

// route is the routing decision for one request.
type route struct {
	w          *workers.Worker // nil in a pool with a Gate: the gate picks (Balancer.acquire)
	pool       *pool
	key        sticky.Key
	tableKey   string // the session-table entry that pins key to w, if any
	unknownSID bool   // the request names an engine.io session no live worker holds
}

// route picks the worker for a request head. Workers whose slot bit is set in tried
// are skipped (they just failed a handoff).
func (b *Balancer) route(h *upgrade.Head, peer netip.Addr, tried uint64) route {
	query := h.RawQuery
	if !b.engineIOPath(h.Path) {
		query = ""
		if strings.Contains(h.RawQuery, "EIO=") {
			b.warnf("engine.io request outside the engine.io path: it is not routed by its sid; set -engineio-path to the app's socket.io path option",
				"path", h.Path, "engineio_path", b.cfg.EngineIOPath)
		}
	}
	// Nothing here allocates for a request that hits a session or pin: the head goes in
	// as an interface (not a method value, which is a closure), an address key stays a
	// netip.Addr, and the table key is written into a stack buffer and looked up as
	// m[string(buf)]. Only a new pin makes its key string, once.
	p := b.poolOf(h)
	ws := *p.workers.Load()
	key := b.cfg.Rules.IdentifyNoAlloc(sticky.Request{Peer: peer, Query: query, Fields: h})
	var arr [128]byte
	buf := key.AppendTo(arr[:0])
	now := time.Now()
	if key.Kind == sticky.KindSID {
		if slot, tk, ok := b.sessions.GetBytes(buf, now); ok {
			if w := b.worker(slot); w != nil && w.State() != workers.StateGone && tried&slotBit(slot) == 0 && w.PoolName == p.Name {
				return route{w: w, pool: p, key: key, tableKey: tk}
			}
		}
		return route{pool: p, key: key, unknownSID: true}
	}
	if key.Kind == sticky.KindNone && !b.isHandshake(h) {
		if p.Gate != nil {
			return route{pool: p} // the pool's gate picks the worker with room
		}
		// No identity and no session to open (a plain WebSocket, a request outside
		// engine.io): it needs no stickiness, only the worker holding the fewest
		// connections, so many clients behind one address spread.
		return route{w: b.leastConnected(ws, tried, now), pool: p}
	}
	if key.Kind == sticky.KindNone || (b.isHandshake(h) && (key.Kind == sticky.KindIP || key.Kind == sticky.KindXFF)) {
		if p.Gate != nil {
			return route{pool: p}
		}
		// A new engine.io session is not tied to an address: many clients share one
		// behind NAT or a proxy. Its sid, learned from the answer, pins it from then on.
		return route{w: b.leastLoaded(ws, tried), pool: p, key: sticky.Key{}}
	}
	table := b.tableFor(key.Kind)
	if slot, tk, ok := table.GetBytes(buf, now); ok {
		if w := b.worker(slot); w != nil && w.TakesNew(now) && tried&slotBit(slot) == 0 && w.PoolName == p.Name {
			return route{w: w, pool: p, key: key, tableKey: tk}
		}
	}
	w := b.pick(ws, key.Hash(), tried)
	if w == nil {
		return route{pool: p, key: key}
	}
	tk := string(buf)
	if n := table.Put(tk, w.Slot, now); n > 0 {
		b.m.SessionEvictions.WithLabelValues(metrics.EvictCapacity).Add(float64(n))
	}
	return route{w: w, pool: p, key: key, tableKey: tk}
}

// tableFor returns the table that pins keys of kind: sessions (engine.io sids and
// session cookies, learned from the workers' answers) have a budget of their own, so a
// flood of addresses or header values cannot evict them.
func (b *Balancer) tableFor(kind sticky.Kind) *sticky.Table {
	if kind == sticky.KindSID || kind == sticky.KindCookie {
		return b.sessions
	}
	return b.pins
}

// isHandshake reports whether h opens an engine.io session: an EIO query without a sid,
// under the engine.io path.
func (b *Balancer) isHandshake(h *upgrade.Head) bool {
	if !b.engineIOPath(h.Path) {
		return false
	}
	eio, ok := upgrade.ParseEngineIO(h.RawQuery)
	return ok && eio.SID == ""
}

// engineIOPath reports whether path is under EngineIOPath. Outside it, a query's sid
// belongs to the application, not to an engine.io session.
func (b *Balancer) engineIOPath(path string) bool {
	p := b.cfg.EngineIOPath
	return strings.HasPrefix(path, p) || (len(path) == len(p)-1 && strings.HasPrefix(p, path) && p[len(p)-1] == '/')
}

// candidates lists the workers that take new sessions, with their loads.
func (b *Balancer) candidates(buf []sticky.Candidate, ws []*workers.Worker, tried uint64) []sticky.Candidate {
	now := time.Now()
	for _, w := range ws {
		if w.TakesNew(now) && tried&slotBit(w.Slot) == 0 {
			buf = append(buf, sticky.Candidate{Slot: w.Slot, Load: b.Load(w.Slot)})
		}
	}
	return buf
}

func (b *Balancer) pick(ws []*workers.Worker, hash uint64, tried uint64) *workers.Worker {
	var arr [64]sticky.Candidate
	cands := b.candidates(arr[:0], ws, tried)
	i := b.cfg.Balance.Pick(hash, cands)
	if i < 0 {
		return nil
	}
	return b.worker(cands[i].Slot)
}

func (b *Balancer) leastLoaded(ws []*workers.Worker, tried uint64) *workers.Worker {
	now := time.Now()
	var arr [64]sticky.Candidate
	cands := b.candidates(arr[:0], ws, tried)
	// A session counts once its worker's answer names it; until then the handshakes
	// routed to it count (recentRoutes), or a burst of them would all see the same loads
	// and spread at random (200 at once over 4: max/mean 1.6).
	for i := range cands {
		cands[i].Load = recentFor(b.worker(cands[i].Slot)).estimate(now, cands[i].Load)
	}
	i := sticky.LeastLoaded(cands, rand.Uint64())
	if i < 0 {
		return nil
	}
	w := b.worker(cands[i].Slot)
	recentFor(w).add()
	return w
}

// Load is what bounded-load hashing counts for a worker: the sessions and keys pinned
// to it.
func (b *Balancer) Load(slot int) int { return b.sessions.Count(slot) + b.pins.Count(slot) }

// WorkerSettings are the edge's settings that apply to its workers (workers.Edge).
func (b *Balancer) WorkerSettings() workers.Settings {
	return workers.Settings{HandoffTimeout: b.cfg.HandoffTimeout, WorkerIdle: b.cfg.WorkerIdle, Logger: b.log, Metrics: b.m}
}

var _ workers.Edge = (*Balancer)(nil)
