package sticky

import (
	"cmp"
	"math"
	"slices"
	"sync"
	"time"
)

// Defaults for the zero Table.
const (
	// DefaultTTL is engine.io's pingInterval (25s) plus pingTimeout (20s):
	// a session idle for longer is dead at the server too.
	DefaultTTL        = 45 * time.Second
	DefaultMaxEntries = 1_000_000
)

// Entry is one table entry as Snapshot hands it over to a new edge process.
type Entry struct {
	Key     string
	Slot    int
	Expires time.Time
}

// Table is the learned session table: key (usually Key.String() of a sid) ->
// worker slot, with idle expiry and an LRU cap. It is safe for concurrent
// use; the zero value is ready to use. TTL and MaxEntries are read on every
// call and may be set before first use.
//
// Because the TTL is the same for every entry, least recently used order is
// also expiry order, so one intrusive list serves both LRU eviction and an
// O(expired) Sweep. Entries live in a slice and link by int32 index instead
// of pointers: one allocation for all of them, half-size links, and almost
// nothing for the garbage collector to chase. A second intrusive list per
// slot makes ForgetSlot O(entries of that slot) and Count O(1).
//
// Callers should pass non-decreasing times; a touch with an earlier time is
// treated as happening at the latest time seen, which keeps the list sorted.
type Table struct {
	TTL        time.Duration // idle expiry; 0: DefaultTTL
	MaxEntries int           // 0: DefaultMaxEntries; when full, Put evicts the least recently used entry

	mu         sync.Mutex
	index      map[string]int32
	ents       []tentry
	free       int32 // head of the free list (linked by next), nilIdx if none
	head, tail int32 // LRU order: head is the least recently used (first to expire)
	slots      map[int]slotList
	base       time.Time // times are stored as offsets from the first time seen
	started    bool
}

const nilIdx = -1

type tentry struct {
	key          string
	exp          int64 // expiry, nanoseconds after Table.base
	slot         int
	prev, next   int32 // LRU list, or free list (next)
	sprev, snext int32 // list of the entries of the same slot
}

type slotList struct {
	head  int32
	count int
}

func (t *Table) init(now time.Time) {
	if t.index == nil {
		t.index = make(map[string]int32)
		t.slots = make(map[int]slotList)
		t.free, t.head, t.tail = nilIdx, nilIdx, nilIdx
	}
	if !t.started {
		t.base, t.started = now, true
	}
}

// RaiseTTL makes entries live at least d from their last use from now on (the
// engine.io app's own pingInterval + pingTimeout, learned from its handshake). It
// never shortens the TTL, so concurrent apps or workers cannot make sessions expire
// early; it reports whether the TTL changed.
func (t *Table) RaiseTTL(d time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d <= time.Duration(t.ttl()) {
		return false
	}
	t.TTL = d
	return true
}

func (t *Table) ttl() int64 {
	if t.TTL > 0 {
		return int64(t.TTL)
	}
	return int64(DefaultTTL)
}

func (t *Table) maxEntries() int {
	if t.MaxEntries > 0 {
		return min(t.MaxEntries, math.MaxInt32-1)
	}
	return DefaultMaxEntries
}

// off converts now to the table's internal clock. time.Time.Sub uses the
// monotonic reading when both times carry one, so wall clock steps do not
// expire the whole table at once.
func (t *Table) off(now time.Time) int64 { return int64(now.Sub(t.base)) }

// expiry for an entry touched at offset n: never before the newest entry's,
// so the LRU list stays sorted by expiry even if callers race on time.Now.
func (t *Table) expiry(n int64) int64 {
	e := n + t.ttl()
	if t.tail != nilIdx && t.ents[t.tail].exp > e {
		e = t.ents[t.tail].exp
	}
	return e
}

// Get returns the slot stored for key. A hit refreshes the entry's idle timer;
// an expired entry is a miss and is removed.
func (t *Table) Get(key string, now time.Time) (slot int, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.index == nil {
		return 0, false
	}
	i, ok := t.index[key]
	if !ok {
		return 0, false
	}
	return t.hit(i, now)
}

