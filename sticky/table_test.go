package sticky

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// check verifies every internal invariant of t: both lists are consistent
// with the index, the LRU list is sorted by expiry, and the per-slot counters
// match the entries.
func check(tb testing.TB, t *Table) {
	tb.Helper()
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	prev := int32(nilIdx)
	var lastExp int64
	perSlot := map[int]int{}
	for i := t.head; i != nilIdx; i = t.ents[i].next {
		e := &t.ents[i]
		if e.prev != prev {
			tb.Fatalf("entry %d: prev %d, want %d", i, e.prev, prev)
		}
		if n > 0 && e.exp < lastExp {
			tb.Fatalf("LRU list not sorted by expiry at %d", i)
		}
		if j, ok := t.index[e.key]; !ok || j != i {
			tb.Fatalf("index[%q] = %d,%v; want %d", e.key, j, ok, i)
		}
		lastExp = e.exp
		perSlot[e.slot]++
		prev = i
		n++
		if n > len(t.ents) {
			tb.Fatal("LRU list has a cycle")
		}
	}
	if prev != t.tail {
		tb.Fatalf("tail %d, want %d", t.tail, prev)
	}
	if n != len(t.index) {
		tb.Fatalf("list has %d entries, index %d", n, len(t.index))
	}
	if len(perSlot) != len(t.slots) {
		tb.Fatalf("%d slots in entries, %d in counters", len(perSlot), len(t.slots))
	}
	for s, sl := range t.slots {
		if sl.count != perSlot[s] {
			tb.Fatalf("slot %d: counter %d, entries %d", s, sl.count, perSlot[s])
		}
		m := 0
		for i := sl.head; i != nilIdx; i = t.ents[i].snext {
			if t.ents[i].slot != s {
				tb.Fatalf("slot list %d holds entry of slot %d", s, t.ents[i].slot)
			}
			m++
			if m > sl.count {
				break
			}
		}
		if m != sl.count {
			tb.Fatalf("slot %d: list length %d, counter %d", s, m, sl.count)
		}
	}
}

var t0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// Every method must work on a fresh zero Table.
func TestTableZeroValue(t *testing.T) {
	calls := map[string]func(*Table){
		"Get":        func(tb *Table) { tb.Get("a", t0) },
		"Delete":     func(tb *Table) { tb.Delete("a") },
		"ForgetSlot": func(tb *Table) { tb.ForgetSlot(1) },
		"Count":      func(tb *Table) { tb.Count(1) },
		"Len":        func(tb *Table) { tb.Len() },
		"Sweep":      func(tb *Table) { tb.Sweep(t0) },
		"Snapshot":   func(tb *Table) { tb.Snapshot() },
		"Restore":    func(tb *Table) { tb.Restore(nil, t0) },
		"Put":        func(tb *Table) { tb.Put("a", 1, t0) },
	}
	for name, call := range calls {
		var tb Table
		call(&tb)
		if name != "Put" && tb.Len() != 0 {
			t.Errorf("%s on zero Table: Len %d", name, tb.Len())
		}
		tb.Put("b", 2, t0)
		if s, ok := tb.Get("b", t0); !ok || s != 2 || len(tb.Snapshot()) != tb.Len() {
			t.Errorf("%s on zero Table broke it", name)
		}
		check(t, &tb)
	}
}

func TestTableTTL(t *testing.T) {
	var tb Table // zero value: 45s
	tb.Put("a", 1, t0)
	if s, ok := tb.Get("a", t0.Add(44*time.Second)); !ok || s != 1 {
		t.Fatalf("Get before TTL = %d,%v", s, ok)
	}
	// The hit refreshed the idle timer: 44s + 44s is past the original expiry.
	if _, ok := tb.Get("a", t0.Add(88*time.Second)); !ok {
		t.Fatal("hit did not refresh the idle timer")
	}
	if _, ok := tb.Get("a", t0.Add(88*time.Second+DefaultTTL)); ok {
		t.Fatal("entry idle for TTL still served")
	}
	if tb.Len() != 0 || tb.Count(1) != 0 {
		t.Fatalf("expired entry not removed: Len %d Count %d", tb.Len(), tb.Count(1))
	}
	check(t, &tb)

	short := Table{TTL: time.Second}
	short.Put("k", 2, t0)
	if _, ok := short.Get("k", t0.Add(999*time.Millisecond)); !ok {
		t.Fatal("custom TTL: early miss")
	}
	if _, ok := short.Get("k", t0.Add(2*time.Second)); ok {
		t.Fatal("custom TTL ignored")
	}
}

