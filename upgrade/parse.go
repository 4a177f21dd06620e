package upgrade

import (
	"bytes"
	"strings"
	"unsafe"
)

// DefaultMaxHeadBytes is the head size cap used when max <= 0.
const DefaultMaxHeadBytes = 16 << 10

// MaxFields is the most header fields a head may have; more is rejected
// with 431 (ErrHeadTooLarge).
const MaxFields = 100

// Field is one header field line: the name as sent and the value with
// leading and trailing whitespace (SP, HTAB) removed.
type Field struct{ Name, Value string }

// Head is a parsed and validated request head.
//
// A Head filled by ParseInto or PeekInto aliases the parsed bytes: it is valid
// only while they are unchanged. Heads returned by Parse, Peek and Clone own
// their memory.
type Head struct {
	Method, Target, Proto string // Proto is "HTTP/1.1" or "HTTP/1.0"
	ProtoMinor            int    // 0 or 1

	// Path and RawQuery come from Target, split at the first '?'. Path is
	// raw (still percent-encoded). For an absolute-form target
	// (http://host/p?q) they come from its path and query ("/" when the
	// path is empty) and Host from its authority. For "*" (OPTIONS only)
	// Path is "*".
	Path, RawQuery string

	// Fields are the header fields in order; names as sent, values
	// trimmed of OWS.
	Fields []Field

	// Host is the authority of an absolute-form target, else the Host
	// field ("" when absent, which HTTP/1.0 allows).
	Host string

	ContentLength int64 // -1 when absent
	Chunked       bool  // Transfer-Encoding: chunked
	Close         bool  // Connection: close, or HTTP/1.0 without keep-alive
	// WebSocket: method GET, Connection has the token "upgrade" and Upgrade
	// has the token "websocket" (case-insensitive, comma lists, several
	// fields).
	WebSocket bool
	// Size is the length of the head in bytes, including any leading empty
	// lines and the final CRLFCRLF. The body (or the next request) starts
	// at b[Size].
	Size int

	raw string // the Size bytes of the head; Clone copies it
}

// Header returns the value of the field name (case-insensitive), "" when
// absent. Several fields of that name are joined with ", " (with "; " for
// Cookie, as RFC 9113 §8.2.3 does, so the result still parses as a cookie
// list). A single field is returned without allocating; joining allocates.
func (h *Head) Header(name string) string {
	first := -1
	for i := range h.Fields {
		if !equalFold(h.Fields[i].Name, name) {
			continue
		}
		if first < 0 {
			first = i
			continue
		}
		// Second occurrence: join all of them.
		sep := ", "
		if equalFold(name, "cookie") {
			sep = "; "
		}
		var sb strings.Builder
		sb.WriteString(h.Fields[first].Value)
		for _, f := range h.Fields[i:] {
			if equalFold(f.Name, name) {
				sb.WriteString(sep)
				sb.WriteString(f.Value)
			}
		}
		return sb.String()
	}
	if first < 0 {
		return ""
	}
	return h.Fields[first].Value
}

// Clone returns a copy of h that owns its memory (one string copy of the
// head plus a new Fields slice), so it stays valid after the parsed buffer
// is reused.
func (h *Head) Clone() Head {
	c := *h
	c.Fields = nil
	if len(h.Fields) > 0 {
		c.Fields = make([]Field, len(h.Fields))
	}
	if h.raw == "" {
		copy(c.Fields, h.Fields)
		return c
	}
	own := strings.Clone(h.raw)
	base := uintptr(unsafe.Pointer(unsafe.StringData(h.raw)))
	end := base + uintptr(len(h.raw))
	re := func(s string) string {
		if s == "" {
			return s
		}
		p := uintptr(unsafe.Pointer(unsafe.StringData(s)))
		if p < base || p >= end {
			return s // a constant such as "/" or "*"
		}
		off := int(p - base)
		return own[off : off+len(s)]
	}
	c.raw = own
	c.Method, c.Target, c.Proto = re(h.Method), re(h.Target), re(h.Proto)
	c.Path, c.RawQuery, c.Host = re(h.Path), re(h.RawQuery), re(h.Host)
	for i, f := range h.Fields {
		c.Fields[i] = Field{re(f.Name), re(f.Value)}
	}
	return c
}