// GetBytes is Get for a key the caller wrote into a buffer of its own (Key.AppendTo),
// so that a lookup allocates nothing. On a hit it also returns the table's own copy of
// the key, to hand to Put or Delete later without making another.
func (t *Table) GetBytes(key []byte, now time.Time) (slot int, stored string, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.index == nil {
		return 0, "", false
	}
	i, ok := t.index[string(key)] // the compiler does not copy key for a map index
	if !ok {
		return 0, "", false
	}
	stored = t.ents[i].key
	if slot, ok = t.hit(i, now); !ok {
		return 0, "", false
	}
	return slot, stored, true
}

// hit refreshes entry i looked up at now, or removes it when it has expired.
func (t *Table) hit(i int32, now time.Time) (slot int, ok bool) {
	n := t.off(now)
	if t.ents[i].exp <= n {
		t.remove(i)
		return 0, false
	}
	t.ents[i].exp = t.expiry(n)
	t.moveToTail(i)
	return t.ents[i].slot, true
}

// Put maps key to slot, inserting it or moving it to another slot, and marks
// it most recently used. It returns how many least recently used entries were
// evicted to make room.
func (t *Table) Put(key string, slot int, now time.Time) (evicted int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init(now)
	exp := t.expiry(t.off(now))
	if i, ok := t.index[key]; ok {
		e := &t.ents[i]
		if e.slot != slot {
			t.slotUnlink(i)
			e.slot = slot
			t.slotLink(i)
		}
		e.exp = exp
		t.moveToTail(i)
		return 0
	}
	for len(t.index) >= t.maxEntries() {
		t.remove(t.head)
		evicted++
	}
	t.insert(key, slot, exp)
	return evicted
}

// Delete removes key and reports whether it was there.
func (t *Table) Delete(key string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.index[key]
	if ok {
		t.remove(i)
	}
	return ok
}

// ForgetSlot removes every entry of slot (its worker died, so its sessions
// are gone) and returns how many there were.
func (t *Table) ForgetSlot(slot int) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	sl, ok := t.slots[slot]
	if !ok {
		return 0
	}
	n := 0
	for i := sl.head; i != nilIdx; {
		next := t.ents[i].snext
		t.remove(i)
		n++
		i = next
	}
	return n
}

// Count returns the number of entries held for slot, expired ones included
// until Sweep or Get removes them.
func (t *Table) Count(slot int) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.slots[slot].count
}

// Len returns the number of entries held, expired ones included until Sweep
// or Get removes them.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.index)
}

// Sweep removes the entries expired at now and returns how many. It only
// looks at the expired ones: they are all at the head of the LRU list.
// The balancer calls it periodically; nothing expires in the background.
func (t *Table) Sweep(now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.index == nil {
		return 0
	}
	n := t.off(now)
	c := 0
	for t.head != nilIdx && t.ents[t.head].exp <= n {
		t.remove(t.head)
		c++
	}
	return c
}

// Snapshot returns all entries, least recently used first, for handing the
// table to a new edge process. Expired entries not yet swept are included;
// Restore drops them.
func (t *Table) Snapshot() []Entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Entry, 0, len(t.index))
	if t.index == nil {
		return out // never used: head is not yet nilIdx
	}
	for i := t.head; i != nilIdx; i = t.ents[i].next {
		e := &t.ents[i]
		out = append(out, Entry{Key: e.key, Slot: e.slot, Expires: t.base.Add(time.Duration(e.exp))})
	}
	return out
}

