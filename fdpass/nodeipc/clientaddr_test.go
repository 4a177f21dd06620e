//go:build unix

package nodeipc

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// clientSeen is what testdata/clientaddr.js answers: the client as the app saw it.
type clientSeen struct {
	RemoteAddress *string `json:"remoteAddress"`
	RemotePort    *int    `json:"remotePort"`
	RemoteFamily  *string `json:"remoteFamily"`
	Connection    *string `json:"connection"`
	Field         bool    `json:"field"`
	RawField      bool    `json:"rawField"`
	HostOK        bool    `json:"hostOK"`
}

func (s clientSeen) String() string {
	b, _ := json.Marshal(s)
	return string(b)
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// check compares with the wanted address, port and family (nil: undefined in the app).
func (s clientSeen) check(t *testing.T, what string, addr any, port any, family any) {
	t.Helper()
	if deref(s.RemoteAddress) != addr || deref(s.RemotePort) != port || deref(s.RemoteFamily) != family ||
		deref(s.Connection) != addr {
		t.Errorf("%s: the app saw %s; want remoteAddress %v, remotePort %v, remoteFamily %v (req.connection the same)",
			what, s, addr, port, family)
	}
	if !s.HostOK {
		t.Errorf("%s: the Host field is not intact in req.headers, req.headersDistinct and req.rawHeaders", what)
	}
	if s.Field || s.RawField {
		t.Errorf("%s: X-Stickyd-Client-Addr still visible to the app (headers %v, rawHeaders %v)", what, s.Field, s.RawField)
	}
}

// ask writes one request head with the given extra field lines and reads the app's answer.
func ask(t *testing.T, c net.Conn, br *bufio.Reader, head string) clientSeen {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, head); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s clientSeen
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

func deliver(t *testing.T, w *worker, c syscall.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, c); err != nil {
		t.Fatalf("Deliver: %v", err)
	}
}

// TestPreloadClientAddress: on a socketpair from the edge (a virtual connection carrying
// requests of several clients one after another, or a tunnelled upgrade) the app sees, per
// request, the client the edge names in X-Stickyd-Client-Addr as req.socket.remoteAddress,
// remotePort and remoteFamily; the first value wins (the edge writes its own first); no field,
// or a malformed one, shows no address (never the previous client's); the field is gone from
// req.headers, req.headersDistinct and req.rawHeaders, the other fields intact. On a real TCP socket the field a client sends is not
// believed and the true peer shows.
func TestPreloadClientAddress(t *testing.T) {
	w := startWorker(t, workerOpts{}, "clientaddr.js", "3000")
	w.waitReady(t)
	get := func(fields ...string) string {
		h := "GET /addr HTTP/1.1\r\nHost: x\r\n"
		for _, f := range fields {
			h += f + "\r\n"
		}
		return h + "\r\n"
	}

	edge, app := unixPair(t)
	defer edge.Close()
	deliver(t, w, app)
	app.Close()
	br := bufio.NewReader(edge)
	ask(t, edge, br, get("X-Stickyd-Client-Addr: 127.0.0.2:40001")).check(t, "IPv4 client", "127.0.0.2", 40001, "IPv4")
	ask(t, edge, br, get("x-stickyd-client-addr: [2001:db8::1]:443")).check(t, "IPv6 client", "2001:db8::1", 443, "IPv6")
	ask(t, edge, br, get("X-Stickyd-Client-Addr: 198.51.100.7:0")).check(t, "client named by a trusted proxy (port 0)", "198.51.100.7", nil, "IPv4")
	ask(t, edge, br, get()).check(t, "no field after other clients", nil, nil, nil)
	ask(t, edge, br, get("X-Stickyd-Client-Addr: 127.0.0.3:5", "X-Stickyd-Client-Addr: 6.6.6.6:1")).check(t, "edge's field then a client's", "127.0.0.3", 5, "IPv4")
	ask(t, edge, br, get("X-Stickyd-Client-Addr: 127.0.0.3:5, 6.6.6.6:1")).check(t, "one field, two values", "127.0.0.3", 5, "IPv4")
	for _, bad := range []string{"6.6.6.6", "6.6.6.6:99999", "::1:5", "[::1]", "example.com:80", "[1.2.3.4]:5", strings.Repeat("1", 100) + ":1"} {
		ask(t, edge, br, get("X-Stickyd-Client-Addr: "+bad)).check(t, "malformed "+bad, nil, nil, nil)
	}

	// A tunnelled upgrade: the edge's field right after the request line, a client's later.
	up, upApp := unixPair(t)
	defer up.Close()
	deliver(t, w, upApp)
	upApp.Close()
	ask(t, up, bufio.NewReader(up), "GET /ws HTTP/1.1\r\nX-Stickyd-Client-Addr: 127.0.0.4:40004\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Stickyd-Client-Addr: 6.6.6.6:1\r\n\r\n").
		check(t, "tunnelled upgrade", "127.0.0.4", 40004, "IPv4")

	// The client's own TCP socket: its field is a lie; the true peer shows.
	for _, upgrade := range []bool{false, true} {
		client, server := tcpPair(t)
		defer client.Close()
		deliver(t, w, server)
		server.Close()
		head := get("X-Stickyd-Client-Addr: 6.6.6.6:1")
		if upgrade {
			head = get("X-Stickyd-Client-Addr: 6.6.6.6:1", "Connection: Upgrade", "Upgrade: websocket")
		}
		port := client.LocalAddr().(*net.TCPAddr).Port
		ask(t, client, bufio.NewReader(client), head).check(t, "TCP client sending the field (upgrade "+map[bool]string{false: "no", true: "yes"}[upgrade]+")", "127.0.0.1", port, "IPv4")
	}
}
