package sticky

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

func slotsCands(slots ...int) []Candidate {
	c := make([]Candidate, len(slots))
	for i, s := range slots {
		c[i] = Candidate{Slot: s}
	}
	return c
}

// spread places nkeys random keys over nslots with Pick, incrementing the
// chosen slot's Load as a real balancer would, and returns max/mean load.
func spread(nkeys, nslots int, seed uint64) float64 {
	rng := rand.New(rand.NewPCG(seed, 1))
	cands := slotsCands(seqSlots(nslots)...)
	var b Balance
	for range nkeys {
		cands[b.Pick(rng.Uint64(), cands)].Load++
	}
	m := 0
	for _, c := range cands {
		m = max(m, c.Load)
	}
	return float64(m) / (float64(nkeys) / float64(nslots))
}

// moved assigns nkeys random keys over nslots slots (loads 0, so plain HRW),
// removes the slot at index drop and reassigns. It returns the fraction of
// keys whose slot changed and how many moved between two surviving slots.
func moved(nkeys, nslots, drop int, seed uint64) (frac float64, cross int) {
	rng := rand.New(rand.NewPCG(seed, 2))
	before := slotsCands(seqSlots(nslots)...)
	after := slices.Delete(slices.Clone(before), drop, drop+1)
	gone := before[drop].Slot
	var b Balance
	n := 0
	for range nkeys {
		k := rng.Uint64()
		s1 := before[b.Pick(k, before)].Slot
		s2 := after[b.Pick(k, after)].Slot
		if s1 != s2 {
			n++
			if s1 != gone {
				cross++
			}
		}
	}
	return float64(n) / float64(nkeys), cross
}

// seqSlots returns slot ids that are not 0..n-1, so nothing depends on dense
// numbering.
func seqSlots(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = 3*i + 7
	}
	return s
}

func TestPickSpread(t *testing.T) {
	for seed := uint64(1); seed <= 5; seed++ {
		r := spread(10_000, 8, seed)
		if r > 1.25 {
			t.Errorf("seed %d: max/mean = %.4f, want <= 1.25", seed, r)
		}
		t.Logf("seed %d: max/mean %.4f", seed, r)
	}
}

func TestPickMovedOnRemove(t *testing.T) {
	for drop := range 8 {
		frac, cross := moved(10_000, 8, drop, uint64(drop))
		if frac < 0.10 || frac > 0.15 {
			t.Errorf("drop %d: moved fraction %.4f, want in [0.10, 0.15]", drop, frac)
		}
		if cross != 0 {
			t.Errorf("drop %d: %d keys moved between surviving slots", drop, cross)
		}
	}
}

func TestPickMovedOnAdd(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	before := slotsCands(seqSlots(8)...)
	after := append(slices.Clone(before), Candidate{Slot: 1000})
	var b Balance
	n := 0
	const keys = 10_000
	for range keys {
		k := rng.Uint64()
		s1, s2 := before[b.Pick(k, before)].Slot, after[b.Pick(k, after)].Slot
		if s1 != s2 {
			n++
			if s2 != 1000 {
				t.Fatalf("key moved from %d to old slot %d", s1, s2)
			}
		}
	}
	if f := float64(n) / keys; math.Abs(f-1.0/9) > 0.02 {
		t.Errorf("moved fraction on add %.4f, want ≈ %.4f", f, 1.0/9)
	}
}

func TestPickBoundedLoad(t *testing.T) {
	cands := slotsCands(10, 20, 30, 40)
	const key = 0xfeedface
	// Rank the slots by score by hand.
	order := slices.Clone(cands)
	slices.SortFunc(order, func(a, b Candidate) int {
		sa, sb := Score(key, a.Slot), Score(key, b.Slot)
		switch {
		case sa > sb:
			return -1
		case sa < sb:
			return 1
		}
		return 0
	})
	idx := func(slot int) int { return slices.IndexFunc(cands, func(c Candidate) bool { return c.Slot == slot }) }
	var b Balance
	if got := b.Pick(key, cands); cands[got].Slot != order[0].Slot {
		t.Fatalf("unloaded: picked slot %d, want HRW winner %d", cands[got].Slot, order[0].Slot)
	}
	if got := Owner(key, cands); cands[got].Slot != order[0].Slot {
		t.Fatalf("Owner: slot %d, want %d", cands[got].Slot, order[0].Slot)
	}
	// sum 10 -> cap ceil(1.25*11/4) = 4: a winner at 4 is full, at 3 is not.
	cands[idx(order[0].Slot)].Load = 4
	cands[idx(order[3].Slot)].Load = 6
	if got := b.Pick(key, cands); cands[got].Slot != order[1].Slot {
		t.Errorf("winner full: picked slot %d, want runner-up %d", cands[got].Slot, order[1].Slot)
	}
	cands[idx(order[0].Slot)].Load = 3
	cands[idx(order[3].Slot)].Load = 7
	if got := b.Pick(key, cands); cands[got].Slot != order[0].Slot {
		t.Errorf("winner below cap: picked slot %d, want %d", cands[got].Slot, order[0].Slot)
	}
	// A larger epsilon lifts the cap (ceil(3*11/4) = 9) so the winner stays.
	cands[idx(order[0].Slot)].Load = 8
	cands[idx(order[3].Slot)].Load = 2
	if got := (Balance{Epsilon: 2}).Pick(key, cands); cands[got].Slot != order[0].Slot {
		t.Errorf("epsilon 2: picked slot %d, want %d", cands[got].Slot, order[0].Slot)
	}
	if got := b.Pick(key, cands); cands[got].Slot == order[0].Slot {
		t.Errorf("epsilon 0.25: overloaded winner %d picked", order[0].Slot)
	}
	// Negative loads (a counter bug elsewhere) must still route somewhere.
	for i := range cands {
		cands[i].Load = -5
	}
	if got := b.Pick(key, cands); got < 0 {
		t.Error("negative loads: no pick")
	}
}

