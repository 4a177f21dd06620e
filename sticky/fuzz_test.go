package sticky

import (
	"errors"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
)

func FuzzIdentify(f *testing.F) {
	f.Add("EIO=4&transport=polling&sid=abc", "io=x; a=b", "203.0.113.5, 10.0.0.2", `for="[2001:db8::1]:80";proto=https`, "alice", []byte{10, 0, 0, 1})
	f.Add("EIO=4&sid=%zz", `io="`, ",,,[", `for="\"`, "", []byte{})
	f.Add("sid=&EIO", ";;==", "unknown, _x, ::ffff:1.2.3.4", `a=b;;for=,for="_o", for=1.2.3.4:`, strings.Repeat("h", 1100), netip.MustParseAddr("::ffff:10.1.1.1").AsSlice())
	f.Add("%45IO=1&sid=a+b", "io=v, io=w", "fe80::1%eth0:80, [::1]x", `for="a;b,c"junk, For=10.9.9.9`, " \t ", []byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})

	trusted := mustPrefixes(f, "10.0.0.0/8,fd00::/8,::1")
	all := []Source{{Kind: KindSID}, {Kind: KindCookie, Name: "io"}, {Kind: KindHeader, Name: "X-User"}, {Kind: KindXFF}, {Kind: KindIP}}
	proxy := netip.MustParseAddr("10.0.0.1")

	f.Fuzz(func(t *testing.T, query, cookie, xff, fwd, hval string, peerBytes []byte) {
		peer, _ := netip.AddrFromSlice(peerBytes)
		h := func(name string) string {
			switch strings.ToLower(name) {
			case "cookie":
				return cookie
			case "x-forwarded-for":
				return xff
			case "forwarded":
				return fwd
			case "x-user":
				return hval
			}
			return ""
		}
		// Every source alone (so each parser sees the input), then all of them.
		for _, srcs := range [][]Source{all[0:1], all[1:2], all[2:3], all[3:4], all[4:5], all} {
			for _, p := range []netip.Addr{peer, proxy} {
				r := Rules{Sources: srcs, TrustedProxies: trusted}
				req := Request{Peer: p, Query: query, Header: h}
				k := r.Identify(req)
				checkKey(t, k)
				req.Header, req.Fields = nil, HeaderFunc(h)
				checkSameKey(t, k, r.IdentifyNoAlloc(req))
			}
		}
		// Without X-Forwarded-For the Forwarded parser runs.
		r := Rules{Sources: all[3:4], TrustedProxies: trusted}
		checkKey(t, r.Identify(Request{Peer: proxy, Header: func(n string) string {
			if strings.EqualFold(n, "forwarded") {
				return fwd
			}
			return ""
		}}))

		// Differential check of the sid rule against net/url when the query
		// is well formed.
		k := (&Rules{Sources: all[0:1]}).Identify(Request{Query: query})
		if vs, err := url.ParseQuery(query); err == nil {
			sid := vs.Get("sid")
			want := vs.Has("EIO") && sid != "" && len(sid) <= MaxSIDLen
			if got := k.Kind == KindSID; got != want || (got && k.Value != sid) {
				t.Fatalf("query %q: got %v, net/url says sid %q (EIO %v)", query, k, sid, vs.Has("EIO"))
			}
		}
	})
}

func checkKey(t *testing.T, k Key) {
	t.Helper()
	_ = k.Hash()
	_ = k.String()
	switch k.Kind {
	case KindNone:
		if k.Value != "" {
			t.Fatalf("keyless key with value %q", k.Value)
		}
	case KindSID:
		if k.Value == "" || len(k.Value) > MaxSIDLen {
			t.Fatalf("bad sid %q", k.Value)
		}
	case KindCookie, KindHeader:
		if k.Value == "" || len(k.Value) > MaxValueLen || k.Name() == "" {
			t.Fatalf("bad %s value %q", k.Kind, k.Value)
		}
	case KindXFF, KindIP:
		a, err := netip.ParseAddr(k.Value)
		if err != nil || a.Is4In6() || a.Zone() != "" || a.String() != k.Value {
			t.Fatalf("%s value %q is not a normalised address", k.Kind, k.Value)
		}
	default:
		t.Fatalf("unknown kind %d", k.Kind)
	}
}

func FuzzParseSources(f *testing.F) {
	for _, s := range []string{"", "sid,cookie:io,header:X-User,xff,ip", "cookie:", "header:a b", "sid,,", "SID, Ip ", "header:x,header:X", "cookie:\x00", "ip:x", ":"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		srcs, err := ParseSources(spec)
		if err != nil {
			if !errors.Is(err, ErrBadRule) || !strings.Contains(err.Error(), "-key") {
				t.Fatalf("error %v does not wrap ErrBadRule or name the flag", err)
			}
			return
		}
		if len(srcs) == 0 {
			t.Fatal("no error and no sources")
		}
		var parts []string
		for _, s := range srcs {
			switch s.Kind {
			case KindSID, KindXFF, KindIP:
				if s.Name != "" {
					t.Fatalf("%v has a name", s)
				}
			case KindCookie, KindHeader:
				if !isToken(s.Name) {
					t.Fatalf("%v: bad name", s)
				}
			default:
				t.Fatalf("kind %v parsed", s.Kind)
			}
			parts = append(parts, s.String())
		}
		// What parses prints back to something that parses the same.
		again, err := ParseSources(strings.Join(parts, ","))
		if err != nil || !slices.Equal(again, srcs) {
			t.Fatalf("round trip of %v: %v, %v", srcs, again, err)
		}
	})
}