// Parse parses the request head at the start of b (b may hold more bytes
// after it: a body or pipelined requests).
//
// It returns ErrIncomplete when b holds no complete head yet and len(b) <
// max, and an *Error (431, ErrHeadTooLarge) when no head end is found within
// max bytes. max <= 0 means DefaultMaxHeadBytes. Every rejection is an
// *Error; see the package sentinels. The returned Head owns its memory.
func Parse(b []byte, max int) (Head, error) {
	var arr [16]Field
	h := Head{Fields: arr[:0]}
	if err := ParseInto(&h, b, max); err != nil {
		return Head{}, err
	}
	return h.Clone(), nil
}

// ParseInto is Parse for the hot path: it reuses h.Fields' backing array and
// does not allocate once that array is large enough.
//
// The strings in *h alias b: h is valid only while b[:h.Size] is unchanged.
// Use h.Clone() to keep it. On error *h is unspecified.
func ParseInto(h *Head, b []byte, max int) error {
	*h = Head{Fields: h.Fields[:0], ContentLength: -1}
	if max <= 0 {
		max = DefaultMaxHeadBytes
	}
	full := len(b) >= max
	if len(b) > max {
		b = b[:max]
	}
	err := parse(h, b)
	if err == ErrIncomplete && full {
		return errTooLarge
	}
	return err
}

func str(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

func parse(h *Head, b []byte) error {
	if len(b) == 0 {
		return ErrIncomplete
	}
	if b[0] == 0x16 { // TLS handshake record
		if len(b) < 2 {
			return ErrIncomplete
		}
		if b[1] == 0x03 {
			return errTLS
		}
		return errMethod
	}

	// RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF)
	// received before the request-line. They count towards Size and max.
	i := 0
	for i < len(b) && b[i] == '\r' {
		if i+1 >= len(b) {
			return ErrIncomplete
		}
		if b[i+1] != '\n' {
			return errRequestLine
		}
		i += 2
	}
	if i == len(b) {
		return ErrIncomplete
	}
	if b[i] == '\n' {
		return errBareLF
	}

	lf := bytes.IndexByte(b[i:], '\n')
	if lf < 0 {
		if err := checkRequestLinePrefix(b[i:]); err != nil {
			return err
		}
		return ErrIncomplete
	}
	lf += i
	if b[lf-1] != '\r' {
		return errBareLF
	}
	if err := parseRequestLine(h, b[i:lf-1]); err != nil {
		return err
	}
	i = lf + 1

	var (
		nHost, nCL, nTE        int
		hostField              string
		connClose, connKeep    bool
		connUpgrade, upgradeWS bool
	)
	for {
		if i >= len(b) {
			return ErrIncomplete
		}
		switch b[i] {
		case '\r':
			if i+1 >= len(b) {
				return ErrIncomplete
			}
			if b[i+1] != '\n' {
				return errFieldName
			}
			i += 2
			goto done
		case '\n':
			return errBareLF
		case ' ', '\t':
			return errObsFold
		}
		lf = bytes.IndexByte(b[i:], '\n')
		if lf < 0 {
			return ErrIncomplete
		}
		lf += i
		if b[lf-1] != '\r' {
			return errBareLF
		}
		line := b[i : lf-1]
		i = lf + 1

		n := 0
		for n < len(line) && isTchar[line[n]] {
			n++
		}
		if n == len(line) {
			return errFieldName // no colon
		}
		switch line[n] {
		case ':':
		case ' ', '\t':
			return errSpaceColon
		default:
			return errFieldName
		}
		if n == 0 {
			return errFieldName
		}
		v := line[n+1:]
		for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
			v = v[1:]
		}
		for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
			v = v[:len(v)-1]
		}
		for _, c := range v {
			if !isValueChar[c] {
				return errFieldValue
			}
		}
		if len(h.Fields) == MaxFields {
			return errTooManyFields
		}
		name, value := str(line[:n]), str(v)
		h.Fields = append(h.Fields, Field{name, value})

		switch len(name) {
		case 4:
			if equalFold(name, "host") {
				if nHost++; nHost > 1 {
					return errDupHost
				}
				hostField = value
			}
		case 7:
			if equalFold(name, "upgrade") && HasToken(value, "websocket") {
				upgradeWS = true
			}
		case 10:
			if equalFold(name, "connection") {
				connClose = connClose || HasToken(value, "close")
				connKeep = connKeep || HasToken(value, "keep-alive")
				connUpgrade = connUpgrade || HasToken(value, "upgrade")
			}
		case 14:
			if equalFold(name, "content-length") {
				if nCL++; nCL > 1 {
					return errDupCL
				}
				cl, ok := parseContentLength(value)
				if !ok {
					return errBadCL
				}
				h.ContentLength = cl
			}
		case 17:
			if equalFold(name, "transfer-encoding") {
				if nTE++; nTE > 1 {
					return errDupTE
				}
				if !equalFold(value, "chunked") {
					return errTE
				}
				h.Chunked = true
			}
		}
	}
