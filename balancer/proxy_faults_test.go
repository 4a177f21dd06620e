//go:build unix

package balancer

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// rawRequest sends req on a new connection and reads one response.
func rawRequest(t *testing.T, addr, req string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(req, " ")
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%q: %v", firstLine([]byte(req)), err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(body)
}

func get(path, req string) string {
	return "GET " + path + " HTTP/1.1\r\nHost: x\r\nX-Req: " + req + "\r\n\r\n"
}

func protocolErrors(e *testEdge) float64 {
	return counterValue(e.b.m.WorkerProtocolErrs.WithLabelValues("0", metrics.ProtoUnsolicited))
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	waitFor(t, filepath.Base(path), 5*time.Second, func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
}

// TestWorkerExtraBytesNeverReachAnotherClient: whatever a worker writes after the end of
// a response goes nowhere — the next request, from another client, on the same pooled
// worker connection, gets its own answer, and the connection is counted and closed.
func TestWorkerExtraBytesNeverReachAnotherClient(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{}, 1, "rogue:"+dir)
	cases := []struct{ name, req string }{
		{"bytes past Content-Length", get("/extra", "A")},
		{"a body on a 204", get("/204", "A")},
		{"a body on a HEAD answer", "HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n"},
		{"a late unsolicited response", get("/late", "A")},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := protocolErrors(e)
			resp, body := rawRequest(t, e.addr, tc.req)
			if strings.Contains(body, "LEAKED") || resp.StatusCode >= 500 {
				t.Fatalf("the misbehaving request's own answer: %d %q", resp.StatusCode, body)
			}
			// The extra bytes are in the edge's socket now (a socketpair write is
			// synchronous). Bytes arriving after the edge picked the connection for the
			// next request cannot be told from its answer: HTTP/1.1 has no request ids.
			mark := filepath.Join(dir, rogueMarkLate+"-0")
			waitFile(t, mark)
			os.Remove(mark)
			// Another client now; on the worker connection the first one used.
			req := fmt.Sprintf("B%d", i)
			resp, body = rawRequest(t, e.addr, get("/whoami", req))
			if resp.StatusCode != 200 || !strings.Contains(body, "req="+req+" ") || strings.Contains(body, "LEAKED") {
				t.Fatalf("the next client got %d %q (cookie %q), want its own answer", resp.StatusCode, body, resp.Header.Get("Set-Cookie"))
			}
			if ck := resp.Header.Get("Set-Cookie"); ck != "owner="+req {
				t.Fatalf("the next client got cookie %q, want owner=%s", ck, req)
			}
			waitFor(t, "the protocol error to be counted", 5*time.Second, func() bool { return protocolErrors(e) > before })
		})
	}
}

// TestPOSTThatKillsItsWorkerIsNotReplayed: a non-idempotent request whose worker died
// with it gets 502; it is not carried on to kill the next worker.
func TestPOSTThatKillsItsWorkerIsNotReplayed(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{}, 2, "rogue:"+dir, "rogue:"+dir)
	before := e.sup.Pids()
	resp, _ := rawRequest(t, e.addr, "POST /die HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
	if resp.StatusCode != 502 {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
	died := 0
	for slot := range 2 {
		if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("%s-%d", rogueMarkDying, slot))); err == nil {
			died++
		}
	}
	if died != 1 {
		t.Fatalf("%d workers got the POST, want 1 (before: %v, now: %v)", died, before, e.sup.Pids())
	}
}

// TestGETIsRetriedWhenItsWorkerDiesBeforeAnswering: an idempotent request whose worker
// vanished without a byte of answer goes to another worker once.
func TestGETIsRetriedWhenItsWorkerDiesBeforeAnswering(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-Req"}}}}, 2, "rogue:"+dir, "echo")
	// Find an identity that maps to the rogue worker (slot 0), then make it die there.
	var key string
	for i := 0; i < 100 && key == ""; i++ {
		_, body := rawRequest(t, e.addr, get("/whoami", fmt.Sprint("k", i)))
		if strings.HasPrefix(body, "worker=0 ") {
			key = fmt.Sprint("k", i)
		}
	}
	if key == "" {
		t.Fatal("no identity maps to slot 0")
	}
	resp, body := rawRequest(t, e.addr, get("/die", key))
	// The echo worker has no /die: its 404 is the proof the request went there.
	if resp.StatusCode != 404 || !strings.Contains(body, "404 page not found") {
		t.Fatalf("got %d %q, want worker 1's 404", resp.StatusCode, body)
	}
}

