//go:build unix

package balancer

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
)

// backendEdge runs an edge whose n workers are WebSocket echo servers reached by address
// (stickyd proxy's backends); each says hello with its id and the forwarding fields it
// got.
func backendEdge(t *testing.T, cfg Config, n int) string {
	t.Helper()
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	b := New(cfg)
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		up := websocket.Upgrader{}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			c.WriteJSON(map[string]string{"Worker": strconv.Itoa(i), "XFF": r.Header.Get("X-Forwarded-For"),
				"Proto": r.Header.Get("X-Forwarded-Proto"), "RealIP": r.Header.Get("X-Real-IP"), "Edge": r.Header.Get(ClientAddrField)})
			for {
				typ, msg, err := c.ReadMessage()
				if err != nil || c.WriteMessage(typ, msg) != nil {
					return
				}
			}
		})}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		b.AddWorker(workers.NewWorker(i, 0, workers.NewBackendChannel("tcp", ln.Addr().String(), nil), 0))
	}
	lns, err := ListenConfig{}.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go b.Serve(lns[0])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	return lns[0].Addr().String()
}

type backendHello struct{ Worker, XFF, Proto, RealIP, Edge string }

func dialBackendWS(t *testing.T, addr string, hdr http.Header) (*websocket.Conn, backendHello) {
	t.Helper()
	c, _, err := (&websocket.Dialer{HandshakeTimeout: 5 * time.Second}).Dial("ws://"+addr+"/ws", hdr)
	if err != nil {
		t.Fatal(err)
	}
	var h backendHello
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := c.ReadJSON(&h); err != nil {
		t.Fatal(err)
	}
	return c, h
}

// TestTunnelToBackend: a WebSocket to a backend reached by address is tunnelled (the
// backend cannot take a descriptor); the backend sees the client in X-Forwarded-For, not
// what the client claimed about itself; messages go both ways.
func TestTunnelToBackend(t *testing.T) {
	addr := backendEdge(t, Config{}, 2)
	spoof := http.Header{"X-Forwarded-For": {"6.6.6.6"}, "X-Real-Ip": {"6.6.6.6"}, ClientAddrField: {"6.6.6.6:1"}}
	c, h := dialBackendWS(t, addr, spoof)
	defer c.Close()
	if h.XFF != "127.0.0.1" || h.Proto != "http" || h.RealIP != "" || h.Edge != "" {
		t.Errorf("backend got forwarding fields %+v, want X-Forwarded-For 127.0.0.1 only (and the proto)", h)
	}
	for i := range 3 {
		msg := []byte("message " + strconv.Itoa(i))
		if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			t.Fatal(err)
		}
		if _, got, err := c.ReadMessage(); err != nil || string(got) != string(msg) {
			t.Fatalf("echo: %q %v", got, err)
		}
	}
}

// TestTunnelToBackendTrustedProxy: behind a trusted proxy the chain it sent is kept.
func TestTunnelToBackendTrustedProxy(t *testing.T) {
	cfg := Config{Rules: sticky.Rules{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}
	addr := backendEdge(t, cfg, 1)
	c, h := dialBackendWS(t, addr, http.Header{"X-Forwarded-For": {"192.0.2.7"}, "X-Forwarded-Proto": {"https"}})
	defer c.Close()
	if h.XFF != "192.0.2.7, 127.0.0.1" || h.Proto != "https" {
		t.Errorf("backend got %+v, want the trusted chain then the peer, and https", h)
	}
}

// TestIdleTunnelHoldsNoPipe: an idle tunnel costs its two sockets and nothing more — no
// kernel pipe per direction, which io.Copy's splice keeps while it waits for input (each
// pipe two descriptors and its ring in unreclaimable kernel memory).
func TestIdleTunnelHoldsNoPipe(t *testing.T) {
	addr := backendEdge(t, Config{}, 2)
	base := openFDs(t)
	const n = 20
	for i := range n {
		c, _ := dialBackendWS(t, addr, nil)
		defer c.Close()
		msg := []byte("warm " + strconv.Itoa(i)) // data flowed both ways: the pipes were used
		c.WriteMessage(websocket.TextMessage, msg)
		if _, got, err := c.ReadMessage(); err != nil || string(got) != string(msg) {
			t.Fatalf("echo: %q %v", got, err)
		}
	}
	// Per tunnel in this process: the client's socket, the edge's two, the backend's one.
	// The runtime may keep a few spare pipes pooled (not per tunnel).
	want := base + 4*n
	waitFor(t, "idle tunnels to settle", 5*time.Second, func() bool { return openFDs(t) <= want+8 })
	if got := openFDs(t); got > want+8 {
		t.Fatalf("%d idle tunnels hold %d descriptors, want %d (4 each) plus a few pooled pipes", n, got-base, 4*n)
	}
}
