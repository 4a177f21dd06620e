//go:build unix

package balancer

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/stickyd/stickyd/upgrade"
)

// Affinity hints let a load balancer in front of several stickyd hosts keep each
// engine.io session on the host that owns it. The edge cannot do that itself: the
// session exists on one host only, and the balancer in front picks the host before any
// stickyd sees the request. So the edge labels the handshake answer — the one response
// that names a new session — in the two ways existing balancers can learn from:
//
//   - a cookie naming this host (-affinity-cookie), for browsers: HAProxy `cookie NAME`
//     (passive), nginx `map $cookie_NAME`, ingress-nginx and ALB route by it;
//   - a response header carrying the sid (-sid-header), for clients without cookies
//     (Node socket.io-client): HAProxy `stick store-response res.hdr(NAME)` learns
//     sid → server, and `stick match url_param(sid)` routes the session's later requests.
//
// Only proxied handshake answers (engine.io long-polling) carry them. A WebSocket-first
// session needs none: its whole life is the one upgraded connection, which the balancer
// in front already sent to one host.

// ErrAffinityConfig is wrapped by the errors of CheckAffinity.
var ErrAffinityConfig = errors.New("balancer: affinity hints")

// maxNodeIDLen bounds the node id: it travels in a cookie and HAProxy cookie values.
const maxNodeIDLen = 64

// CheckAffinity reports whether the affinity settings can go into response heads as
// they are: header and cookie names must be HTTP tokens and the node id a cookie value
// of RFC 6265 cookie-octets, or a response could be split or the cookie dropped by the
// browser. New disables hints that fail it; call it first to refuse such a setting.
func (c *Config) CheckAffinity() error {
	var errs []error
	if c.AffinityCookie != "" && !isToken(c.AffinityCookie) {
		errs = append(errs, fmt.Errorf("%w: cookie name %q is not an HTTP token (letters, digits, !#$%%&'*+-.^_`|~)", ErrAffinityConfig, c.AffinityCookie))
	}
	if c.SIDHeader != "" && !isToken(c.SIDHeader) {
		errs = append(errs, fmt.Errorf("%w: header name %q is not an HTTP token (letters, digits, !#$%%&'*+-.^_`|~)", ErrAffinityConfig, c.SIDHeader))
	}
	if c.NodeID != "" && !isNodeID(c.NodeID) {
		errs = append(errs, fmt.Errorf("%w: node id %q: use up to %d letters, digits, '-', '_' or '.' (it is a cookie value and a balancer's server key)", ErrAffinityConfig, c.NodeID, maxNodeIDLen))
	}
	return errors.Join(errs...)
}

// affinityDefaults fills NodeID from the host name and turns off hints whose settings
// would corrupt a response head (CheckAffinity), saying so.
func (c *Config) affinityDefaults() {
	if c.AffinityCookie == "" && c.SIDHeader == "" {
		return
	}
	if c.NodeID == "" {
		c.NodeID = defaultNodeID()
	}
	if err := c.CheckAffinity(); err != nil {
		c.Logger.Error("affinity hints disabled: fix the setting", "err", err)
		c.AffinityCookie, c.SIDHeader = "", ""
	}
}

// defaultNodeID is the host name up to its first dot (Kubernetes pod names and short
// host names are unique among the hosts behind one balancer; the domain adds nothing
// but length), or "stickyd" when it has none usable.
func defaultNodeID() string {
	h, err := os.Hostname()
	if err != nil {
		return "stickyd"
	}
	if i := strings.IndexByte(h, '.'); i > 0 {
		h = h[:i]
	}
	if !isNodeID(h) {
		return "stickyd"
	}
	return h
}

// DefaultNodeID is the node id the edge uses when none is given: the short host name.
func DefaultNodeID() string { return defaultNodeID() }

// writeAffinity adds the affinity hints to the head of a handshake answer being written
// to the client (before the blank line). prefix is the start of the answer's body, the
// engine.io open packet; without a sid in it this is no handshake and nothing is added.
func (x *exchange) writeAffinity(bw *bufio.Writer, prefix []byte) {
	cfg := &x.b.cfg
	if cfg.AffinityCookie == "" && cfg.SIDHeader == "" {
		return
	}
	sid, ok := upgrade.OpenPacketSID(prefix) // a bounded token of [A-Za-z0-9_-]: safe in a head
	if !ok {
		return
	}
	if cfg.SIDHeader != "" {
		bw.WriteString(cfg.SIDHeader)
		bw.WriteString(": ")
		bw.WriteString(sid)
		bw.WriteString("\r\n")
	}
	if cfg.AffinityCookie != "" {
		// Path=/: the balancer routes the whole site, and the app's engine.io path can be
		// anywhere under it. No Domain: the cookie goes back only to the host name the
		// client used, the balancer's. No Max-Age: it must outlive only the engine.io
		// session, and any host can start a new one. HttpOnly: no script needs it.
		// SameSite=Lax: sent with the page's own XHR/fetch polling requests and
		// top-level navigations, never on cross-site subrequests; it grants nothing, but
		// there is no reason to send it anywhere else. Secure only when the client spoke
		// https (to the edge, or to a trusted proxy): a browser drops a Secure cookie set
		// over plain http.
		bw.WriteString("Set-Cookie: ")
		bw.WriteString(cfg.AffinityCookie)
		bw.WriteByte('=')
		bw.WriteString(cfg.NodeID)
		bw.WriteString("; Path=/; HttpOnly; SameSite=Lax")
		if x.overHTTPS() {
			bw.WriteString("; Secure")
		}
		bw.WriteString("\r\n")
	}
}

// overHTTPS reports whether the client's request came over https: to the edge itself
// (ServeTLS), or to a trusted proxy that says so (X-Forwarded-Proto, or proto= of
// Forwarded). A client's own claim is not believed. The request head is still valid
// here: requests without a streaming body keep it in the client reader's buffer until
// the exchange ends (proxyRequest retries with it).
func (x *exchange) overHTTPS() bool {
	if x.scheme() == "https" {
		return true
	}
	if !x.trusted || x.streaming {
		return false
	}
	h := &x.sc.head
	if p := h.Header("X-Forwarded-Proto"); p != "" {
		// The proxy nearest the client appended first: a chain "https, http" is a
		// client on https whose TLS ended at the first proxy.
		first, _, _ := strings.Cut(p, ",")
		return strings.EqualFold(strings.TrimSpace(first), "https")
	}
	for _, elem := range strings.Split(h.Header("Forwarded"), ",") {
		for _, pair := range strings.Split(elem, ";") {
			k, v, ok := strings.Cut(strings.TrimSpace(pair), "=")
			if ok && strings.EqualFold(k, "proto") {
				return strings.EqualFold(strings.Trim(v, `"`), "https")
			}
		}
	}
	return false
}

func isToken(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func isNodeID(s string) bool {
	if s == "" || len(s) > maxNodeIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