// TestHungWorkerGets504AndLosesNewSessions: a worker that never answers costs its
// client ResponseTimeout and a 504, and takes no new sessions for a while.
func TestHungWorkerGets504AndLosesNewSessions(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{ResponseTimeout: 500 * time.Millisecond,
		Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-Req"}}}}, 2, "rogue:"+dir, "rogue:"+dir)
	resp, body := rawRequest(t, e.addr, get("/hang", "h"))
	if resp.StatusCode != 504 {
		t.Fatalf("status %d %q, want 504", resp.StatusCode, body)
	}
	var hung *workers.Worker
	for _, w := range e.b.Workers() {
		if !w.TakesNew(time.Now()) {
			hung = w
		}
	}
	if hung == nil {
		t.Fatal("the hung worker still takes new sessions")
	}
	// New identities go to the other worker meanwhile.
	for i := range 8 {
		_, body := rawRequest(t, e.addr, get("/whoami", fmt.Sprint("n", i)))
		if strings.HasPrefix(body, fmt.Sprintf("worker=%d ", hung.Slot)) {
			t.Fatalf("a new session went to the hung worker: %q", body)
		}
	}
}

// TestClientThatLeavesFreesItsRequest: a client that closes while its request waits for
// the worker is noticed; the edge lets go of both connections.
func TestClientThatLeavesFreesItsRequest(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{}, 1, "rogue:"+dir)
	e.settle(t)
	baseSet := fdSet()
	gone := counterValue(e.b.m.Rejections.WithLabelValues(metrics.RejectClientGone))
	for range 5 {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, get("/hang", "x"))
		e.waitForExchange(t)
		c.Close()
	}
	e.settle(t)
	if n := counterValue(e.b.m.Rejections.WithLabelValues(metrics.RejectClientGone)) - gone; n != 5 {
		t.Fatalf("client_gone counted %v times, want 5", n)
	}
	waitForFDs(t, 0, baseSet)
}

// TestStuckChannelWorkerIsSkippedOnTheProxyPath: a worker that stopped reading its
// channel (its connections queue and are never served) costs one request a 504; from
// then on new sessions go to the other worker.
func TestStuckChannelWorkerIsSkippedOnTheProxyPath(t *testing.T) {
	e := startEdge(t, Config{HandoffTimeout: 300 * time.Millisecond, ResponseTimeout: 500 * time.Millisecond,
		Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-Req"}}}}, 2, "stuck", "echo")
	failed := 0
	for i := range 40 {
		resp, body := rawRequest(t, e.addr, get("/whoami", fmt.Sprint("s", i)))
		if resp.StatusCode == 200 && strings.Contains(body, `"worker":"1"`) {
			continue
		}
		if failed++; failed > 1 || (resp.StatusCode != 504 && resp.StatusCode != 502) {
			t.Fatalf("request %d: %d %q: the stuck worker kept getting new sessions", i, resp.StatusCode, body)
		}
	}
}

// TestForwardingFieldsFromUntrustedClientsAreReplaced: a client's own X-Forwarded-For,
// X-Forwarded-Proto and Forwarded do not reach the worker; a trusted proxy's do.
func TestForwardingFieldsFromUntrustedClientsAreReplaced(t *testing.T) {
	dir := t.TempDir()
	lie := "GET /whoami HTTP/1.1\r\nHost: x\r\nX-Req: r\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n" +
		"X-Stickyd-Client-Addr: 6.6.6.6:1\r\n\r\n"
	t.Run("untrusted", func(t *testing.T) {
		e := startEdge(t, Config{}, 1, "rogue:"+dir)
		_, body := rawRequest(t, e.addr, lie)
		if !strings.Contains(body, " xff=127.0.0.1 xfp=http fwd=for=127.0.0.1;proto=http ") || !strings.Contains(body, " client=127.0.0.1:") || strings.Contains(body, "6.6.6.6") {
			t.Fatalf("worker saw %q", body)
		}
	})
	t.Run("trusted", func(t *testing.T) {
		trusted, _ := sticky.ParsePrefixes("127.0.0.0/8")
		e := startEdge(t, Config{Rules: sticky.Rules{TrustedProxies: trusted}}, 1, "rogue:"+dir)
		_, body := rawRequest(t, e.addr, lie)
		if !strings.Contains(body, " xff=6.6.6.6, 127.0.0.1 xfp=https fwd=for=6.6.6.6, for=127.0.0.1;proto=http ") || !strings.HasSuffix(body, " client=6.6.6.6:0") {
			t.Fatalf("worker saw %q", body)
		}
	})
}

// TestExpectContinueIsAnsweredByTheEdge: a client that waits for 100 Continue gets it
// from the edge at once.
func TestExpectContinueIsAnsweredByTheEdge(t *testing.T) {
	dir := t.TempDir()
	e := startEdge(t, Config{}, 1, "rogue:"+dir)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "POST /whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("got %q %v before sending the body, want 100 Continue", line, err)
	}
	br.ReadString('\n')
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(body), "expect=") || strings.Contains(string(body), "expect=100") {
		t.Fatalf("%d %q: the worker must get the body without the expectation", resp.StatusCode, body)
	}
}