done:
	if nTE > 0 {
		if nCL > 0 {
			return errCLTE
		}
		if h.ProtoMinor == 0 {
			return errTE10
		}
	}
	if nHost == 0 && h.ProtoMinor == 1 {
		return errNoHost
	}
	if nHost > 0 && !validHost(hostField) {
		return errHost
	}
	if h.Host == "" { // not absolute-form
		h.Host = hostField
	}
	h.Close = connClose || (h.ProtoMinor == 0 && !connKeep)
	h.WebSocket = connUpgrade && upgradeWS && h.Method == "GET"
	h.Size = i
	h.raw = str(b[:i])
	return nil
}

// checkRequestLinePrefix rejects an incomplete request line as soon as it
// cannot become valid, so garbage is refused without waiting for a line end.
func checkRequestLinePrefix(p []byte) error {
	m := 0
	for m < len(p) && isTchar[p[m]] {
		m++
	}
	if m == len(p) {
		return nil
	}
	if m == 0 || p[m] != ' ' {
		return errMethod
	}
	e := m + 1
	for e < len(p) && p[e] != ' ' {
		if !isTargetChar[p[e]] {
			return errTarget
		}
		e++
	}
	if e == len(p) {
		return nil
	}
	if e == m+1 {
		return errRequestLine
	}
	const want = "HTTP/d.d\r"
	for k, c := range p[e+1:] {
		if k >= len(want) {
			return errProto
		}
		if want[k] == 'd' {
			if c < '0' || c > '9' {
				return errProto
			}
		} else if c != want[k] {
			return errProto
		}
	}
	return nil
}

