//go:build unix

package main

// End-to-end test of the client's address in Node apps (issue 13, item 2): whatever way a
// session reaches its worker — long-polling requests proxied over the edge's socketpairs, a
// WebSocket handed over as the client's own TCP socket, or a WebSocket upgrade tunnelled over
// a socketpair because it came on a connection that already carried a request — the app's
// socket.handshake.address and req.socket.remoteAddress are the client's, and a client cannot
// choose them by sending X-Stickyd-Client-Addr itself. Fixtures: testdata/socketio
// clientaddr-app.js and clientaddr-clients.js.

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clientAddrResult is the JSON line clientaddr-clients.js prints.
type clientAddrResult struct {
	Sessions []struct {
		Source, Mode    string
		Forged          bool
		Address, Conn   *string
		Ack             *string
		AckAfterUpgrade *string
		Field           *bool
		Worker          *string
		Upgraded        bool
		HTTP            *struct {
			Status        int
			RemoteAddress *string
			RemotePort    *int
			LocalPort     int
		}
		Error *string
	}
	HTTP []struct {
		Source        string
		Forged        bool
		Status        int
		LocalPort     int
		RemoteAddress *string
		RemotePort    *int
		RemoteFamily  *string
		Connection    *string
		Field         bool
	}
	Errors []string
}

func strOrUndef(p *string) string {
	if p == nil {
		return "undefined"
	}
	return *p
}

func intOrUndef(p *int) string {
	if p == nil {
		return "undefined"
	}
	return strconv.Itoa(*p)
}

// runClientAddrClients runs clientaddr-clients.js against the daemon (bounded) and parses it.
func runClientAddrClients(t *testing.T, d *daemon, sources []string) (clientAddrResult, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "clientaddr-clients.js", "--url", "http://"+d.addr,
		"--sources", strings.Join(sources, ","), "--forge", "6.6.6.6:1", "--http", "3", "--timeout-ms", "60000")
	cmd.Dir = nodeFixtures(t)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	line := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(line, '\n'); i >= 0 {
		line = line[i+1:]
	}
	var res clientAddrResult
	if jerr := json.Unmarshal([]byte(line), &res); jerr != nil {
		t.Fatalf("clientaddr-clients.js printed no JSON result (exit: %v)\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	if err != nil || len(res.Errors) > 0 {
		t.Errorf("clientaddr-clients.js: %v, errors %q\nstderr:\n%s", err, res.Errors, stderr.String())
	}
	return res, line
}

