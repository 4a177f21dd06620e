package sticky

import (
	"net/netip"
	"strings"
)

// hopResult classifies one X-Forwarded-For / Forwarded entry.
type hopResult uint8

const (
	hopAddr  hopResult = iota // a usable address
	hopEmpty                  // an empty list element: skipped, as RFC 7230 lists allow them
	hopStop                   // unknown, obfuscated or malformed: nothing left of it can be believed
)

// forwardedClient returns the client address reported by the proxies in
// front of us, or false. Only a trusted direct peer is believed, and the chain
// is walked right to left (nearest hop first) past further trusted proxies, so
// a client cannot pick its own identity by sending a forged header: whatever
// it wrote is left of the first hop an untrusted party added.
//
// X-Forwarded-For wins when present; Forwarded (RFC 7239) is used only without
// it, since a proxy that sets both writes the same hops into each.
//
// It returns the address, not its text, so the edge's routing allocates nothing.
func forwardedClient(req *Request, trusted []netip.Prefix) (netip.Addr, bool) {
	if len(trusted) == 0 || !isTrusted(req.Peer.Unmap().WithZone(""), trusted) {
		return netip.Addr{}, false
	}
	if xff := trimOWS(req.header("X-Forwarded-For")); xff != "" {
		return walkXFF(xff, trusted)
	}
	if fwd := trimOWS(req.header("Forwarded")); fwd != "" {
		return walkForwarded(fwd, trusted)
	}
	return netip.Addr{}, false
}

func isTrusted(a netip.Addr, trusted []netip.Prefix) bool {
	if !a.IsValid() {
		return false
	}
	for _, p := range trusted {
		// normPrefix lets hand-built Rules list ::ffff:10.0.0.0/104 too.
		if normPrefix(p).Contains(a) {
			return true
		}
	}
	return false
}

// hopWalk carries the right-to-left decision shared by both header forms.
type hopWalk struct {
	trusted []netip.Prefix
	last    netip.Addr // left-most trusted address seen so far
	n       int
}

// step consumes one hop. done reports that the walk is over; then ok says
// whether addr is the client.
func (w *hopWalk) step(res hopResult, a netip.Addr) (client netip.Addr, done, ok bool) {
	w.n++
	switch res {
	case hopEmpty:
	case hopStop:
		return netip.Addr{}, true, false
	case hopAddr:
		if !isTrusted(a, w.trusted) {
			return a, true, true
		}
		w.last = a
	}
	if w.n >= MaxHops {
		// Bound the work a client can cause. Give up rather than guess: the
		// left-most of 64 trusted hops is not the left-most of the chain.
		return netip.Addr{}, true, false
	}
	return netip.Addr{}, false, false
}

// end is called when the chain is exhausted: every hop was trusted, so the
// left-most is the originating client (e.g. an internal caller).
func (w *hopWalk) end() (netip.Addr, bool) {
	if w.last.IsValid() {
		return w.last, true
	}
	return netip.Addr{}, false
}

func walkXFF(h string, trusted []netip.Prefix) (netip.Addr, bool) {
	w := hopWalk{trusted: trusted}
	for {
		i := strings.LastIndexByte(h, ',')
		item := h[i+1:]
		res, a := parseHop(item)
		if c, done, ok := w.step(res, a); done {
			if ok {
				return c, true
			}
			return netip.Addr{}, false
		}
		if i < 0 {
			return w.end()
		}
		h = h[:i]
	}
}

// walkForwarded parses RFC 7239 elements left to right (quoted strings may
// hide ',' and ';', so the header cannot be split from the right), remembering
// the for= value of the last MaxHops elements in a ring, then walks those
// right to left. The ring lives on the stack: nothing is allocated.
func walkForwarded(h string, trusted []netip.Prefix) (netip.Addr, bool) {
	var ring [MaxHops]string
	var state [MaxHops]elemState
	n := 0
	for p := 0; p <= len(h); {
		val, st, next := forwardedElement(h, p)
		ring[n%MaxHops], state[n%MaxHops] = val, st
		n++
		p = next
	}
	w := hopWalk{trusted: trusted}
	for k := 0; k < min(n, MaxHops); k++ {
		j := (n - 1 - k) % MaxHops
		res, a := hopStop, netip.Addr{}
		switch state[j] {
		case elemEmpty:
			res = hopEmpty
		case elemOK:
			res, a = parseHop(ring[j])
			if res == hopEmpty {
				res = hopStop
			}
		}
		if c, done, ok := w.step(res, a); done {
			if ok {
				return c, true
			}
			return netip.Addr{}, false
		}
	}
	if n > MaxHops {
		return netip.Addr{}, false
	}
	return w.end()
}