// Restore merges entries from Snapshot (typically of another process) into
// t. Entries already expired at now are dropped, and expiries further out
// than now+TTL are clamped to it. A key present in both keeps whichever entry
// expires later (was used more recently). If the result exceeds MaxEntries the
// entries closest to expiry are dropped.
func (t *Table) Restore(es []Entry, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init(now)
	n := t.off(now)
	ttl := t.ttl()

	type rec struct {
		key  string
		slot int
		exp  int64
	}
	all := make([]rec, 0, len(t.index)+len(es))
	for i := t.head; i != nilIdx; i = t.ents[i].next {
		e := &t.ents[i]
		if e.exp > n {
			all = append(all, rec{e.key, e.slot, e.exp})
		}
	}
	pos := make(map[string]int, len(all)+len(es))
	for j, r := range all {
		pos[r.key] = j
	}
	for _, e := range es {
		left := int64(e.Expires.Sub(now))
		if left <= 0 {
			continue
		}
		r := rec{e.Key, e.Slot, n + min(left, ttl)}
		if j, dup := pos[e.Key]; dup {
			if r.exp > all[j].exp {
				all[j] = r
			}
			continue
		}
		pos[e.Key] = len(all)
		all = append(all, r)
	}
	// Stable, so equal expiries keep snapshot (LRU) order.
	slices.SortStableFunc(all, func(a, b rec) int { return cmp.Compare(a.exp, b.exp) })
	if m := t.maxEntries(); len(all) > m {
		all = all[len(all)-m:]
	}

	t.index = make(map[string]int32, len(all))
	t.slots = make(map[int]slotList)
	t.ents = make([]tentry, 0, len(all))
	t.free, t.head, t.tail = nilIdx, nilIdx, nilIdx
	for _, r := range all {
		t.insert(r.key, r.slot, r.exp)
	}
}

// insert appends a new entry at the most recently used end.
func (t *Table) insert(key string, slot int, exp int64) {
	var i int32
	if t.free != nilIdx {
		i = t.free
		t.free = t.ents[i].next
	} else {
		i = int32(len(t.ents))
		t.ents = append(t.ents, tentry{})
	}
	t.ents[i] = tentry{key: key, exp: exp, slot: slot, prev: t.tail, next: nilIdx}
	if t.tail != nilIdx {
		t.ents[t.tail].next = i
	} else {
		t.head = i
	}
	t.tail = i
	t.slotLink(i)
	t.index[key] = i
}

// remove unlinks entry i from every structure and puts it on the free list.
func (t *Table) remove(i int32) {
	e := &t.ents[i]
	delete(t.index, e.key)
	t.unlink(i)
	t.slotUnlink(i)
	// Drop the key so the free slot does not keep its bytes alive.
	*e = tentry{next: t.free, prev: nilIdx, sprev: nilIdx, snext: nilIdx}
	t.free = i
}

func (t *Table) unlink(i int32) {
	e := &t.ents[i]
	if e.prev != nilIdx {
		t.ents[e.prev].next = e.next
	} else {
		t.head = e.next
	}
	if e.next != nilIdx {
		t.ents[e.next].prev = e.prev
	} else {
		t.tail = e.prev
	}
	e.prev, e.next = nilIdx, nilIdx
}

func (t *Table) moveToTail(i int32) {
	if t.tail == i {
		return
	}
	t.unlink(i)
	e := &t.ents[i]
	e.prev = t.tail
	t.ents[t.tail].next = i
	t.tail = i
}

func (t *Table) slotLink(i int32) {
	e := &t.ents[i]
	sl, ok := t.slots[e.slot]
	if !ok {
		sl.head = nilIdx
	}
	e.sprev, e.snext = nilIdx, sl.head
	if sl.head != nilIdx {
		t.ents[sl.head].sprev = i
	}
	sl.head = i
	sl.count++
	t.slots[e.slot] = sl
}

func (t *Table) slotUnlink(i int32) {
	e := &t.ents[i]
	sl := t.slots[e.slot]
	if e.sprev != nilIdx {
		t.ents[e.sprev].snext = e.snext
	} else {
		sl.head = e.snext
	}
	if e.snext != nilIdx {
		t.ents[e.snext].sprev = e.sprev
	}
	e.sprev, e.snext = nilIdx, nilIdx
	sl.count--
	if sl.count == 0 {
		// Slot ids of dead workers must not accumulate in the map.
		delete(t.slots, e.slot)
		return
	}
	t.slots[e.slot] = sl
}