// TestNodeAppSeesClientAddress: `stickyd run -workers 2 -- node clientaddr-app.js` (listen()
// and @socket.io/sticky's setupWorker styles); from 127.0.0.2, .3 and .4 at once, sessions
// that start with long-polling (and upgrade), polling-only, WebSocket-first, and WebSocket
// after a plain request on the same keep-alive connection (tunnelled by the edge), each with
// and without a forged X-Stickyd-Client-Addr: 6.6.6.6:1. Every session's
// socket.handshake.address is its own source; every plain request's req.socket.remoteAddress
// and remotePort are the client's own address and port (keep-alive connections of different
// clients share the edge's socketpairs to the workers); the app never sees the field.
func TestNodeAppSeesClientAddress(t *testing.T) {
	dir := nodeFixtures(t)
	sources := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}
	modes := []string{"polling-first", "polling-only", "websocket-first", "websocket-after-http"}
	for _, style := range []string{"listen", "sticky"} {
		t.Run(style, func(t *testing.T) {
			d := startDaemonEnv(t, dir, []string{"STYLE=" + style}, "run", "-workers", "2", "-shutdown-timeout", "2s",
				"--", "node", "clientaddr-app.js")
			sioWaitWorkers(t, d, 2, 60*time.Second)
			res, raw := runClientAddrClients(t, d, sources)

			seen := map[string]int{}
			workers := map[string]bool{}
			for _, s := range res.Sessions {
				what := s.Mode + " session from " + s.Source
				if s.Forged {
					what += " (sending X-Stickyd-Client-Addr: 6.6.6.6:1)"
				}
				seen[s.Mode]++
				if s.Worker != nil {
					workers[*s.Worker] = true
				}
				if s.Error != nil {
					t.Errorf("%s: %s", what, *s.Error)
					continue
				}
				if strOrUndef(s.Address) != s.Source || strOrUndef(s.Conn) != s.Source || strOrUndef(s.Ack) != s.Source {
					t.Errorf("%s: socket.handshake.address %s (engine.io remoteAddress %s, later %s), want %s",
						what, strOrUndef(s.Address), strOrUndef(s.Conn), strOrUndef(s.Ack), s.Source)
				}
				if s.Field == nil || *s.Field {
					t.Errorf("%s: the handshake's headers show X-Stickyd-Client-Addr to the app", what)
				}
				if s.Mode == "polling-first" && (!s.Upgraded || strOrUndef(s.AckAfterUpgrade) != s.Source) {
					t.Errorf("%s: upgraded %v, handshake.address after the upgrade %s", what, s.Upgraded, strOrUndef(s.AckAfterUpgrade))
				}
				if h := s.HTTP; s.Mode == "websocket-after-http" && (h == nil || h.Status != 200 ||
					strOrUndef(h.RemoteAddress) != s.Source || h.RemotePort == nil || *h.RemotePort != h.LocalPort) {
					if h == nil {
						t.Errorf("%s: no answer to the request before the upgrade", what)
					} else {
						t.Errorf("%s: the request before the upgrade (client port %d): status %d, req.socket.remoteAddress %s port %s",
							what, h.LocalPort, h.Status, strOrUndef(h.RemoteAddress), intOrUndef(h.RemotePort))
					}
				}
			}
			for _, m := range modes {
				if want := 2 * len(sources); seen[m] != want {
					t.Errorf("%d %s sessions reported, want %d", seen[m], m, want)
				}
			}
			if len(workers) != 2 {
				t.Errorf("sessions reached workers %v, want both", workers)
			}
			if want := 3 * 2 * len(sources); len(res.HTTP) != want {
				t.Errorf("%d plain requests answered, want %d", len(res.HTTP), want)
			}
			for _, h := range res.HTTP {
				if h.Status != 200 || strOrUndef(h.RemoteAddress) != h.Source || strOrUndef(h.Connection) != h.Source ||
					h.RemotePort == nil || *h.RemotePort != h.LocalPort || strOrUndef(h.RemoteFamily) != "IPv4" || h.Field {
					t.Errorf("GET /addr from %s:%d (forged %v): status %d, req.socket.remoteAddress %s port %s family %s, req.connection %s, field visible %v",
						h.Source, h.LocalPort, h.Forged, h.Status, strOrUndef(h.RemoteAddress), intOrUndef(h.RemotePort), strOrUndef(h.RemoteFamily),
						strOrUndef(h.Connection), h.Field)
				}
			}
			// Each way to a worker was taken: polling proxied, WebSockets handed off and tunnelled.
			mf := sioScrape(t, d)
			for _, result := range []string{"proxied", "handed_off", "tunneled"} {
				if n := sioSum(mf, "stickyd_connections_accepted_total", map[string]string{"result": result}); n == 0 {
					t.Errorf("stickyd_connections_accepted_total{result=%q} is 0: that path was not tested", result)
				}
			}
			if t.Failed() {
				t.Logf("clientaddr-clients.js: %s", raw)
			}
		})
	}
}

// TestNodeAppClientAddressBehindTrustedProxy: with -trusted-proxies, a request from a trusted
// proxy shows the client it names in X-Forwarded-For (remotePort undefined: the proxy does
// not say the client's port); the same claim from any other peer is ignored.
func TestNodeAppClientAddressBehindTrustedProxy(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "2", "-shutdown-timeout", "2s", "-trusted-proxies", "127.0.0.5/32",
		"--", "node", "clientaddr-app.js")
	sioWaitWorkers(t, d, 2, 60*time.Second)
	for _, tc := range []struct {
		from, want string
		port       bool // remotePort is the peer's own port
	}{
		{"127.0.0.5", "203.0.113.9", false},
		{"127.0.0.6", "127.0.0.6", true},
	} {
		dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(tc.from)}, Timeout: 10 * time.Second}
		var local int
		client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dialer.DialContext(ctx, network, addr)
				if err == nil {
					local = c.LocalAddr().(*net.TCPAddr).Port
				}
				return c, err
			},
		}}
		req, _ := http.NewRequest("GET", "http://"+d.addr+"/addr", nil)
		req.Header.Set("X-Forwarded-For", "203.0.113.9")
		req.Header.Set("X-Stickyd-Client-Addr", "6.6.6.6:1")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			RemoteAddress *string
			RemotePort    *int
			RemoteFamily  *string
			Field         bool
		}
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		client.CloseIdleConnections()
		if err != nil {
			t.Fatalf("GET /addr from %s: %d, %v", tc.from, resp.StatusCode, err)
		}
		portOK := got.RemotePort == nil
		if tc.port {
			portOK = got.RemotePort != nil && *got.RemotePort == local
		}
		if strOrUndef(got.RemoteAddress) != tc.want || !portOK || strOrUndef(got.RemoteFamily) != "IPv4" || got.Field {
			t.Errorf("GET /addr from %s:%d with X-Forwarded-For: 203.0.113.9: the app saw %s port %s family %s (field visible %v); want %s, port %v",
				tc.from, local, strOrUndef(got.RemoteAddress), intOrUndef(got.RemotePort), strOrUndef(got.RemoteFamily), got.Field, tc.want,
				map[bool]string{true: "its own", false: "undefined"}[tc.port])
		}
	}
}
