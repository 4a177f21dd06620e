package sticky

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/cespare/xxhash/v2"
)

// ErrBadRule is wrapped by every error ParseSources and ParsePrefixes return,
// so callers can tell a configuration mistake from anything else with errors.Is.
var ErrBadRule = errors.New("sticky: bad rule")

// Kind says where a client identity came from.
type Kind uint8

const (
	KindNone   Kind = iota // keyless: no source matched
	KindSID                // engine.io sid query parameter (only when the query also has EIO=)
	KindCookie             // named cookie
	KindHeader             // named header
	KindXFF                // client address from X-Forwarded-For / Forwarded, only if the direct peer is trusted
	KindIP                 // direct peer IP
)

// String returns the name used in the -key flag ("none" for KindNone).
func (k Kind) String() string {
	switch k {
	case KindNone:
		return "none"
	case KindSID:
		return "sid"
	case KindCookie:
		return "cookie"
	case KindHeader:
		return "header"
	case KindXFF:
		return "xff"
	case KindIP:
		return "ip"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Limits on what a client can make us hold. They keep table keys and log
// lines bounded no matter what a client sends.
const (
	MaxSIDLen   = 256  // longer sids are not engine.io sids: no match
	MaxValueLen = 1024 // header and cookie values are cut to this many bytes
	MaxHops     = 64   // X-Forwarded-For / Forwarded entries examined at most
)

// Source is one item of the -key flag.
type Source struct {
	Kind Kind
	Name string // cookie or header name; empty for the other kinds
}

// String returns the flag form of s ("sid", "cookie:io", "header:X-User", ...).
func (s Source) String() string {
	if s.Kind == KindCookie || s.Kind == KindHeader {
		return s.Kind.String() + ":" + s.Name
	}
	return s.Kind.String()
}

// DefaultSources is used when Rules.Sources is nil or the -key flag is empty: a
// socket.io session sticks by its sid; everything else has no identity and goes to the
// least-loaded worker. Pinning by peer address ("ip") is opt-in: behind a NAT or an
// ingress every client shares one address, and pinning would pile them on one worker.
var DefaultSources = []Source{{Kind: KindSID}}

const sourceForms = "want sid, cookie:NAME, header:NAME, xff or ip"

// ParseSources parses the -key flag, e.g. "sid,cookie:io,header:X-User,xff,ip".
// Order matters: Identify uses the first source that matches. An empty spec
// yields a copy of DefaultSources.
func ParseSources(spec string) ([]Source, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return append([]Source(nil), DefaultSources...), nil
	}
	var out []Source
	for item := range strings.SplitSeq(spec, ",") {
		item = strings.TrimSpace(item)
		s, err := parseSource(item)
		if err != nil {
			return nil, err
		}
		for _, o := range out {
			// A repeated source can never match where the first did not, so it
			// is almost certainly a typo for something else.
			if o.Kind == s.Kind && (o.Name == s.Name || (s.Kind == KindHeader && strings.EqualFold(o.Name, s.Name))) {
				return nil, fmt.Errorf("%w: -key item %q is listed twice", ErrBadRule, item)
			}
		}
		out = append(out, s)
	}
	return out, nil
}

func parseSource(item string) (Source, error) {
	kind, name, hasName := strings.Cut(item, ":")
	kind = strings.TrimSpace(kind)
	name = strings.TrimSpace(name)
	var s Source
	switch strings.ToLower(kind) {
	case "sid":
		s.Kind = KindSID
	case "xff":
		s.Kind = KindXFF
	case "ip":
		s.Kind = KindIP
	case "cookie":
		s.Kind = KindCookie
	case "header":
		s.Kind = KindHeader
	default:
		return Source{}, fmt.Errorf("%w: -key item %q: %s", ErrBadRule, item, sourceForms)
	}
	named := s.Kind == KindCookie || s.Kind == KindHeader
	switch {
	case named && !hasName:
		return Source{}, fmt.Errorf("%w: -key item %q needs a name (%s:NAME): %s", ErrBadRule, item, s.Kind, sourceForms)
	case named && !isToken(name):
		return Source{}, fmt.Errorf("%w: -key item %q: %q is not a valid %s name: %s", ErrBadRule, item, name, s.Kind, sourceForms)
	case !named && hasName:
		return Source{}, fmt.Errorf("%w: -key item %q: %s takes no name: %s", ErrBadRule, item, s.Kind, sourceForms)
	}
	s.Name = name
	return s, nil
}

// isToken reports whether s is an RFC 7230 token, which is what both header
// names and RFC 6265 cookie names are.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"(),/:;<=>?@[\\]{}", c) >= 0 {
			return false
		}
	}
	return true
}