func TestPickEdgeCases(t *testing.T) {
	var b Balance
	if b.Pick(1, nil) != -1 || LeastLoaded(nil, 1) != -1 || Owner(1, nil) != -1 {
		t.Error("empty candidates must give -1")
	}
	one := []Candidate{{Slot: 5, Load: 1000}}
	if b.Pick(1, one) != 0 || LeastLoaded(one, 99) != 0 {
		t.Error("single candidate must be picked")
	}
	for _, eps := range []float64{math.NaN(), -1, math.Inf(1)} {
		if got := (Balance{Epsilon: eps}).Pick(7, slotsCands(1, 2, 3)); got < 0 || got > 2 {
			t.Errorf("epsilon %v: pick %d", eps, got)
		}
	}
	// The result must not depend on the order of candidates.
	rng := rand.New(rand.NewPCG(3, 3))
	cands := slotsCands(seqSlots(16)...)
	for range 1000 {
		k := rng.Uint64()
		want := cands[b.Pick(k, cands)].Slot
		sh := slices.Clone(cands)
		rng.Shuffle(len(sh), func(i, j int) { sh[i], sh[j] = sh[j], sh[i] })
		if got := sh[b.Pick(k, sh)].Slot; got != want {
			t.Fatalf("order dependent: %d vs %d", got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { b.Pick(42, cands) }); n != 0 {
		t.Errorf("Pick allocates %v", n)
	}
}

func TestLeastLoaded(t *testing.T) {
	// Two candidates: the two choices are distinct, so the lighter one
	// always wins whatever r is.
	two := []Candidate{{Slot: 1, Load: 5}, {Slot: 2, Load: 1}}
	for r := range uint64(1000) {
		if got := LeastLoaded(two, r*0x9e3779b97f4a7c15); got != 1 {
			t.Fatalf("r=%d: picked %d (load %d), want the less loaded", r, got, two[got].Load)
		}
	}
	// Ties are broken at random: four idle workers share a burst evenly.
	idle := []Candidate{{Slot: 0}, {Slot: 1}, {Slot: 2}, {Slot: 3}}
	counts := make([]int, 4)
	trng := rand.New(rand.NewPCG(7, 7))
	for range 40_000 {
		counts[LeastLoaded(idle, trng.Uint64())]++
	}
	for slot, n := range counts {
		if n < 9_000 || n > 11_000 {
			t.Errorf("equal loads: slot %d got %d of 40000 picks, want about 10000 (%v)", slot, n, counts)
		}
	}
	// Eight candidates with loads 0..7: the heaviest can never win a pair,
	// every other one sometimes does, and the mean chosen load is well below
	// the mean of 3.5 (min of two distinct draws: sum k(7-k)/28 = 2).
	eight := make([]Candidate, 8)
	for i := range eight {
		eight[i] = Candidate{Slot: 100 - i, Load: i}
	}
	rng := rand.New(rand.NewPCG(4, 4))
	seen := make([]int, 8)
	sum := 0
	const draws = 20_000
	for range draws {
		i := LeastLoaded(eight, rng.Uint64())
		seen[i]++
		sum += eight[i].Load
	}
	if seen[7] != 0 {
		t.Errorf("heaviest candidate picked %d times", seen[7])
	}
	for i := range 7 {
		if seen[i] == 0 {
			t.Errorf("candidate %d never picked", i)
		}
	}
	if mean := float64(sum) / draws; mean < 1.9 || mean > 2.1 {
		t.Errorf("mean chosen load %.3f, want ≈ 2.0", mean)
	}
}