// TestUnknownSessionAnswers: HEAD gets the 400 without a body, a WebSocket upgrade gets
// the 400 instead of a reset.
func TestUnknownSessionAnswers(t *testing.T) {
	e := startEdge(t, Config{}, 1)
	resp, body := rawRequest(t, e.addr, "HEAD /socket.io/?EIO=4&transport=polling&sid=nope HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp.StatusCode != 400 || body != "" {
		t.Fatalf("HEAD: %d %q", resp.StatusCode, body)
	}
	resp, body = rawRequest(t, e.addr, "GET /socket.io/?EIO=4&transport=websocket&sid=nope HTTP/1.1\r\nHost: x\r\n"+
		"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	if resp.StatusCode != 400 || !strings.Contains(body, "Session ID unknown") {
		t.Fatalf("upgrade: %d %q", resp.StatusCode, body)
	}
}

// TestHandshakeOnlyOnTheEngineIOPath: an EIO query elsewhere belongs to the app.
func TestHandshakeOnlyOnTheEngineIOPath(t *testing.T) {
	for _, tc := range []struct {
		path, target string
		want         bool
	}{
		{"", "/socket.io/?EIO=4&transport=polling", true},
		{"", "/socket.io?EIO=4&transport=polling", true},
		{"", "/elsewhere/?EIO=4&transport=polling", false},
		{"", "/socket.io/?EIO=4&transport=polling&sid=abc", false},
		{"/ws/", "/ws/?EIO=4&transport=polling", true},
		{"/ws/", "/socket.io/?EIO=4&transport=polling", false},
	} {
		b := New(Config{EngineIOPath: tc.path})
		var h upgrade.Head
		if err := upgrade.ParseInto(&h, []byte("GET "+tc.target+" HTTP/1.1\r\nHost: x\r\n\r\n"), 4096); err != nil {
			t.Fatal(err)
		}
		if got := b.isHandshake(&h); got != tc.want {
			t.Errorf("path %q, %s: handshake %v, want %v", tc.path, tc.target, got, tc.want)
		}
		b.Shutdown(context.Background())
	}
}

