package sticky

import (
	"errors"
	"net/netip"
	"net/textproto"
	"slices"
	"strings"
	"testing"
)

// hdr builds a Request.Header func from name/value pairs, joining repeated
// fields with ", " as the edge's head parser does.
func hdr(kv ...string) func(string) string {
	m := map[string][]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		k := textproto.CanonicalMIMEHeaderKey(kv[i])
		m[k] = append(m[k], kv[i+1])
	}
	return func(name string) string {
		return strings.Join(m[textproto.CanonicalMIMEHeaderKey(name)], ", ")
	}
}

func mustPrefixes(t testing.TB, s string) []netip.Prefix {
	t.Helper()
	p, err := ParsePrefixes(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestKindString(t *testing.T) {
	want := map[Kind]string{KindNone: "none", KindSID: "sid", KindCookie: "cookie", KindHeader: "header", KindXFF: "xff", KindIP: "ip", Kind(42): "kind(42)"}
	for k, s := range want {
		if got := k.String(); got != s {
			t.Errorf("Kind(%d).String() = %q, want %q", k, got, s)
		}
	}
}

func TestIdentify(t *testing.T) {
	// sidIP was the default before issue 14 (-key sid,ip); the cases that check the
	// address fallback name it explicitly.
	sidIP := []Source{{Kind: KindSID}, {Kind: KindIP}}
	all := []Source{{Kind: KindSID}, {Kind: KindCookie, Name: "io"}, {Kind: KindHeader, Name: "X-User"}, {Kind: KindXFF}, {Kind: KindIP}}
	peer4 := netip.MustParseAddr("192.0.2.10")
	mapped := netip.MustParseAddr("::ffff:10.0.0.1") // a trusted proxy seen through a dual-stack socket
	proxy := netip.MustParseAddr("10.0.0.1")
	trusted := "10.0.0.0/8,fd00::/8,192.168.1.7"
	long := strings.Repeat("x", 2000)

	tests := []struct {
		name    string
		srcs    []Source
		trusted string
		req     Request
		want    string // Key.String()
	}{
		// sid
		{"sid with EIO", nil, "", Request{Peer: peer4, Query: "EIO=4&transport=polling&sid=abc-_123"}, "sid:abc-_123"},
		{"sid before EIO", nil, "", Request{Peer: peer4, Query: "sid=abc&EIO=3"}, "sid:abc"},
		{"sid without EIO falls to ip", sidIP, "", Request{Peer: peer4, Query: "transport=polling&sid=abc"}, "ip:192.0.2.10"},
		{"EIO name is case sensitive", sidIP, "", Request{Peer: peer4, Query: "eio=4&sid=abc"}, "ip:192.0.2.10"},
		{"empty sid", sidIP, "", Request{Peer: peer4, Query: "EIO=4&sid="}, "ip:192.0.2.10"},
		{"first sid wins", nil, "", Request{Peer: peer4, Query: "EIO=4&sid=one&sid=two"}, "sid:one"},
		{"sid unescaped", nil, "", Request{Peer: peer4, Query: "EIO=4&sid=a%2Bb+c"}, "sid:a+b c"},
		{"escaped param name", nil, "", Request{Peer: peer4, Query: "%45IO=4&s%69d=z"}, "sid:z"},
		{"bad escape", sidIP, "", Request{Peer: peer4, Query: "EIO=4&sid=%zz"}, "ip:192.0.2.10"},
		{"sid 256 ok", nil, "", Request{Peer: peer4, Query: "EIO=4&sid=" + strings.Repeat("s", 256)}, "sid:" + strings.Repeat("s", 256)},
		{"sid 257 rejected", sidIP, "", Request{Peer: peer4, Query: "EIO=4&sid=" + strings.Repeat("s", 257)}, "ip:192.0.2.10"},
		{"escaped sid over 256 after unescape", sidIP, "", Request{Peer: peer4, Query: "EIO=4&sid=" + strings.Repeat("%41", 257)}, "ip:192.0.2.10"},
		{"escaped sid under 256 after unescape", nil, "", Request{Peer: peer4, Query: "EIO=4&sid=" + strings.Repeat("%41", 200)}, "sid:" + strings.Repeat("A", 200)},
		{"garbage query", nil, "", Request{Peer: peer4, Query: "&&==&EIO&sid==x"}, "sid:=x"},

		// cookie
		{"cookie", all, "", Request{Peer: peer4, Header: hdr("Cookie", "a=1; io=ck1; b=2")}, "cookie:io=ck1"},
		{"cookie first of two", all, "", Request{Peer: peer4, Header: hdr("Cookie", "io=first; io=second")}, "cookie:io=first"},
		{"cookie exact name", all, "", Request{Peer: peer4, Header: hdr("Cookie", "IO=x; iox=y; xio=z")}, "ip:192.0.2.10"},
		{"cookie quoted", all, "", Request{Peer: peer4, Header: hdr("Cookie", `io="q1"`)}, "cookie:io=q1"},
		{"cookie empty value", all, "", Request{Peer: peer4, Header: hdr("Cookie", "io=; x=1")}, "ip:192.0.2.10"},
		{"cookie empty quoted", all, "", Request{Peer: peer4, Header: hdr("Cookie", `io=""`)}, "ip:192.0.2.10"},
		{"cookie split across fields", all, "", Request{Peer: peer4, Header: hdr("Cookie", "a=1", "Cookie", "io=two")}, "cookie:io=two"},
		{"cookie no =", all, "", Request{Peer: peer4, Header: hdr("Cookie", "io; ;;=;io")}, "ip:192.0.2.10"},
		{"cookie value with =", all, "", Request{Peer: peer4, Header: hdr("Cookie", "io=a=b")}, "cookie:io=a=b"},

		// header
		{"header trimmed", all, "", Request{Peer: peer4, Header: hdr("x-user", " \talice \t")}, "header:X-User=alice"},
		{"header blank", all, "", Request{Peer: peer4, Header: hdr("X-User", "  ")}, "ip:192.0.2.10"},
		{"header capped", all, "", Request{Peer: peer4, Header: hdr("X-User", long)}, "header:X-User=" + long[:1024]},
		{"header several fields", all, "", Request{Peer: peer4, Header: hdr("X-User", "a", "X-User", "b")}, "header:X-User=a, b"},

		// xff
		{"xff untrusted peer ignored", all, trusted, Request{Peer: peer4, Header: hdr("X-Forwarded-For", "203.0.113.5")}, "ip:192.0.2.10"},
		{"xff trusted peer", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5")}, "xff:203.0.113.5"},
		{"xff mapped trusted peer", all, trusted, Request{Peer: mapped, Header: hdr("X-Forwarded-For", "203.0.113.5")}, "xff:203.0.113.5"},
		{"xff no trusted list", all, "", Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5")}, "ip:10.0.0.1"},
		{"xff skips trusted hops", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5, 10.1.1.1, 192.168.1.7")}, "xff:203.0.113.5"},
		{"xff spoofed left part ignored", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "1.1.1.1, 198.51.100.9, 10.2.2.2")}, "xff:198.51.100.9"},
		{"xff all trusted: left-most", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "10.9.9.9, 10.1.1.1")}, "xff:10.9.9.9"},
		{"xff ports and brackets", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5:4711")}, "xff:203.0.113.5"},
		{"xff bracketed v6 with port", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "[2001:db8::1]:80, 10.0.0.3")}, "xff:2001:db8::1"},
		{"xff bare v6", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "2001:DB8::2")}, "xff:2001:db8::2"},
		{"xff mapped client unmapped", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "::ffff:203.0.113.5")}, "xff:203.0.113.5"},
		{"xff zone dropped", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "fe80::1%eth0")}, "xff:fe80::1"},
		{"xff mapped trusted hop skipped", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5, ::ffff:10.3.3.3")}, "xff:203.0.113.5"},
		{"xff empty elements skipped", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", ",203.0.113.5,, ,")}, "xff:203.0.113.5"},
		{"xff garbage stops", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5, garbage, 10.0.0.2")}, "ip:10.0.0.1"},
		{"xff unknown stops", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5, unknown")}, "ip:10.0.0.1"},
		{"xff only commas", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", ", ,")}, "ip:10.0.0.1"},
		{"xff bad port form", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5:")}, "ip:10.0.0.1"},
		{"xff unclosed bracket", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "[2001:db8::1")}, "ip:10.0.0.1"},
		{"xff v6 peer trusted", all, trusted, Request{Peer: netip.MustParseAddr("fd00::5"), Header: hdr("X-Forwarded-For", "203.0.113.5")}, "xff:203.0.113.5"},
		{"xff several fields joined", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5", "X-Forwarded-For", "10.0.0.9")}, "xff:203.0.113.5"},
		{"xff 64 hops ok", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5"+strings.Repeat(",10.0.0.2", 63))}, "xff:203.0.113.5"},
		{"xff over 64 hops gives up", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5"+strings.Repeat(",10.0.0.2", 64))}, "ip:10.0.0.1"},
		{"xff wins over forwarded", all, trusted, Request{Peer: proxy, Header: hdr("X-Forwarded-For", "203.0.113.5", "Forwarded", "for=198.51.100.1")}, "xff:203.0.113.5"},

		// Forwarded
		{"fwd simple", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")}, "xff:192.0.2.60"},
		{"fwd case-insensitive name", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "For=192.0.2.60")}, "xff:192.0.2.60"},
		{"fwd quoted v6 with port", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="[2001:db8:cafe::17]:4711"`)}, "xff:2001:db8:cafe::17"},
		{"fwd quoted v4 port", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="192.0.2.43:47011"`)}, "xff:192.0.2.43"},
		{"fwd chain skips trusted", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "for=198.51.100.17, for=192.0.2.60;by=x, for=10.0.0.7")}, "xff:192.0.2.60"},
		{"fwd quoted comma and semicolon", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for=192.0.2.1;ext="a,b;c", for=10.0.0.8`)}, "xff:192.0.2.1"},
		{"fwd params after for", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `proto=https; for=192.0.2.2 ;host="x.example"`)}, "xff:192.0.2.2"},
		{"fwd unknown stops", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "for=192.0.2.60, for=unknown")}, "ip:10.0.0.1"},
		{"fwd obfuscated stops", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for=192.0.2.60, for="_hidden"`)}, "ip:10.0.0.1"},
		{"fwd obfuscated port ok", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="192.0.2.60:_port"`)}, "xff:192.0.2.60"},
		{"fwd element without for stops", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "for=192.0.2.60, proto=https")}, "ip:10.0.0.1"},
		{"fwd empty elements skipped", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", ", for=192.0.2.60 ,,")}, "xff:192.0.2.60"},
		{"fwd unterminated quote", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="192.0.2.60`)}, "ip:10.0.0.1"},
		{"fwd escape in for", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="192.0.2.\60"`)}, "ip:10.0.0.1"},
		{"fwd two for in one element", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for=192.0.2.1;for=192.0.2.2`)}, "ip:10.0.0.1"},
		{"fwd junk after quote", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="192.0.2.1"junk, for=10.0.0.2`)}, "ip:10.0.0.1"},
		{"fwd junk element left of client ignored", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="x"junk, for=192.0.2.9`)}, "xff:192.0.2.9"},
		{"fwd unbracketed v6 accepted", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for="2001:db8::9"`)}, "xff:2001:db8::9"},
		{"fwd nameless pair", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for=192.0.2.1, =10.0.0.2`)}, "ip:10.0.0.1"},
		{"fwd empty for", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", `for=""`)}, "ip:10.0.0.1"},
		{"fwd over 64 elements gives up", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", "for=192.0.2.1"+strings.Repeat(",for=10.0.0.2", 64))}, "ip:10.0.0.1"},
		{"fwd 100 elements, client near", all, trusted, Request{Peer: proxy, Header: hdr("Forwarded", strings.Repeat("for=1.1.1.1,", 100)+"for=192.0.2.1,for=10.0.0.2")}, "xff:192.0.2.1"},

		// ip
		{"ip mapped peer", sidIP, "", Request{Peer: mapped}, "ip:10.0.0.1"},
		{"ip v6 peer", sidIP, "", Request{Peer: netip.MustParseAddr("2001:db8::7")}, "ip:2001:db8::7"},
		{"ip invalid peer", nil, "", Request{}, "none"},
		{"default has no address key", nil, "", Request{Peer: peer4, Query: "transport=websocket"}, "none"},
		{"default sid", nil, "", Request{Peer: peer4, Query: "EIO=4&sid=abc"}, "sid:abc"},
		{"empty sources list", []Source{}, "", Request{Peer: peer4}, "none"},
		{"nil header func", all, trusted, Request{Peer: proxy}, "ip:10.0.0.1"},
		{"unknown kind skipped", []Source{{Kind: Kind(99)}, {Kind: KindNone}, {Kind: KindIP}}, "", Request{Peer: peer4}, "ip:192.0.2.10"},
		{"order: header before sid", []Source{{Kind: KindHeader, Name: "X-User"}, {Kind: KindSID}}, "", Request{Query: "EIO=4&sid=s", Header: hdr("X-User", "u")}, "header:X-User=u"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Rules{Sources: tt.srcs, TrustedProxies: mustPrefixes(t, tt.trusted)}
			k := r.Identify(tt.req)
			if got := k.String(); got != tt.want {
				t.Errorf("Identify = %q, want %q", got, tt.want)
			}
			if k.Kind == KindSID && (k.Value == "" || len(k.Value) > MaxSIDLen) {
				t.Errorf("bad sid value length %d", len(k.Value))
			}
		})
	}
}

