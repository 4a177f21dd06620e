package upgrade

import (
	"net/url"
	"strings"
	"time"
)

// SessionUnknownBody is engine.io's own answer to a request for a session it
// does not know: send it with status 400 and Content-Type: application/json.
const SessionUnknownBody = `{"code":1,"message":"Session ID unknown"}`

// EngineIO holds the engine.io query parameters of a request.
type EngineIO struct{ EIO, Transport, SID string }

// ParseEngineIO extracts EIO, transport and sid from a raw query string. ok
// reports whether EIO is present. Values are URL-unescaped; the first
// occurrence of a parameter wins. When the query has no EIO parameter (and no
// escapes), it does not allocate; values that need no unescaping alias
// rawQuery.
func ParseEngineIO(rawQuery string) (EngineIO, bool) {
	var e EngineIO
	if !strings.Contains(rawQuery, "EIO") && strings.IndexByte(rawQuery, '%') < 0 {
		return e, false
	}
	var haveEIO, haveT, haveSID bool
	for q := rawQuery; q != ""; {
		var kv string
		if i := strings.IndexByte(q, '&'); i >= 0 {
			kv, q = q[:i], q[i+1:]
		} else {
			kv, q = q, ""
		}
		k, v, _ := strings.Cut(kv, "=")
		if needsUnescape(k) {
			uk, err := url.QueryUnescape(k)
			if err != nil {
				continue
			}
			k = uk
		}
		var dst *string
		switch {
		case k == "EIO" && !haveEIO:
			dst, haveEIO = &e.EIO, true
		case k == "transport" && !haveT:
			dst, haveT = &e.Transport, true
		case k == "sid" && !haveSID:
			dst, haveSID = &e.SID, true
		default:
			continue
		}
		if needsUnescape(v) {
			uv, err := url.QueryUnescape(v)
			if err != nil {
				continue // malformed escape: treat as absent
			}
			v = uv
		}
		*dst = v
	}
	return e, haveEIO
}

func needsUnescape(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '%' || s[i] == '+' {
			return true
		}
	}
	return false
}

const (
	openScanLimit = 2 << 10 // OpenPacketSID looks at most at this many bytes
	maxSIDLen     = 256
)

// OpenPacketSID returns the session id from the body of an engine.io polling
// handshake response: the open packet, EIO 4 `0{"sid":"...",...}` (possibly
// followed by "\x1e" and more packets), EIO 3 text `96:0{...}` or EIO 3 binary
// (XHR2) `\x00<length digits>\xff0{...}`. It looks at the first 2 KiB only.
// The sid must be at most 256 bytes of URL-safe characters
// ([A-Za-z0-9_-.~]); anything else gives ok false. The result is a copy.
func OpenPacketSID(body []byte) (string, bool) {
	obj, ok := openPacketObject(body)
	if !ok {
		return "", false
	}
	sid, ok := jsonTopLevelString(obj, "sid")
	if !ok || len(sid) == 0 || len(sid) > maxSIDLen {
		return "", false
	}
	for _, c := range sid {
		if !isSIDChar[c] {
			return "", false
		}
	}
	return string(sid), true
}

// OpenPacketTimeout returns how long the engine.io server keeps a silent session:
// pingInterval + pingTimeout from the open packet in body (as OpenPacketSID reads it).
// ok is false unless both are present as integers of milliseconds below a day.
func OpenPacketTimeout(body []byte) (d time.Duration, ok bool) {
	obj, ok := openPacketObject(body)
	if !ok {
		return 0, false
	}
	interval, ok1 := jsonTopLevelMillis(obj, "pingInterval")
	timeout, ok2 := jsonTopLevelMillis(obj, "pingTimeout")
	if !ok1 || !ok2 {
		return 0, false
	}
	return interval + timeout, true
}

// jsonTopLevelMillis reads the member key of the object at the start of b as a
// non-negative integer count of milliseconds, below a day.
func jsonTopLevelMillis(b []byte, key string) (time.Duration, bool) {
	i, ok := jsonTopLevelValue(b, key)
	if !ok {
		return 0, false
	}
	var n int64
	digits := 0
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		n = n*10 + int64(b[i]-'0')
		if digits++; digits > 9 {
			return 0, false
		}
	}
	if digits == 0 || n >= int64(24*time.Hour/time.Millisecond) {
		return 0, false
	}
	return time.Duration(n) * time.Millisecond, true
}