// ParsePrefixes parses the -trusted-proxies flag, e.g.
// "10.0.0.0/8,192.168.1.7,::1,fd00::/8". A bare address becomes a /32 or
// /128. IPv4-mapped IPv6 forms are unmapped so they match the unmapped peer
// addresses Identify compares them with. An empty spec yields nil.
func ParsePrefixes(spec string) ([]netip.Prefix, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, nil
	}
	var out []netip.Prefix
	for item := range strings.SplitSeq(spec, ",") {
		item = strings.TrimSpace(item)
		p, err := parsePrefix(item)
		if err != nil {
			return nil, fmt.Errorf("%w: -trusted-proxies item %q: want an IP address or CIDR such as 10.0.0.0/8 or fd00::/8", ErrBadRule, item)
		}
		out = append(out, p)
	}
	return out, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.IndexByte(s, '/') < 0 {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		// A zone names the local interface the proxy was reached through, not
		// the proxy; peers are compared without zones.
		a = a.WithZone("").Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return normPrefix(p).Masked(), nil
}

// normPrefix turns ::ffff:a.b.c.d/n (n >= 96) into a.b.c.d/(n-96) so it
// contains unmapped IPv4 addresses.
func normPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// Rules decide a client's identity. The zero value uses DefaultSources and
// trusts no proxy.
type Rules struct {
	Sources        []Source       // nil: DefaultSources
	TrustedProxies []netip.Prefix // peers whose X-Forwarded-For/Forwarded are believed
}

// Headers gives a request's header fields by name: case-insensitive, several fields
// of one name joined with ", " ("; " for Cookie). The edge's parsed head (a
// *upgrade.Head) satisfies it; HeaderFunc adapts a function.
type Headers interface {
	Header(name string) string
}

// HeaderFunc adapts a function to Headers.
type HeaderFunc func(name string) string

// Header calls f.
func (f HeaderFunc) Header(name string) string { return f(name) }

// Request is the part of a request head identity depends on. It is a struct
// of plain values rather than *http.Request so the edge can fill it from its
// own head parser without building an http.Request.
type Request struct {
	Peer  netip.Addr // direct TCP peer (may be IPv4-mapped IPv6)
	Query string     // raw query string (after '?', no '#')
	// Fields are the header fields; nil means none (or Header). Pass the parsed head
	// itself: a pointer in an interface costs nothing, while a method value such as
	// h.Header allocates a closure on every request.
	Fields Headers
	// Header is the older function form, used only when Fields is nil.
	Header func(name string) string
}

func (req *Request) header(name string) string {
	if req.Fields != nil {
		return req.Fields.Header(name)
	}
	if req.Header == nil {
		return ""
	}
	return req.Header(name)
}

// Key is a client identity. Kind == KindNone means keyless. Value is the bare
// value (the sid, the cookie or header value, the IP string); for cookie and
// header keys the source name is kept alongside so String can tell
// cookie:a=x from cookie:b=x. Compare keys with String, not ==, when they may
// come from named sources.
//
// A KindIP or KindXFF key also holds its address (Addr); a key from
// IdentifyNoAlloc holds only that, with Value empty, so that no text is made
// for it. String, AppendTo and Hash give the same results either way.
type Key struct {
	Kind  Kind
	Value string
	name  string
	addr  netip.Addr
}