func TestIdentifyNilRules(t *testing.T) {
	var r *Rules
	k := r.Identify(Request{Peer: netip.MustParseAddr("192.0.2.1"), Query: "EIO=4&sid=x"})
	if k.Kind != KindSID || k.Value != "x" {
		t.Fatalf("nil Rules: got %v", k)
	}
}

func TestKeyFields(t *testing.T) {
	r := Rules{Sources: []Source{{Kind: KindCookie, Name: "io"}}}
	k := r.Identify(Request{Header: hdr("Cookie", "io=abc")})
	if k.Kind != KindCookie || k.Value != "abc" || k.Name() != "io" || k.String() != "cookie:io=abc" {
		t.Fatalf("cookie key = %+v (%s)", k, k)
	}
	// The name is not hashed: Hash is "kind byte + value".
	if k.Hash() != (Key{Kind: KindCookie, Value: "abc"}).Hash() {
		t.Error("Hash depends on the name")
	}
	if (Key{Kind: KindSID, Value: "abc"}).Hash() == (Key{Kind: KindIP, Value: "abc"}).Hash() {
		t.Error("Hash ignores the kind")
	}
	if (Key{}).String() != "none" {
		t.Error("zero Key should print none")
	}
}

func TestIdentifyAllocs(t *testing.T) {
	r := Rules{
		Sources:        []Source{{Kind: KindSID}, {Kind: KindCookie, Name: "io"}, {Kind: KindHeader, Name: "X-User"}, {Kind: KindXFF}},
		TrustedProxies: mustPrefixes(t, "10.0.0.0/8"),
	}
	h := hdr("Cookie", "a=1; b=2", "X-Forwarded-For", "unknown, 10.0.0.2", "Forwarded", `for="[fd00::1]:1"`)
	noMatch := Request{Peer: netip.MustParseAddr("10.0.0.1"), Query: "EIO=4&transport=polling&t=abc", Header: h}
	if n := testing.AllocsPerRun(100, func() { r.Identify(noMatch) }); n != 0 {
		t.Errorf("no-match path allocates %v times", n)
	}
	// The sid path returns a substring of the query: nothing to allocate.
	sid := Request{Query: "EIO=4&transport=polling&sid=abcdef"}
	if n := testing.AllocsPerRun(100, func() { r.Identify(sid) }); n != 0 {
		t.Errorf("sid path allocates %v times", n)
	}
	fwd := Request{Peer: netip.MustParseAddr("10.0.0.1"), Header: hdr("Forwarded", "for=10.0.0.5, for=proto, for=10.0.0.4")}
	if n := testing.AllocsPerRun(100, func() { r.Identify(fwd) }); n != 0 {
		t.Errorf("forwarded no-match path allocates %v times", n)
	}
	k := Key{Kind: KindSID, Value: strings.Repeat("v", 100)}
	if n := testing.AllocsPerRun(100, func() { k.Hash() }); n != 0 {
		t.Errorf("Key.Hash allocates %v times", n)
	}
}