// TestFreezeTakesLongPollsAlong: an edge upgrade does not wait for a long-poll in
// flight: Freeze parks it, and the request is answered whether the upgrade goes on
// (another edge adopts it) or fails (this edge resumes it); the client's connection
// then carries its next request.
func TestFreezeTakesLongPollsAlong(t *testing.T) {
	e := startEdge(t, Config{}, 1)
	longPoll := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		io.WriteString(c, "GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
		e.waitForExchange(t)
		return c, bufio.NewReader(c)
	}
	answered := func(c net.Conn, br *bufio.Reader) {
		t.Helper()
		for _, path := range []string{"", "/whoami"} {
			if path != "" {
				io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n")
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("after the freeze: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 || (path == "" && !strings.HasPrefix(string(body), "slow")) {
				t.Fatalf("after the freeze: %d %q", resp.StatusCode, body)
			}
		}
	}

	t.Run("failed upgrade", func(t *testing.T) {
		c, br := longPoll()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		lns, _, xs, err := e.b.Freeze(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(xs) != 1 || len(lns) != 1 {
			t.Fatalf("froze with %d exchanges and %d listeners, want 1 and 1", len(xs), len(lns))
		}
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := br.Peek(1); err == nil {
			t.Fatal("the long-poll was answered before it ended: Freeze waited for it")
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		e.b.Thaw()
		answered(c, br)
	})

	t.Run("adopted by the next edge", func(t *testing.T) {
		c, br := longPoll()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, conns, xs, err := e.b.Freeze(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// The next image: another Balancer with the same worker, adopting duplicates of
		// the descriptors (as execve would carry them over).
		next := New(Config{Logger: e.b.log})
		defer next.Shutdown(context.Background())
		for _, w := range e.b.Workers() {
			next.AddWorker(w)
		}
		for i := range xs {
			xs[i].Client.FD = dupFD(t, xs[i].Client.FD)
			xs[i].Worker = dupFD(t, xs[i].Worker)
		}
		for i := range conns {
			conns[i].FD = dupFD(t, conns[i].FD)
		}
		next.Adopt(conns, xs)
		answered(c, br)
		// This image ends here as an exec would end it: its copies close, nothing resumes.
		e.b.mu.Lock()
		for _, px := range e.b.parkedX {
			px.c.Close()
			px.vc.Close()
		}
		for _, pc := range e.b.parked {
			pc.Close()
		}
		e.b.parked, e.b.parkedX, e.b.handed, e.b.handedX = nil, nil, nil, nil
		e.b.mu.Unlock()
		e.b.Thaw()
	})
}

func dupFD(t *testing.T, fd int) int {
	t.Helper()
	n, err := syscall.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	syscall.CloseOnExec(n)
	return n
}

// TestFailedFreezeLeavesAWorkingEdge: a freeze that times out (a request body still
// arriving) thaws at once, and the next one can succeed.
func TestFailedFreezeLeavesAWorkingEdge(t *testing.T) {
	e := startEdge(t, Config{}, 1)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A streaming body that has not ended keeps its request in flight.
	io.WriteString(c, "POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
	waitFor(t, "the request to be in flight", 5*time.Second, func() bool {
		e.b.mu.Lock()
		defer e.b.mu.Unlock()
		for cc := range e.b.conns {
			if cc.state.Load() == connActive {
				return true
			}
		}
		return false
	})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, _, _, err = e.b.Freeze(ctx)
	cancel()
	if err == nil {
		t.Fatal("Freeze succeeded with a body in flight")
	}
	// Serving again: a new client is answered, and the streaming request completes.
	if resp, _ := rawRequest(t, e.addr, get("/whoami", "after")); resp.StatusCode != 200 {
		t.Fatalf("after a failed freeze: %d", resp.StatusCode)
	}
	io.WriteString(c, "0\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if string(body) != "hello" {
		t.Fatalf("body %q", body)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, _, _, err := e.b.Freeze(ctx); err != nil {
		t.Fatalf("the next freeze: %v", err)
	}
	e.b.Thaw()
}

// TestAffinityFloodKeepsSessions: keys any client can mint (here header values) have a
// budget of their own; flooding it does not evict learned engine.io sessions.
func TestAffinityFloodKeepsSessions(t *testing.T) {
	srcs, err := sticky.ParseSources("sid,header:X-Req")
	if err != nil {
		t.Fatal(err)
	}
	e := startEdge(t, Config{MaxSessions: 10, MaxAffinity: 10, Rules: sticky.Rules{Sources: srcs}}, 2)
	_, body := rawRequest(t, e.addr, "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
	_, rest, ok := strings.Cut(body, `"sid":"`)
	sid, _, _ := strings.Cut(rest, `"`)
	if !ok || sid == "" {
		t.Fatalf("handshake answer %q", body)
	}
	for i := range 50 {
		rawRequest(t, e.addr, get("/whoami", fmt.Sprint("flood", i)))
	}
	resp, body := rawRequest(t, e.addr, "GET /socket.io/?EIO=4&transport=polling&sid="+sid+" HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp.StatusCode != 200 {
		t.Fatalf("the session after the flood: %d %q", resp.StatusCode, body)
	}
	if n := e.b.Affinity().Len(); n > 10 {
		t.Fatalf("%d affinity entries, over the budget of 10", n)
	}
}

// waitForExchange waits until a proxied request of the edge waits for its worker's answer.
func (e *testEdge) waitForExchange(t *testing.T) {
	t.Helper()
	waitFor(t, "a request to wait for its worker's answer", 5*time.Second, func() bool {
		e.b.mu.Lock()
		defer e.b.mu.Unlock()
		for cc := range e.b.conns {
			if cc.waiting.Load() != nil {
				return true
			}
		}
		return false
	})
}

// fakeAddrConn is a net.Conn that only has a remote address (for admission tests).
type fakeAddrConn struct {
	net.Conn
	remote net.Addr
}

func (c fakeAddrConn) RemoteAddr() net.Addr { return c.remote }

// TestPerIPLimitCountsAnIPv6Slash64AsOneClient: one IPv6 client owns a /64; counting its
// addresses one by one would make -max-conns-per-ip meaningless.
func TestPerIPLimitCountsAnIPv6Slash64AsOneClient(t *testing.T) {
	b := New(Config{MaxConnsPerIP: 2})
	defer b.Shutdown(context.Background())
	var admitted []*clientConn
	defer func() {
		for _, cc := range admitted {
			b.untrack(cc)
		}
	}()
	admit := func(ip string) int {
		cc := &clientConn{c: fakeAddrConn{remote: &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}}}
		r := b.track(cc)
		if r == trackOK {
			admitted = append(admitted, cc)
		}
		return r
	}
	for i, tc := range []struct {
		ip   string
		want int
	}{
		{"2001:db8:1:1::1", trackOK},
		{"2001:db8:1:1::2", trackOK},
		{"2001:db8:1:1:ffff::3", trackPerIP}, // same /64
		{"2001:db8:1:2::1", trackOK},         // another /64
		{"192.0.2.1", trackOK},
		{"192.0.2.2", trackOK}, // IPv4 addresses count one by one
	} {
		if got := admit(tc.ip); got != tc.want {
			t.Errorf("%d: %s admitted as %d, want %d", i, tc.ip, got, tc.want)
		}
	}
	if got := statusText(429); got != "Too Many Requests" {
		t.Errorf("429 reason phrase %q", got)
	}
}