// NamedKey builds the key a KindCookie or KindHeader source named name yields for
// value (for example from a Set-Cookie the edge saw in a worker's answer).
func NamedKey(kind Kind, name, value string) Key { return Key{Kind: kind, Value: value, name: name} }

// Name returns the cookie or header name of a KindCookie or KindHeader key.
func (k Key) Name() string { return k.name }

// Addr returns the address of a KindIP or KindXFF key (from Identify or
// IdentifyNoAlloc), else the zero Addr.
func (k Key) Addr() netip.Addr { return k.addr }

// lazyAddr reports whether k's value is its address, not yet written as text.
func (k *Key) lazyAddr() bool { return k.Value == "" && k.addr.IsValid() }

// Hash returns the xxhash of the kind byte followed by Value. It feeds
// Balance.Pick. The name is left out on purpose: two sources of the same kind
// that carry the same value describe the same client.
func (k Key) Hash() uint64 {
	if k.lazyAddr() {
		// The same bytes as the text form would hash: kind byte, then the address.
		var arr [1 + 64]byte
		b := k.addr.AppendTo(append(arr[:0], byte(k.Kind)))
		return xxhash.Sum64(b)
	}
	var d xxhash.Digest // on the stack: the asm routines are marked noescape
	d.Reset()
	b := [1]byte{byte(k.Kind)}
	d.Write(b[:])
	d.WriteString(k.Value)
	return d.Sum64()
}

// String returns a form such as "sid:abc", "cookie:io=abc", "header:X-User=u1",
// "xff:203.0.113.7" or "ip:192.0.2.1", for table keys and logs. It carries a
// client identity, so it must never be used as a metric label.
func (k Key) String() string {
	switch k.Kind {
	case KindNone:
		return "none"
	case KindCookie, KindHeader:
		return k.Kind.String() + ":" + k.name + "=" + k.Value
	}
	if k.lazyAddr() {
		return string(k.AppendTo(nil))
	}
	return k.Kind.String() + ":" + k.Value
}

// AppendTo appends the String form of k to b. With a buffer of its own (on the
// stack, or reused), a caller can look a key up in a map[string] as
// m[string(b)] without allocating: the edge's table lookups do.
func (k Key) AppendTo(b []byte) []byte {
	switch k.Kind {
	case KindNone:
		return append(b, "none"...)
	case KindCookie, KindHeader:
		b = append(b, k.Kind.String()...)
		b = append(b, ':')
		b = append(b, k.name...)
		b = append(b, '=')
		return append(b, k.Value...)
	}
	b = append(b, k.Kind.String()...)
	b = append(b, ':')
	if k.lazyAddr() {
		return k.addr.AppendTo(b)
	}
	return append(b, k.Value...)
}

// Trusts reports whether peer is a trusted proxy, whose forwarding fields
// (X-Forwarded-For, Forwarded, X-Forwarded-Proto) may be passed on. A nil
// *Rules trusts nobody.
func (r *Rules) Trusts(peer netip.Addr) bool {
	return r != nil && len(r.TrustedProxies) > 0 && isTrusted(peer.Unmap().WithZone(""), r.TrustedProxies)
}

// Client returns the client's address as far as the edge can vouch for it: from the
// X-Forwarded-For/Forwarded chain when the peer is a trusted proxy, else the peer.
func (r *Rules) Client(req Request) netip.Addr {
	peer := req.Peer.Unmap().WithZone("")
	if !r.Trusts(peer) {
		return peer
	}
	if a, ok := forwardedClient(&req, r.TrustedProxies); ok {
		return a
	}
	return peer
}

// Identify returns the key of the first source in r.Sources that matches req,
// or a KindNone key. A nil *Rules behaves like the zero value.
func (r *Rules) Identify(req Request) Key {
	k := r.IdentifyNoAlloc(req)
	if k.lazyAddr() {
		k.Value = k.addr.String()
	}
	return k
}