func TestParseSources(t *testing.T) {
	good := []struct {
		spec string
		want []Source
	}{
		{"", DefaultSources},
		{"  ", DefaultSources},
		{"sid,cookie:io,header:X-User,xff,ip", []Source{{KindSID, ""}, {KindCookie, "io"}, {KindHeader, "X-User"}, {KindXFF, ""}, {KindIP, ""}}},
		{" SID , Cookie: io ", []Source{{KindSID, ""}, {KindCookie, "io"}}},
		{"ip", []Source{{KindIP, ""}}},
	}
	for _, tt := range good {
		got, err := ParseSources(tt.spec)
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("ParseSources(%q) = %v, %v; want %v", tt.spec, got, err, tt.want)
		}
	}
	// The default must be a copy: a caller appending to it must not change it.
	d, _ := ParseSources("")
	d[0].Kind = KindIP
	if DefaultSources[0].Kind != KindSID {
		t.Fatal("ParseSources returned DefaultSources itself")
	}

	bad := []struct{ spec, mention string }{
		{"foo", `"foo"`},
		{"sid,,ip", `""`},
		{"sid,", `""`},
		{"cookie", `"cookie"`},
		{"cookie:", `"cookie:"`},
		{"header:X User", `"header:X User"`},
		{"header:a:b", `"header:a:b"`},
		{"cookie:a=b", `"cookie:a=b"`},
		{"ip:1", `"ip:1"`},
		{"sid,sid", `"sid"`},
		{"header:x-user,header:X-User", `"header:X-User"`},
		{"none", `"none"`},
	}
	for _, tt := range bad {
		_, err := ParseSources(tt.spec)
		if !errors.Is(err, ErrBadRule) {
			t.Errorf("ParseSources(%q) err = %v, want ErrBadRule", tt.spec, err)
			continue
		}
		msg := err.Error()
		hint := strings.Contains(msg, "want sid, cookie:NAME, header:NAME, xff or ip") || strings.Contains(msg, "twice")
		if !strings.Contains(msg, tt.mention) || !strings.Contains(msg, "-key") || !hint {
			t.Errorf("ParseSources(%q) err = %q: should name the item, the flag and the valid forms", tt.spec, msg)
		}
	}
	// Cookie names are case sensitive, so these are two sources.
	if _, err := ParseSources("cookie:io,cookie:IO"); err != nil {
		t.Errorf("distinct cookie names rejected: %v", err)
	}
}