// parseRequestLine parses "METHOD SP target SP HTTP/1.x" (without CRLF).
func parseRequestLine(h *Head, line []byte) error {
	m := 0
	for m < len(line) && isTchar[line[m]] {
		m++
	}
	if m == 0 {
		return errMethod
	}
	if m == len(line) {
		return errRequestLine
	}
	if line[m] != ' ' {
		return errMethod
	}
	t := m + 1
	e := t
	for e < len(line) && line[e] != ' ' {
		if !isTargetChar[line[e]] {
			return errTarget
		}
		if line[e] == '%' && (e+2 >= len(line) || !isHex(line[e+1]) || !isHex(line[e+2])) {
			return errTarget // malformed percent-encoding
		}
		e++
	}
	if e == t || e == len(line) {
		return errRequestLine // empty target, double SP, or no version
	}
	ver := line[e+1:]
	if len(ver) != 8 || string(ver[:5]) != "HTTP/" || ver[6] != '.' ||
		ver[5] < '0' || ver[5] > '9' || ver[7] < '0' || ver[7] > '9' {
		return errProto
	}
	if ver[5] != '1' || (ver[7] != '0' && ver[7] != '1') {
		return errVersion
	}
	h.Method = str(line[:m])
	h.Target = str(line[t:e])
	h.Proto = str(ver)
	h.ProtoMinor = int(ver[7] - '0')
	if h.Method == "CONNECT" {
		return errConnect
	}

	target := line[t:e]
	switch {
	case target[0] == '/':
		h.Path, h.RawQuery = splitQuery(target)
	case len(target) == 1 && target[0] == '*':
		if h.Method != "OPTIONS" {
			return errAsteriskForm
		}
		h.Path = "*"
	default:
		rest, ok := cutScheme(target)
		if !ok {
			return errTarget
		}
		a := 0
		for a < len(rest) && rest[a] != '/' && rest[a] != '?' {
			a++
		}
		if a == 0 || !validHost(str(rest[:a])) || bytes.IndexByte(rest[:a], '%') >= 0 {
			return errTarget
		}
		h.Host = str(rest[:a])
		h.Path, h.RawQuery = splitQuery(rest[a:])
		if h.Path == "" {
			h.Path = "/"
		}
	}
	return nil
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func splitQuery(t []byte) (path, query string) {
	if q := bytes.IndexByte(t, '?'); q >= 0 {
		return str(t[:q]), str(t[q+1:])
	}
	return str(t), ""
}

// cutScheme strips a case-insensitive "http://" or "https://".
func cutScheme(t []byte) ([]byte, bool) {
	s := str(t)
	switch {
	case len(s) > 7 && equalFold(s[:7], "http://"):
		return t[7:], true
	case len(s) > 8 && equalFold(s[:8], "https://"):
		return t[8:], true
	}
	return nil, false
}

func parseContentLength(v string) (int64, bool) {
	if v == "" {
		return 0, false
	}
	var n int64
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		d := int64(c - '0')
		if n > (1<<63-1-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

// HasToken reports whether the comma-separated list v contains token
// (case-insensitive), ignoring OWS around elements.
func HasToken(v, token string) bool {
	for v != "" {
		var elem string
		if c := strings.IndexByte(v, ','); c >= 0 {
			elem, v = v[:c], v[c+1:]
		} else {
			elem, v = v, ""
		}
		for len(elem) > 0 && (elem[0] == ' ' || elem[0] == '\t') {
			elem = elem[1:]
		}
		for len(elem) > 0 && (elem[len(elem)-1] == ' ' || elem[len(elem)-1] == '\t') {
			elem = elem[:len(elem)-1]
		}
		if equalFold(elem, token) {
			return true
		}
	}
	return false
}

// equalFold is ASCII-only case-insensitive equality.
func equalFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == y {
			continue
		}
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// validHost reports whether s is made of the characters of a uri-host
// (reg-name, IPv4, IP-literal) with an optional port, as Go's
// httpguts.ValidHostHeader allows them. Userinfo ('@') is not allowed.
func validHost(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isHostChar[s[i]] {
			return false
		}
	}
	return true
}

var isTchar, isTargetChar, isValueChar, isHostChar [256]bool

func init() {
	for c := 0; c < 256; c++ {
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		isTchar[c] = alnum || strings.IndexByte("!#$%&'*+-.^_`|~", byte(c)) >= 0
		// Target: visible ASCII except '#' (no fragments on the wire).
		isTargetChar[c] = c > 0x20 && c < 0x7f && c != '#'
		// field-value: VCHAR, obs-text, SP, HTAB.
		isValueChar[c] = c == '\t' || c >= 0x20 && c != 0x7f
		isHostChar[c] = alnum || strings.IndexByte("-._~!$&'()*+,;=:[]%", byte(c)) >= 0
	}
}
