//go:build unix

package fdpass

import (
	"net/http"
	"net/netip"
)

// ClientAddrField is the field in which the edge tells a worker the client's address
// ("ip:port"; port 0 when the client was named by a trusted proxy's X-Forwarded-For) on
// every request it proxies. The edge drops any copy a client sends.
const ClientAddrField = "X-Stickyd-Client-Addr"

// EdgeAddr is the local address of a virtual connection: a socketpair over which the edge
// proxies plain HTTP requests, one after another and each possibly from another client
// (ClientAddr says which). A request served on one has it in its context under
// http.LocalAddrContextKey.
type EdgeAddr struct{}

func (EdgeAddr) Network() string { return "unix" }
func (EdgeAddr) String() string  { return "stickyd-edge" }

// ClientAddr is the address of the client a Go worker's request came from, as the edge
// saw it:
//   - on a virtual connection, the edge's ClientAddrField: a virtual connection carries
//     many clients' requests, and only the edge writes on it;
//   - on a connection the edge handed over (the client's own TCP socket: a WebSocket
//     upgrade, or any request in the same connection), r.RemoteAddr; a ClientAddrField
//     there came from the client and is not believed.
//
// It reports false when there is no address to give: a request on a virtual connection
// without a well-formed field (one the edge did not proxy), or an r.RemoteAddr that is no
// "ip:port".
func ClientAddr(r *http.Request) (netip.AddrPort, bool) {
	if v := r.Header.Values(ClientAddrField); fromEdge(r) && len(v) > 0 {
		if len(v) != 1 {
			return netip.AddrPort{}, false
		}
		ap, err := netip.ParseAddrPort(v[0])
		return ap, err == nil
	}
	// A handed-over connection, or a request Handler has already given its client.
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	return ap, err == nil
}

// Handler serves h with r.RemoteAddr set to the client's address (ClientAddr) and
// ClientAddrField removed, so that handlers, loggers and rate limiters written for a plain
// net/http server see the client on every request, proxied or handed over — what the
// preload does for Node apps. Use it on servers fed by Listen:
//
//	ln, _ := fdpass.Listen()
//	http.Serve(ln, fdpass.Handler(mux))
func Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ap, ok := ClientAddr(r); ok && fromEdge(r) {
			r.RemoteAddr = ap.String()
		}
		r.Header.Del(ClientAddrField)
		h.ServeHTTP(w, r)
	})
}

func fromEdge(r *http.Request) bool {
	_, ok := r.Context().Value(http.LocalAddrContextKey).(EdgeAddr)
	return ok
}