func TestTableLRU(t *testing.T) {
	tb := Table{MaxEntries: 3}
	for i, k := range []string{"a", "b", "c"} {
		if ev := tb.Put(k, i, t0.Add(time.Duration(i)*time.Millisecond)); ev != 0 {
			t.Fatalf("Put %s evicted %d", k, ev)
		}
	}
	tb.Get("a", t0.Add(10*time.Millisecond)) // a is now most recent; b is LRU
	if ev := tb.Put("d", 3, t0.Add(11*time.Millisecond)); ev != 1 {
		t.Fatalf("Put into full table evicted %d, want 1", ev)
	}
	if _, ok := tb.Get("b", t0.Add(12*time.Millisecond)); ok {
		t.Error("LRU entry b survived")
	}
	for _, k := range []string{"a", "c", "d"} {
		if _, ok := tb.Get(k, t0.Add(12*time.Millisecond)); !ok {
			t.Errorf("%s evicted", k)
		}
	}
	// Updating an existing key never evicts.
	if ev := tb.Put("a", 9, t0.Add(13*time.Millisecond)); ev != 0 || tb.Len() != 3 {
		t.Errorf("update evicted %d, Len %d", ev, tb.Len())
	}
	// Shrinking MaxEntries evicts down to it on the next insert.
	tb.MaxEntries = 1
	if ev := tb.Put("e", 0, t0.Add(14*time.Millisecond)); ev != 3 || tb.Len() != 1 {
		t.Errorf("shrink: evicted %d, Len %d", ev, tb.Len())
	}
	check(t, &tb)
}

func TestTableSlots(t *testing.T) {
	var tb Table
	for i := range 30 {
		tb.Put(fmt.Sprint("k", i), i%3, t0)
	}
	if tb.Count(0) != 10 || tb.Count(1) != 10 || tb.Count(2) != 10 || tb.Count(7) != 0 {
		t.Fatalf("counts %d %d %d", tb.Count(0), tb.Count(1), tb.Count(2))
	}
	// Moving a key changes both counters.
	tb.Put("k0", 2, t0)
	if tb.Count(0) != 9 || tb.Count(2) != 11 {
		t.Fatalf("after move: %d %d", tb.Count(0), tb.Count(2))
	}
	if s, _ := tb.Get("k0", t0); s != 2 {
		t.Fatalf("moved key maps to %d", s)
	}
	if !tb.Delete("k3") || tb.Delete("k3") || tb.Count(0) != 8 {
		t.Fatalf("Delete: count %d", tb.Count(0))
	}
	check(t, &tb)
	if n := tb.ForgetSlot(2); n != 11 {
		t.Fatalf("ForgetSlot(2) = %d, want 11", n)
	}
	if tb.Count(2) != 0 || tb.Len() != 18 || tb.ForgetSlot(2) != 0 {
		t.Fatalf("after ForgetSlot: Count %d Len %d", tb.Count(2), tb.Len())
	}
	if _, ok := tb.Get("k2", t0); ok {
		t.Fatal("forgotten entry still served")
	}
	if s, ok := tb.Get("k1", t0); !ok || s != 1 {
		t.Fatal("other slot lost entries")
	}
	check(t, &tb)
	// Freed entries are reused, not leaked.
	cap0 := len(tb.ents)
	for i := range 11 {
		tb.Put(fmt.Sprint("n", i), 5, t0)
	}
	if len(tb.ents) != cap0 {
		t.Errorf("entry slice grew from %d to %d despite free entries", cap0, len(tb.ents))
	}
	check(t, &tb)
}

func TestTableSweep(t *testing.T) {
	tb := Table{TTL: 10 * time.Second}
	if tb.Sweep(t0) != 0 {
		t.Fatal("zero table swept something")
	}
	for i := range 10 {
		tb.Put(fmt.Sprint(i), i%2, t0.Add(time.Duration(i)*time.Second))
	}
	tb.Get("0", t0.Add(9*time.Second)) // refreshed: expires at 19s
	// At 13s entries put at 1,2,3 s have expired (expiry == now counts).
	if n := tb.Sweep(t0.Add(13 * time.Second)); n != 3 {
		t.Fatalf("Sweep = %d, want 3", n)
	}
	if tb.Len() != 7 || tb.Count(0)+tb.Count(1) != 7 {
		t.Fatalf("Len %d counts %d+%d", tb.Len(), tb.Count(0), tb.Count(1))
	}
	if _, ok := tb.Get("0", t0.Add(13*time.Second)); !ok {
		t.Fatal("refreshed entry swept")
	}
	if n := tb.Sweep(t0.Add(time.Hour)); n != 7 || tb.Len() != 0 {
		t.Fatalf("final Sweep = %d, Len %d", n, tb.Len())
	}
	check(t, &tb)
}

// Out-of-order times (callers racing on time.Now) must not unsort the list,
// or Sweep would stop early and leave expired entries behind.
func TestTableTimeSkew(t *testing.T) {
	tb := Table{TTL: 10 * time.Second}
	tb.Put("late", 1, t0.Add(5*time.Second))
	tb.Put("early", 1, t0) // older time, but most recently used
	check(t, &tb)
	if n := tb.Sweep(t0.Add(15 * time.Second)); n != 2 {
		t.Fatalf("Sweep = %d, want 2", n)
	}
}