type elemState uint8

const (
	elemOK    elemState = iota // has a for= value to parse
	elemEmpty                  // nothing between two commas: skipped
	elemNoFor                  // a hop that did not say whom it talked to: like "unknown"
	elemBad                    // malformed, or a for= that cannot be an address
)

// forwardedElement scans the element starting at h[p:] up to the next ','
// outside quotes and returns its for= value with quotes removed. next is the
// index after the ',' (len(h)+1 at the end).
func forwardedElement(h string, p int) (forVal string, st elemState, next int) {
	ok, seen, haveFor := true, false, false
	defer func() {
		switch {
		case !ok:
			st = elemBad
		case haveFor:
			st = elemOK
		case seen:
			st = elemNoFor
		default:
			st = elemEmpty
		}
	}()
	for p < len(h) {
		// one pair: name=value
		for p < len(h) && (h[p] == ' ' || h[p] == '\t') {
			p++
		}
		start := p
		for p < len(h) && h[p] != '=' && h[p] != ';' && h[p] != ',' {
			p++
		}
		name := trimOWS(h[start:p])
		var val string
		if p < len(h) && h[p] == '=' {
			p++
			if name == "" {
				ok = false // "=value" without a parameter name
			}
			if p < len(h) && h[p] == '"' {
				p++
				vs := p
				esc := false
				for p < len(h) && h[p] != '"' {
					if h[p] == '\\' {
						esc = true
						p++
					}
					p++
				}
				if p >= len(h) {
					ok = false
					return "", 0, len(h) + 1 // unterminated quote eats the rest
				}
				val = h[vs:p]
				p++ // closing quote
				if esc && strings.EqualFold(name, "for") {
					ok = false // no address contains a backslash
				}
			} else {
				vs := p
				for p < len(h) && h[p] != ';' && h[p] != ',' {
					p++
				}
				val = trimOWS(h[vs:p])
			}
		} else if name != "" {
			ok = false // a parameter without '='
		}
		for p < len(h) && (h[p] == ' ' || h[p] == '\t') {
			p++
		}
		if name != "" {
			seen = true
		}
		if strings.EqualFold(name, "for") {
			if haveFor || val == "" {
				ok = false // repeated for= within one element, or an empty for=
			}
			haveFor, forVal = true, val
		}
		if p >= len(h) {
			break
		}
		switch h[p] {
		case ';':
			p++
		case ',':
			return forVal, 0, p + 1
		default:
			// junk after a quoted value: mark the element bad and skip to
			// the next element (a quote here may open a quoted string, but
			// a malformed element is already a stop, so precision is moot).
			ok = false
			for p < len(h) && h[p] != ',' {
				p++
			}
		}
	}
	return forVal, 0, len(h) + 1
}

// parseHop parses one node: "192.0.2.1", "192.0.2.1:8080", "2001:db8::1",
// "[2001:db8::1]", "[2001:db8::1]:8080". "unknown" and obfuscated "_x"
// identifiers stop the walk. The result is unmapped and has no zone.
// Well-formed input is parsed without allocating (netip allocates only for
// its error values).
func parseHop(s string) (hopResult, netip.Addr) {
	s = trimOWS(s)
	if s == "" {
		return hopEmpty, netip.Addr{}
	}
	if s[0] == '_' || strings.EqualFold(s, "unknown") {
		return hopStop, netip.Addr{}
	}
	var host string
	switch {
	case s[0] == '[':
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return hopStop, netip.Addr{}
		}
		host = s[1:end]
		if rest := s[end+1:]; rest != "" && (rest[0] != ':' || len(rest) == 1) {
			return hopStop, netip.Addr{}
		}
	default:
		switch strings.Count(s, ":") {
		case 0: // IPv4
			host = s
		case 1: // IPv4:port
			h, port, _ := strings.Cut(s, ":")
			if port == "" || strings.IndexByte(h, '.') < 0 {
				return hopStop, netip.Addr{}
			}
			host = h
		default: // bare IPv6, common in X-Forwarded-For
			host = s
		}
	}
	if host == "" || !looksLikeIP(host) {
		return hopStop, netip.Addr{}
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return hopStop, netip.Addr{}
	}
	return hopAddr, a.WithZone("").Unmap()
}

// looksLikeIP rejects obvious garbage before netip.ParseAddr, whose error
// values are heap allocated.
func looksLikeIP(s string) bool {
	if len(s) > 64 { // longest IPv6 text plus a reasonable zone
		return false
	}
	zone := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%':
			zone = true
		case zone:
		case c >= '0' && c <= '9', c >= 'a' && c <= 'f', c >= 'A' && c <= 'F', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}
