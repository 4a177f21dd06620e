package sticky

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// checkSameKey: a key from IdentifyNoAlloc says what Identify's says — the same text,
// table key bytes and hash — and differs only in not holding an address as text.
func checkSameKey(t *testing.T, want, got Key) {
	t.Helper()
	if got.Kind != want.Kind || got.String() != want.String() || string(got.AppendTo([]byte("x"))) != "x"+want.String() ||
		got.Hash() != want.Hash() || got.Name() != want.Name() || got.Addr() != want.Addr() {
		t.Fatalf("IdentifyNoAlloc = %q (hash %x, addr %v), Identify = %q (hash %x, addr %v)",
			got, got.Hash(), got.Addr(), want, want.Hash(), want.Addr())
	}
	switch got.Kind {
	case KindIP, KindXFF:
		if got.Value != "" || !got.Addr().IsValid() || want.Value != want.Addr().String() {
			t.Fatalf("address key: NoAlloc value %q addr %v, Identify value %q addr %v", got.Value, got.Addr(), want.Value, want.Addr())
		}
	default:
		if got.Value != want.Value || got.Addr().IsValid() {
			t.Fatalf("value %q, want %q (addr %v)", got.Value, want.Value, got.Addr())
		}
	}
}

// fields is a parsed head in miniature: a pointer type, as *upgrade.Head is.
type fields struct{ kv []string }

func (f *fields) Header(name string) string {
	for i := 0; i+1 < len(f.kv); i += 2 {
		if strings.EqualFold(f.kv[i], name) {
			return f.kv[i+1]
		}
	}
	return ""
}

func noAllocCases(t testing.TB) (Rules, []Request) {
	r := Rules{
		Sources:        []Source{{Kind: KindSID}, {Kind: KindCookie, Name: "io"}, {Kind: KindHeader, Name: "X-User"}, {Kind: KindXFF}, {Kind: KindIP}},
		TrustedProxies: mustPrefixes(t, "10.0.0.0/8"),
	}
	client := netip.MustParseAddr("::ffff:203.0.113.9")
	proxy := netip.MustParseAddr("10.0.0.1")
	return r, []Request{
		{Peer: client, Query: "EIO=4&transport=polling&sid=Yb2E_pQk3lJ-AAAB"},
		{Peer: client, Fields: &fields{[]string{"Cookie", "a=1; io=ck1"}}},
		{Peer: client, Fields: &fields{[]string{"X-User", " alice "}}},
		{Peer: proxy, Fields: &fields{[]string{"X-Forwarded-For", "198.51.100.7, 10.3.3.3"}}},
		{Peer: proxy, Fields: &fields{[]string{"Forwarded", `for="[2001:db8::7]:4711", for=10.2.2.2`}}},
		{Peer: client},
		{Peer: netip.MustParseAddr("fe80::1%eth0")},
		{},
	}
}

// TestIdentifyNoAlloc: the same identities as Identify, and no allocation for any of
// them when the headers come as a pointer in the Headers interface.
func TestIdentifyNoAlloc(t *testing.T) {
	r, reqs := noAllocCases(t)
	wantKinds := []Kind{KindSID, KindCookie, KindHeader, KindXFF, KindXFF, KindIP, KindIP, KindNone}
	for i, req := range reqs {
		want := r.Identify(req)
		got := r.IdentifyNoAlloc(req)
		if got.Kind != wantKinds[i] {
			t.Fatalf("request %d: kind %v, want %v", i, got.Kind, wantKinds[i])
		}
		checkSameKey(t, want, got)
		var buf [128]byte
		if n := testing.AllocsPerRun(100, func() {
			k := r.IdentifyNoAlloc(req)
			sinkInt += int(k.Hash()) + len(k.AppendTo(buf[:0]))
		}); n != 0 {
			t.Errorf("request %d (%v): %.1f allocations, want 0", i, want, n)
		}
	}
	// Identify keeps filling Value for address keys (callers print and store it).
	if k := r.Identify(reqs[5]); k.Value != "203.0.113.9" || k.Addr() != netip.MustParseAddr("203.0.113.9") {
		t.Fatalf("Identify ip key = %+v", k)
	}
}

// TestTableGetBytes: a lookup from a caller's buffer finds what Put stored, refreshes it
// like Get, returns the table's own key, expires like Get, and allocates nothing.
func TestTableGetBytes(t *testing.T) {
	tb := Table{TTL: time.Minute}
	now := time.Now()
	tb.Put("ip:203.0.113.9", 3, now)
	buf := []byte("ip:203.0.113.9")
	slot, stored, ok := tb.GetBytes(buf, now.Add(50*time.Second))
	if !ok || slot != 3 || stored != "ip:203.0.113.9" {
		t.Fatalf("GetBytes = %d %q %v", slot, stored, ok)
	}
	buf[0] = 'x' // the returned key is the table's, not the caller's buffer
	if stored != "ip:203.0.113.9" {
		t.Fatalf("stored key aliases the caller's buffer: %q", stored)
	}
	buf[0] = 'i'
	// Refreshed at +50s, so still there at +100s; gone at +161s.
	if _, _, ok := tb.GetBytes(buf, now.Add(100*time.Second)); !ok {
		t.Fatal("GetBytes did not refresh the entry")
	}
	if _, _, ok := tb.GetBytes(buf, now.Add(161*time.Second)); ok || tb.Len() != 0 {
		t.Fatalf("expired entry found (ok %v, len %d)", ok, tb.Len())
	}
	if _, _, ok := tb.GetBytes([]byte("nope"), now); ok {
		t.Fatal("miss found")
	}
	tb.Put("ip:203.0.113.9", 1, now)
	if n := testing.AllocsPerRun(100, func() { tb.GetBytes(buf, now) }); n != 0 {
		t.Errorf("GetBytes allocates %.1f times", n)
	}
	var zero Table
	if _, _, ok := zero.GetBytes(buf, now); ok {
		t.Fatal("zero table found a key")
	}
}

func BenchmarkIdentifyNoAlloc(b *testing.B) {
	r, reqs := noAllocCases(b)
	names := []string{"sid", "cookie", "header", "xff", "forwarded", "ip", "ip6-zone", "none"}
	for i, req := range reqs {
		b.Run(names[i], func(b *testing.B) {
			b.ReportAllocs()
			var buf [128]byte
			for b.Loop() {
				sinkInt += len(r.IdentifyNoAlloc(req).AppendTo(buf[:0]))
			}
		})
	}
}