// IdentifyNoAlloc is Identify for the edge's per-request path: the key of a
// KindIP or KindXFF source keeps its address (Addr) and leaves Value empty, so
// nothing is allocated; String, AppendTo and Hash give what they give for
// Identify's key. Sid, cookie and header values are substrings of req, except
// an escaped sid (unescaped) and several fields of one name (joined by
// req.Fields).
func (r *Rules) IdentifyNoAlloc(req Request) Key {
	srcs := DefaultSources
	var trusted []netip.Prefix
	if r != nil {
		if r.Sources != nil {
			srcs = r.Sources
		}
		trusted = r.TrustedProxies
	}
	for _, s := range srcs {
		var v string
		var a netip.Addr
		var ok bool
		switch s.Kind {
		case KindSID:
			v, ok = querySID(req.Query)
		case KindCookie:
			v, ok = cookieValue(req.header("Cookie"), s.Name)
		case KindHeader:
			v, ok = headerValue(req.header(s.Name))
		case KindXFF:
			a, ok = forwardedClient(&req, trusted)
		case KindIP:
			// The zone is dropped for the same reason as in ParsePrefixes.
			a = req.Peer.Unmap().WithZone("")
			ok = a.IsValid()
		}
		if ok {
			k := Key{Kind: s.Kind, Value: v, addr: a}
			if s.Kind == KindCookie || s.Kind == KindHeader {
				k.name = s.Name
			}
			return k
		}
	}
	return Key{}
}

// querySID returns the sid query parameter when the query also carries EIO,
// which is what marks an engine.io request: a bare "sid" elsewhere in an
// application's URLs must not be mistaken for a session.
func querySID(q string) (string, bool) {
	var sid string
	haveEIO, haveSID := false, false
	for q != "" && !(haveEIO && haveSID) {
		var pair string
		pair, q, _ = strings.Cut(q, "&")
		k, v, _ := strings.Cut(pair, "=")
		if len(k) != 3 && !escaped(k) {
			continue // neither "EIO" nor "sid", written plainly or escaped
		}
		if escaped(k) {
			// Escaped names are rare enough that allocating for them is fine.
			u, err := url.QueryUnescape(k)
			if err != nil {
				continue
			}
			k = u
		}
		switch k {
		case "EIO":
			haveEIO = true
		case "sid":
			if !haveSID {
				haveSID, sid = true, v
			}
		}
	}
	if !haveEIO || sid == "" || len(sid) > 3*MaxSIDLen {
		return "", false
	}
	if escaped(sid) {
		u, err := url.QueryUnescape(sid)
		if err != nil {
			return "", false
		}
		sid = u
	}
	if sid == "" || len(sid) > MaxSIDLen {
		return "", false
	}
	return sid, true
}

// escaped reports whether s needs query unescaping.
func escaped(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '%' || s[i] == '+' {
			return true
		}
	}
	return false
}

// cookieValue returns the value of the first cookie called name. Pairs are
// split on ';' (RFC 6265) and also on ',', because several Cookie fields
// arrive joined with ", " and a comma is not a legal cookie-octet anyway.
func cookieValue(h, name string) (string, bool) {
	for h != "" {
		i := strings.IndexAny(h, ";,")
		var pair string
		if i < 0 {
			pair, h = h, ""
		} else {
			pair, h = h[:i], h[i+1:]
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok || trimOWS(k) != name {
			continue
		}
		v = trimOWS(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		if v == "" {
			return "", false
		}
		return capLen(v), true
	}
	return "", false
}

func headerValue(h string) (string, bool) {
	h = trimOWS(h)
	if h == "" {
		return "", false
	}
	return capLen(h), true
}

// capLen keeps the first MaxValueLen bytes: a longer value still identifies
// the client, and two clients sharing a 1 KiB prefix merely share a worker.
func capLen(v string) string {
	if len(v) > MaxValueLen {
		return v[:MaxValueLen]
	}
	return v
}

func trimOWS(s string) string {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}