// openPacketObject returns the JSON object of the open packet that starts body.
func openPacketObject(body []byte) ([]byte, bool) {
	if len(body) > openScanLimit {
		body = body[:openScanLimit]
	}
	switch {
	case len(body) > 0 && body[0] >= '1' && body[0] <= '9': // EIO3 text payload "<len>:<packet>"
		i := 0
		for i < len(body) && i < 8 && body[i] >= '0' && body[i] <= '9' {
			i++
		}
		if i == len(body) || body[i] != ':' {
			return nil, false
		}
		body = body[i+1:]
	case len(body) > 0 && body[0] == 0: // EIO3 binary payload, string packet
		i := 1
		for i < len(body) && i < 9 && body[i] <= 9 {
			i++
		}
		if i == 1 || i == len(body) || body[i] != 0xff {
			return nil, false
		}
		body = body[i+1:]
	}
	if len(body) < 2 || body[0] != '0' {
		return nil, false
	}
	return body[1:], true
}

var isSIDChar [256]bool

func init() {
	for c := 0; c < 256; c++ {
		isSIDChar[c] = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '-' || c == '_' || c == '.' || c == '~'
	}
}

// jsonTopLevelString scans the JSON object at the start of b (after optional
// whitespace) for the member key and returns its string value's raw bytes.
// It stops as soon as the member is found, so a truncated object whose sid
// came first still works. Values with escapes are rejected (sids have none).
func jsonTopLevelString(b []byte, key string) ([]byte, bool) {
	i, ok := jsonTopLevelValue(b, key)
	if !ok || i >= len(b) || b[i] != '"' {
		return nil, false
	}
	vs, ve, vesc, ok := scanString(b, i)
	if !ok || vesc {
		return nil, false
	}
	return b[vs:ve], true
}

// jsonTopLevelValue scans the JSON object at the start of b for the member key and
// returns where its value starts.
func jsonTopLevelValue(b []byte, key string) (int, bool) {
	i := skipWS(b, 0)
	if i >= len(b) || b[i] != '{' {
		return 0, false
	}
	i++
	for {
		i = skipWS(b, i)
		if i >= len(b) || b[i] != '"' {
			return 0, false
		}
		ks, ke, esc, ok := scanString(b, i)
		if !ok {
			return 0, false
		}
		i = skipWS(b, ke+1)
		if i >= len(b) || b[i] != ':' {
			return 0, false
		}
		i = skipWS(b, i+1)
		if !esc && string(b[ks:ke]) == key {
			return i, true
		}
		if i = skipValue(b, i); i < 0 {
			return 0, false
		}
		i = skipWS(b, i)
		if i >= len(b) || b[i] != ',' {
			return 0, false // '}' (not found) or malformed
		}
		i++
	}
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanString scans the JSON string starting at b[i] == '"'; it returns the
// bounds of its contents, whether it has escapes, and ok.
func scanString(b []byte, i int) (start, end int, esc, ok bool) {
	start = i + 1
	for j := start; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			return start, j, esc, true
		case c == '\\':
			esc = true
			j++
		case c < 0x20:
			return 0, 0, false, false
		}
	}
	return 0, 0, false, false
}

// skipValue skips any JSON value at b[i] and returns the index after it, or
// -1. Nesting is tracked with a counter, not recursion.
func skipValue(b []byte, i int) int {
	depth := 0
	for i < len(b) {
		switch c := b[i]; c {
		case '"':
			_, e, _, ok := scanString(b, i)
			if !ok {
				return -1
			}
			i = e + 1
		case '{', '[':
			depth++
			i++
		case '}', ']':
			if depth == 0 {
				return -1
			}
			depth--
			i++
		default:
			if depth == 0 && (c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
				return -1 // empty scalar
			}
			// scalar (number, true, false, null) or separators inside a
			// container: advance.
			if depth == 0 {
				for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' &&
					b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
					i++
				}
				if i >= len(b) {
					return -1
				}
				return i
			}
			i++
		}
		if depth == 0 {
			return i
		}
	}
	return -1
}
