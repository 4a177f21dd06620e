//go:build unix

package balancer

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

const (
	testAffinityCookie = "stickyd_node"
	testSIDHeader      = "X-Stickyd-Sid"
)

// exchangeOn sends one request on a kept-alive client connection and reads its answer.
func exchangeOn(t *testing.T, c net.Conn, br *bufio.Reader, req string) (*http.Response, string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatalf("%q: %v", firstLine([]byte(req)), err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(body)
}

const handshakeReq = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: front\r\n\r\n"

// TestAffinityHintsOnHandshake: a handshake answer carries the sid header (equal to the
// open packet's sid) and the node cookie with its attributes; the session's later
// requests and other paths carry neither, and every handshake on one keep-alive
// connection gets its own.
func TestAffinityHintsOnHandshake(t *testing.T) {
	e := startEdge(t, Config{NodeID: "h2", AffinityCookie: testAffinityCookie, SIDHeader: testSIDHeader}, 2)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := range 3 {
		resp, body := exchangeOn(t, c, br, handshakeReq)
		sid, ok := upgrade.OpenPacketSID([]byte(body))
		if resp.StatusCode != 200 || !ok {
			t.Fatalf("handshake %d: %d %q", i, resp.StatusCode, body)
		}
		if got := resp.Header.Values(testSIDHeader); len(got) != 1 || got[0] != sid {
			t.Errorf("handshake %d: %s %q, want [%q]", i, testSIDHeader, got, sid)
		}
		want := testAffinityCookie + "=h2; Path=/; HttpOnly; SameSite=Lax"
		if got := resp.Header.Values("Set-Cookie"); len(got) != 1 || got[0] != want {
			t.Errorf("handshake %d: Set-Cookie %q, want [%q]", i, got, want)
		}
		poll, pbody := exchangeOn(t, c, br, "GET /socket.io/?EIO=4&transport=polling&sid="+sid+" HTTP/1.1\r\nHost: front\r\n\r\n")
		if poll.StatusCode != 200 || !strings.HasPrefix(pbody, "6:worker") {
			t.Fatalf("poll %d: %d %q", i, poll.StatusCode, pbody)
		}
		if poll.Header.Get(testSIDHeader) != "" || poll.Header.Get("Set-Cookie") != "" {
			t.Errorf("poll %d carries hints: %v", i, poll.Header)
		}
	}
	other, _ := exchangeOn(t, c, br, "GET /whoami HTTP/1.1\r\nHost: front\r\n\r\n")
	if other.Header.Get(testSIDHeader) != "" || other.Header.Get("Set-Cookie") != "" {
		t.Errorf("non-engine.io answer carries hints: %v", other.Header)
	}
}

// TestAffinityHintsOffByDefault: without the settings no answer changes.
func TestAffinityHintsOffByDefault(t *testing.T) {
	e := startEdge(t, Config{}, 1)
	resp, body := rawRequest(t, e.addr, handshakeReq)
	if _, ok := upgrade.OpenPacketSID([]byte(body)); !ok {
		t.Fatalf("handshake: %q", body)
	}
	if len(resp.Header.Values("Set-Cookie")) != 0 || resp.Header.Get(testSIDHeader) != "" {
		t.Fatalf("hints without settings: %v", resp.Header)
	}
}

// TestAffinityCookieSecure: the cookie is Secure only when a trusted proxy says the
// client came over https; a client's own X-Forwarded-Proto is not believed.
func TestAffinityCookieSecure(t *testing.T) {
	loopback, _ := sticky.ParsePrefixes("127.0.0.0/8")
	hs := func(extra string) string {
		return "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: front\r\n" + extra + "\r\n"
	}
	cases := []struct {
		name    string
		trusted bool
		fields  string
		secure  bool
	}{
		{"untrusted client claims https", false, "X-Forwarded-Proto: https\r\n", false},
		{"trusted https", true, "X-Forwarded-Proto: https\r\n", true},
		{"trusted https chain", true, "X-Forwarded-Proto: https, http\r\n", true},
		{"trusted http", true, "X-Forwarded-Proto: http\r\n", false},
		{"trusted Forwarded proto=https", true, "Forwarded: for=192.0.2.1;proto=https\r\n", true},
		{"trusted without a claim", true, "", false},
	}
	edges := map[bool]*testEdge{}
	outer := t // the edges live for the whole test, not one subtest
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := edges[tc.trusted]
			if e == nil {
				cfg := Config{NodeID: "h1", AffinityCookie: testAffinityCookie}
				if tc.trusted {
					cfg.Rules.TrustedProxies = loopback
				}
				e = startEdge(outer, cfg, 1)
				edges[tc.trusted] = e
			}
			resp, _ := rawRequest(t, e.addr, hs(tc.fields))
			ck := resp.Header.Get("Set-Cookie")
			if !strings.HasPrefix(ck, testAffinityCookie+"=h1; ") {
				t.Fatalf("Set-Cookie %q", ck)
			}
			if got := strings.HasSuffix(ck, "; Secure"); got != tc.secure {
				t.Fatalf("Set-Cookie %q: Secure %v, want %v", ck, got, tc.secure)
			}
		})
	}
}