func TestParsePrefixes(t *testing.T) {
	got, err := ParsePrefixes("10.0.0.0/8, 192.168.1.7,::1,fd00::/8,::ffff:172.16.0.0/108,::ffff:1.2.3.4,10.1.2.3/16,fe80::1%eth0")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8", "172.16.0.0/12", "1.2.3.4/32", "10.1.0.0/16", "fe80::1/128"}
	var gs []string
	for _, p := range got {
		gs = append(gs, p.String())
	}
	if !slices.Equal(gs, want) {
		t.Errorf("got %v, want %v", gs, want)
	}
	if p, err := ParsePrefixes(""); p != nil || err != nil {
		t.Errorf("empty: %v, %v", p, err)
	}
	for _, spec := range []string{"10.0.0.0/33", "nope", "10.0.0.0/8,", "1.2.3", "::1/129", "10.0.0.0/8,,::1"} {
		_, err := ParsePrefixes(spec)
		if !errors.Is(err, ErrBadRule) || !strings.Contains(err.Error(), "-trusted-proxies") {
			t.Errorf("ParsePrefixes(%q) err = %v, want ErrBadRule naming the flag", spec, err)
		}
	}
	_, err = ParsePrefixes("10.0.0.0/8,bogus/3")
	if err == nil || !strings.Contains(err.Error(), `"bogus/3"`) {
		t.Errorf("error should name the item: %v", err)
	}
}

// A hand-built Rules with a mapped prefix must still trust unmapped peers.
func TestMappedPrefixInRules(t *testing.T) {
	r := Rules{Sources: []Source{{Kind: KindXFF}}, TrustedProxies: []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/104")}}
	k := r.Identify(Request{Peer: netip.MustParseAddr("10.0.0.1"), Header: hdr("X-Forwarded-For", "203.0.113.1")})
	if k.String() != "xff:203.0.113.1" {
		t.Fatalf("got %v", k)
	}
}

func TestNamedKeyMatchesIdentify(t *testing.T) {
	r := Rules{Sources: []Source{{Kind: KindCookie, Name: "io"}}}
	got := r.Identify(Request{Header: func(n string) string {
		if n == "Cookie" {
			return "a=1; io=abc"
		}
		return ""
	}})
	if want := NamedKey(KindCookie, "io", "abc"); got.String() != want.String() {
		t.Fatalf("Identify = %s, NamedKey = %s: a learned cookie would never match", got, want)
	}
}
