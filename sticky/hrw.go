package sticky

import (
	"math"
	"math/bits"
)

// Candidate is one live worker as the balancer sees it when routing.
type Candidate struct {
	Slot int // stable worker slot id: survives restarts of the worker in it
	Load int // active sessions on it
}

// Balance is rendezvous (highest random weight) hashing with bounded loads.
// HRW is used rather than a ring, Maglev or jump hash because any slot may
// die: removing a slot moves exactly its own keys, there is no table to
// rebuild when a worker flaps, and a restarted edge derives the same mapping
// from the same slot list. At N <= 64 the O(N) scan costs well under the fd
// handoff it precedes. See reference/lb-anchors-and-hashing.md §2.
//
// The zero value uses Epsilon 0.25, the value HAProxy, brpc and liblb default
// to (factor 1.25).
type Balance struct {
	Epsilon float64 // load cap is (1+Epsilon) × average; 0 (or negative, NaN) means 0.25
}

// DefaultEpsilon is used when Balance.Epsilon is not positive.
const DefaultEpsilon = 0.25

const golden = 0x9e3779b97f4a7c15 // 2^64 / φ, the splitmix64 increment

// mix64 is the splitmix64 finaliser: a bijection whose every output bit
// depends on every input bit.
func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// Score is the HRW weight of slot for key: output number slot+1 of a
// splitmix64 generator seeded with key. Splitmix outputs for consecutive
// states pass BigCrush, so a key's scores over the slots behave as independent
// uniform draws, which is all HRW needs. Exported so a worker can mint sids
// that route to itself (draw until its slot wins) with the same function.
func Score(key uint64, slot int) uint64 {
	return mix64(key + (uint64(slot)+1)*golden)
}

// Pick returns the index in cands of the highest-scoring candidate whose Load
// is below the cap ceil((1+ε)·(sum(Load)+1)/len(cands)), the +1 counting the
// session being placed. Walking down the HRW ranking past full candidates is
// the bounded-load rule of Mirrokni et al. as HAProxy applies it on its ring.
// Some candidate is always below the cap (not all can be above average), so
// the result is -1 only for empty cands. No allocation, no sort.
func (b Balance) Pick(key uint64, cands []Candidate) int {
	if len(cands) == 0 {
		return -1
	}
	eps := b.Epsilon
	if !(eps > 0) {
		eps = DefaultEpsilon
	}
	sum := 0
	for _, c := range cands {
		sum += max(c.Load, 0)
	}
	limit := math.MaxInt // an infinite or huge epsilon: plain HRW
	if f := math.Ceil((1 + eps) * float64(sum+1) / float64(len(cands))); f < math.MaxInt32 {
		limit = int(f)
	}
	best, bestSlot := -1, 0
	var bestScore uint64
	for i := range cands {
		c := &cands[i]
		if c.Load >= limit {
			continue // full: its keys spill down their HRW ranking
		}
		// Equal 64-bit scores are practically impossible; the slot
		// tie-break only keeps the result independent of candidate order.
		if s := Score(key, c.Slot); best < 0 || s > bestScore || (s == bestScore && c.Slot < bestSlot) {
			best, bestScore, bestSlot = i, s, c.Slot
		}
	}
	// best >= 0: limit > sum/n >= the smallest non-negative load, and a
	// negative load is below any limit, so some candidate always qualifies.
	return best
}

// Owner returns the index of the plain HRW winner for key (no load bound), or
// -1 for empty cands: where a self-routing sid must hash to.
func Owner(key uint64, cands []Candidate) int {
	return Balance{Epsilon: math.Inf(1)}.Pick(key, cands)
}

// LeastLoaded picks for keyless requests by the power of two choices: two
// distinct candidates derived from the random r, the less loaded one wins
// (ties: lower Load, then lower Slot). Two random choices give an
// exponentially better maximum load than one, without the herd effect of
// always picking the global minimum (Envoy least_request, HAProxy random(2)).
// Returns -1 for empty cands.
func LeastLoaded(cands []Candidate, r uint64) int {
	n := len(cands)
	switch n {
	case 0:
		return -1
	case 1:
		return 0
	}
	// Multiply-high maps a 64-bit draw onto [0,n) without modulo bias worth
	// mentioning; the second draw is a remix of r over the n-1 other indices.
	i, _ := bits.Mul64(r, uint64(n))
	j, _ := bits.Mul64(mix64(r), uint64(n-1))
	if j >= i {
		j++
	}
	// On a tie the first draw wins: it is uniformly random, so equally loaded workers
	// share a burst of new sessions evenly (a fixed tie-break would favour low slots
	// until their loads caught up).
	if cands[j].Load < cands[i].Load {
		return int(j)
	}
	return int(i)
}
