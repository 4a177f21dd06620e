//go:build unix

package balancer

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// routeCase is one identity the routing decision can find in a request.
type routeCase struct {
	name string
	key  string // -key flag
	head string
}

var routeCases = []routeCase{
	{"sid", "sid,ip", "GET /socket.io/?EIO=4&transport=polling&t=OxZ3k1a&sid=Yb2E_pQk3lJ-AAABxyzw HTTP/1.1\r\nHost: a\r\nCookie: io=x\r\n\r\n"},
	{"cookie", "sid,cookie:io,ip", "GET /app HTTP/1.1\r\nHost: a\r\nCookie: _ga=GA1.2.3; theme=dark; io=Yb2E_pQk3lJ-AAAB\r\n\r\n"},
	{"header", "sid,header:X-User,ip", "GET /app HTTP/1.1\r\nHost: a\r\nX-User: alice@example.com\r\n\r\n"},
	{"ip", "sid,ip", "GET /app HTTP/1.1\r\nHost: a\r\n\r\n"},
	{"ip6", "sid,ip", "GET /app HTTP/1.1\r\nHost: a\r\n\r\n"},
}

// routeBench builds an edge with 4 workers (no processes: routing never uses their
// channels) and a head whose identity is already pinned or learned, as it is for every
// request of a session after its first.
func routeBench(tb testing.TB, c routeCase) (*Balancer, *upgrade.Head, netip.Addr) {
	tb.Helper()
	srcs, err := sticky.ParseSources(c.key)
	if err != nil {
		tb.Fatal(err)
	}
	b := New(Config{Rules: sticky.Rules{Sources: srcs}})
	tb.Cleanup(func() { b.Shutdown(context.Background()) })
	for slot := range 4 {
		b.AddWorker(workers.NewWorker(slot, 0, nil, time.Minute))
	}
	h, err := upgrade.Parse([]byte(c.head), 0)
	if err != nil {
		tb.Fatal(err)
	}
	peer := netip.MustParseAddr("203.0.113.9")
	if c.name == "ip6" {
		peer = netip.MustParseAddr("2001:db8:1234::77")
	}
	if c.name == "sid" {
		// The edge learns a sid from the worker's handshake answer.
		b.sessions.Put(sticky.Key{Kind: sticky.KindSID, Value: "Yb2E_pQk3lJ-AAABxyzw"}.String(), 2, time.Now())
	}
	first := b.route(&h, peer, 0) // pins the key (the one allocation a new key may cost)
	if first.w == nil {
		tb.Fatalf("%s: no worker routed", c.name)
	}
	return b, &h, peer
}

// TestRouteAllocatesNothing: the routing decision for a request whose session or pin
// exists allocates nothing, for every kind of identity (issue 17, target 5). Before:
// 2–3 allocations (the header closure, the table key, the address text).
func TestRouteAllocatesNothing(t *testing.T) {
	for _, c := range routeCases {
		b, h, peer := routeBench(t, c)
		want := b.route(h, peer, 0)
		var got route
		allocs := testing.AllocsPerRun(200, func() { got = b.route(h, peer, 0) })
		if got.w != want.w || got.tableKey != want.tableKey || got.key.Kind != want.key.Kind || got.unknownSID {
			t.Fatalf("%s: routes change between requests: %+v then %+v", c.name, want, got)
		}
		if want.tableKey == "" {
			t.Fatalf("%s: no table key: the request was not pinned", c.name)
		}
		if allocs != 0 {
			t.Errorf("%s: route allocates %.1f times per request, want 0", c.name, allocs)
		}
	}
}

// TestRouteKeysUnchanged: the table keys the allocation-free path writes are the ones
// Key.String gave before (a handover from an older edge image carries them over).
func TestRouteKeysUnchanged(t *testing.T) {
	want := map[string]string{
		"sid":    "sid:Yb2E_pQk3lJ-AAABxyzw",
		"cookie": "cookie:io=Yb2E_pQk3lJ-AAAB",
		"header": "header:X-User=alice@example.com",
		"ip":     "ip:203.0.113.9",
		"ip6":    "ip:2001:db8:1234::77",
	}
	for _, c := range routeCases {
		b, h, peer := routeBench(t, c)
		if got := b.route(h, peer, 0).tableKey; got != want[c.name] {
			t.Errorf("%s: table key %q, want %q", c.name, got, want[c.name])
		}
	}
}

// BenchmarkRoute: go test -run '^$' -bench Route -benchmem ./balancer
func BenchmarkRoute(b *testing.B) {
	for _, c := range routeCases {
		b.Run(c.name, func(b *testing.B) {
			bal, h, peer := routeBench(b, c)
			b.ReportAllocs()
			for b.Loop() {
				if bal.route(h, peer, 0).w == nil {
					b.Fatal("no worker")
				}
			}
		})
	}
}

// A worker past slot 63 (the pools of `stickyd proxy` start at 64) that just failed is
// not tried again for the same request: before, slots ≥ 64 had no bit in the tried set.
func TestRouteSkipsTriedWorkerPastSlot63(t *testing.T) {
	srcs, err := sticky.ParseSources("sid,ip")
	if err != nil {
		t.Fatal(err)
	}
	b := New(Config{Rules: sticky.Rules{Sources: srcs}})
	t.Cleanup(func() { b.Shutdown(context.Background()) })
	for _, slot := range []int{64, 65} {
		b.AddWorker(workers.NewWorker(slot, 0, nil, time.Minute))
	}
	h, err := upgrade.Parse([]byte("GET /app HTTP/1.1\r\nHost: a\r\n\r\n"), 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, failed := range []int{64, 65} {
		for i := range 20 { // clients whose address hashes to either worker
			peer := netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
			if r := b.route(&h, peer, slotBit(failed)); r.w == nil || r.w.Slot == failed {
				t.Fatalf("after slot %d failed, routed to %v", failed, r.w)
			}
		}
	}
}