// TestAffinityCookieSecureOverTLS: when the edge itself terminates TLS the cookie is
// Secure, with no forwarding field at all.
func TestAffinityCookieSecureOverTLS(t *testing.T) {
	ca := newTestCA(t)
	pair := ca.issue(t, t.TempDir(), "edge", time.Now().Add(time.Hour), "localhost")
	cert, err := tls.LoadX509KeyPair(pair.CertFile, pair.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	e := startEdge(t, Config{NodeID: "h1", AffinityCookie: testAffinityCookie}, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go e.b.ServeTLS(ln, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(),
		&tls.Config{ServerName: "localhost", RootCAs: ca.pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, _ := exchangeOn(t, c, bufio.NewReader(c), handshakeReq)
	if want := testAffinityCookie + "=h1; Path=/; HttpOnly; SameSite=Lax; Secure"; resp.Header.Get("Set-Cookie") != want {
		t.Fatalf("Set-Cookie over TLS %q, want %q", resp.Header.Get("Set-Cookie"), want)
	}
}

// TestAffinitySettingsChecked: names that would split a response head or a node id a
// browser would not store are refused by CheckAffinity and disabled by New; an empty
// node id becomes the host name.
func TestAffinitySettingsChecked(t *testing.T) {
	bad := []Config{
		{AffinityCookie: "a b"},
		{AffinityCookie: "a=b"},
		{SIDHeader: "X-Sid\r\nSet-Cookie: x=y"},
		{SIDHeader: "X-Sid:"},
		{AffinityCookie: "n", NodeID: "h;1"},
		{AffinityCookie: "n", NodeID: strings.Repeat("h", maxNodeIDLen+1)},
	}
	for _, cfg := range bad {
		if err := cfg.CheckAffinity(); !errors.Is(err, ErrAffinityConfig) {
			t.Errorf("%+v: CheckAffinity %v, want ErrAffinityConfig", cfg, err)
		}
	}
	good := Config{AffinityCookie: "stickyd_node", SIDHeader: "X-Stickyd-Sid", NodeID: "pod-7f9c.eu_1"}
	if err := good.CheckAffinity(); err != nil {
		t.Errorf("CheckAffinity(%+v): %v", good, err)
	}

	e := startEdge(t, Config{AffinityCookie: "bad name", SIDHeader: testSIDHeader}, 1)
	resp, _ := rawRequest(t, e.addr, handshakeReq)
	if len(resp.Header.Values("Set-Cookie")) != 0 || resp.Header.Get(testSIDHeader) != "" {
		t.Fatalf("hints sent despite an invalid setting: %v", resp.Header)
	}

	e = startEdge(t, Config{AffinityCookie: testAffinityCookie}, 1)
	resp, _ = rawRequest(t, e.addr, handshakeReq)
	if want := testAffinityCookie + "=" + DefaultNodeID() + ";"; !strings.HasPrefix(resp.Header.Get("Set-Cookie"), want) {
		t.Fatalf("Set-Cookie %q, want the host name (%q…)", resp.Header.Get("Set-Cookie"), want)
	}
}