func TestTableSnapshotRestore(t *testing.T) {
	src := Table{TTL: 10 * time.Second}
	for i := range 5 {
		src.Put(fmt.Sprint("s", i), i, t0.Add(time.Duration(i)*time.Second))
	}
	snap := src.Snapshot()
	if len(snap) != 5 || snap[0].Key != "s0" || snap[4].Key != "s4" {
		t.Fatalf("snapshot order: %v", snap)
	}
	if want := t0.Add(14 * time.Second); !snap[4].Expires.Equal(want) {
		t.Fatalf("Expires %v, want %v", snap[4].Expires, want)
	}

	// A new process at 11.5s: s0 and s1 (expiring at 10s, 11s) are gone.
	now := t0.Add(11500 * time.Millisecond)
	dst := Table{TTL: 10 * time.Second}
	dst.Put("s4", 99, now.Add(-8*time.Second)) // expires 13.5s, snapshot 14s: snapshot wins
	dst.Put("local", 7, now)                   // newer local entry: kept
	dst.Restore(snap, now)
	check(t, &dst)
	if dst.Len() != 4 {
		t.Fatalf("Len %d, want 4", dst.Len())
	}
	for i := 2; i < 5; i++ {
		if s, ok := dst.Get(fmt.Sprint("s", i), now); !ok || s != i {
			t.Errorf("s%d: %d,%v", i, s, ok)
		}
	}
	if s, ok := dst.Get("local", now); !ok || s != 7 {
		t.Error("local entry lost")
	}
	if dst.Count(99) != 0 || dst.Count(4) != 1 {
		t.Error("merge kept the stale local mapping")
	}

	// Remaining lifetimes are kept, not reset to a full TTL.
	d2 := Table{TTL: 10 * time.Second}
	d2.Restore(snap, now)
	if n := d2.Sweep(t0.Add(13 * time.Second)); n != 2 { // s2 (12s) and s3 (13s)
		t.Errorf("Sweep after restore = %d, want 2", n)
	}
	// Expiries beyond now+TTL are clamped; MaxEntries keeps the freshest.
	far := []Entry{{"x", 1, now.Add(time.Hour)}, {"y", 2, now.Add(time.Second)}, {"z", 3, now.Add(2 * time.Second)}}
	d3 := Table{TTL: 10 * time.Second, MaxEntries: 2}
	d3.Restore(far, now)
	check(t, &d3)
	if _, ok := d3.Get("y", now); ok || d3.Len() != 2 {
		t.Error("MaxEntries not applied on Restore")
	}
	if n := d3.Sweep(now.Add(10 * time.Second)); n != 2 {
		t.Errorf("clamped entry outlived TTL: swept %d", n)
	}
	// The restored table keeps working.
	d3.Put("w", 4, now.Add(11*time.Second))
	check(t, &d3)
}

func TestTableConcurrent(t *testing.T) {
	tb := Table{TTL: 50 * time.Millisecond, MaxEntries: 500}
	var wg sync.WaitGroup
	start := time.Now()
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 0))
			for range 5000 {
				k := fmt.Sprint(rng.IntN(800))
				now := start.Add(time.Duration(rng.IntN(int(time.Second))))
				switch rng.IntN(10) {
				case 0:
					tb.Delete(k)
				case 1:
					tb.Sweep(now)
				case 2:
					tb.ForgetSlot(rng.IntN(4))
				case 3:
					tb.Count(rng.IntN(4))
					tb.Len()
				case 4:
					if rng.IntN(50) == 0 {
						tb.Restore(tb.Snapshot(), now)
					}
				case 5, 6:
					tb.Get(k, now)
				default:
					tb.Put(k, rng.IntN(4), now)
				}
			}
		})
	}
	wg.Wait()
	check(t, &tb)
	if tb.Len() > 500 {
		t.Fatalf("Len %d above MaxEntries", tb.Len())
	}
	sum := 0
	for s := range 4 {
		sum += tb.Count(s)
	}
	if sum != tb.Len() {
		t.Fatalf("counts sum %d, Len %d", sum, tb.Len())
	}
}

func TestRaiseTTLOnlyLengthens(t *testing.T) {
	tb := &Table{TTL: 45 * time.Second}
	now := time.Now()
	tb.Put("a", 1, now)
	if tb.RaiseTTL(30 * time.Second) {
		t.Fatal("a shorter TTL was applied")
	}
	if !tb.RaiseTTL(80 * time.Second) {
		t.Fatal("a longer TTL was refused")
	}
	tb.Put("b", 2, now)
	if _, ok := tb.Get("b", now.Add(70*time.Second)); !ok {
		t.Fatal("an entry put after the raise expired at the old TTL")
	}
}
