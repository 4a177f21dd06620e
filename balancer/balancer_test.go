//go:build unix

package balancer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
)

type testEdge struct {
	b    *Balancer
	sup  *workers.Supervisor
	addr string
	stop func()
}

// startEdge runs an in-process edge on a loopback port with n real worker processes
// (this test binary in worker mode). modes[i] selects worker i's mode (default "echo").
func startEdge(t testing.TB, cfg Config, n int, modes ...string) *testEdge {
	t.Helper()
	return startEdgeWith(t, cfg, n, nil, modes...)
}

// startEdgeWith is startEdge with more, set on the default pool's supervisor before it
// runs (named pools, for instance).
func startEdgeWith(t testing.TB, cfg Config, n int, more func(b *Balancer, sup *workers.Supervisor), modes ...string) *testEdge {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	b := New(cfg)
	lns, err := ListenConfig{DeferAccept: true}.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := lns[0]
	self, _ := os.Executable()
	sup := &workers.Supervisor{
		Edge:         b,
		Command:      []string{self},
		Workers:      n,
		SpawnTimeout: 10 * time.Second,
		GracePeriod:  5 * time.Second,
		Stdout:       testWriter{t},
		Stderr:       testWriter{t},
	}
	// Each slot's mode travels in its environment; slots take modes in order.
	sup.Env = []string{workerEnv + "=echo"}
	if len(modes) > 0 {
		sup.SlotEnv = func(slot int) []string {
			if slot < len(modes) && modes[slot] != "" {
				return []string{workerEnv + "=" + modes[slot]}
			}
			return nil
		}
	}
	if more != nil {
		more(b, sup)
	}
	ctx, cancel := context.WithCancel(context.Background())
	supDone := make(chan struct{})
	go func() { sup.Run(ctx); close(supDone) }()
	select {
	case <-sup.Ready():
	case <-time.After(15 * time.Second):
		t.Fatal("workers not ready")
	}
	serveDone := make(chan struct{})
	go func() { b.Serve(ln); close(serveDone) }()
	if !cfg.NoFastPath {
		// Serve duplicates the listener's descriptor for the fast path: wait for it, or
		// an fd baseline taken now would count it as a leak.
		deadline := time.Now().Add(5 * time.Second)
		for {
			b.mu.Lock()
			n := len(b.rawLns)
			b.mu.Unlock()
			if n > 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	e := &testEdge{b: b, sup: sup, addr: ln.Addr().String()}
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer scancel()
			b.Shutdown(sctx)
			<-serveDone
			cancel()
			<-supDone
		})
	}
	t.Cleanup(e.stop)
	return e
}

// settle waits until the edge holds no client connection: a handoff on the general path
// closes the edge's copy after the worker already answers the client, so a baseline
// taken straight after a dial could still count it.
func (e *testEdge) settle(t *testing.T) {
	t.Helper()
	waitFor(t, "the edge to let go of every client connection", 5*time.Second, func() bool {
		e.b.mu.Lock()
		defer e.b.mu.Unlock()
		return len(e.b.conns) == 0
	})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	defer func() { recover() }() // output after the test ended is dropped
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func openFDs(t testing.TB) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es) - 1
}

// waitFor polls cond until it holds or the deadline passes. It is for quantities the
// kernel and runtime settle asynchronously (fd counts, goroutines), which have no signal.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type hello struct {
	Worker string `json:"worker"`
	PID    int    `json:"pid"`
	Remote string `json:"remote"`
}

func dialWS(t *testing.T, addr string, hdr http.Header) (*websocket.Conn, hello) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	c, resp, err := d.Dial("ws://"+addr+"/ws", hdr)
	if err != nil {
		status := ""
		if resp != nil {
			status = resp.Status
		}
		t.Fatalf("dial: %v %s", err, status)
	}
	var h hello
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := c.ReadJSON(&h); err != nil {
		t.Fatalf("hello: %v", err)
	}
	return c, h
}

func echoOnce(t *testing.T, c *websocket.Conn, msg string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	_, got, err := c.ReadMessage()
	if err != nil || string(got) != msg {
		t.Fatalf("echo: %q, %v; want %q", got, err, msg)
	}
}

func TestWebSocketLivesInTheWorker(t *testing.T) {
	e := startEdge(t, Config{}, 2)
	// Warm up: the first connection creates pools and runtime fds.
	c0, _ := dialWS(t, e.addr, nil)
	c0.Close()
	e.settle(t)
	baseSet := fdSet()
	baseG := runtime.NumGoroutine()

	const n = 50
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		c, h := dialWS(t, e.addr, nil)
		if h.PID == os.Getpid() || h.PID == 0 {
			t.Fatalf("hello from pid %d: not a worker process", h.PID)
		}
		if !strings.HasPrefix(h.Remote, "127.0.0.1:") {
			t.Errorf("worker saw remote %q, want the client's real address", h.Remote)
		}
		conns[i] = c
	}
	// The test process holds the client ends (n fds); the edge must hold nothing more.
	waitForFDs(t, n, baseSet)
	waitFor(t, "edge goroutines back to baseline", 5*time.Second, func() bool { return runtime.NumGoroutine() <= baseG })
	for i, c := range conns {
		echoOnce(t, c, fmt.Sprintf("message %d", i))
	}
	// The edge can even stop accepting: handed-off WebSockets do not notice.
	for _, c := range conns {
		echoOnce(t, c, "still here")
		c.Close()
	}
}

func TestWebSocketStickyByIP(t *testing.T) {
	// Pinning by address is opt-in since issue 14 (-key sid,ip).
	e := startEdge(t, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindSID}, {Kind: sticky.KindIP}}}}, 4)
	_, first := dialWS(t, e.addr, nil)
	for range 10 {
		c, h := dialWS(t, e.addr, nil)
		if h.Worker != first.Worker {
			t.Fatalf("same client IP reached worker %s, then %s", first.Worker, h.Worker)
		}
		c.Close()
	}
}

func TestWebSocketStickyByHeaderSpreads(t *testing.T) {
	e := startEdge(t, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-User"}}}}, 4)
	seen := map[string]string{}
	workers := map[string]bool{}
	for round := range 2 {
		for u := range 40 {
			user := fmt.Sprint("user-", u)
			c, h := dialWS(t, e.addr, http.Header{"X-User": {user}})
			c.Close()
			if round == 0 {
				seen[user] = h.Worker
				workers[h.Worker] = true
			} else if seen[user] != h.Worker {
				t.Fatalf("%s moved from worker %s to %s", user, seen[user], h.Worker)
			}
		}
	}
	if len(workers) < 3 {
		t.Errorf("40 users landed on only %d of 4 workers", len(workers))
	}
}

func httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}, Timeout: 20 * time.Second}
}

func TestPlainHTTPIsProxiedPerRequest(t *testing.T) {
	e := startEdge(t, Config{}, 2)
	cl := httpClient()
	var who struct{ Worker, XFF string }
	resp, err := cl.Get("http://" + e.addr + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&who)
	resp.Body.Close()
	if who.XFF != "127.0.0.1" {
		t.Errorf("X-Forwarded-For at the worker = %q, want 127.0.0.1", who.XFF)
	}

	t.Run("10 MiB body streams both ways", func(t *testing.T) {
		body := bytes.Repeat([]byte("0123456789abcdef"), 10<<20/16)
		want := sha256.Sum256(body)
		resp, err := cl.Post("http://"+e.addr+"/echo-body", "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, _ := io.Copy(h, resp.Body)
		resp.Body.Close()
		if n != int64(len(body)) || !bytes.Equal(h.Sum(nil), want[:]) {
			t.Fatalf("echoed %d bytes, sha differs=%v", n, !bytes.Equal(h.Sum(nil), want[:]))
		}
	})
	t.Run("chunked request body", func(t *testing.T) {
		pr, pw := io.Pipe()
		go func() {
			for i := range 100 {
				fmt.Fprintf(pw, "chunk %03d\n", i)
			}
			pw.Close()
		}()
		req, _ := http.NewRequest("POST", "http://"+e.addr+"/echo-body", pr)
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if len(got) != 1000 || !strings.HasSuffix(string(got), "chunk 099\n") {
			t.Fatalf("got %d bytes: %q...", len(got), got[:min(40, len(got))])
		}
	})
	t.Run("worker closes, client keeps its connection", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		for i := range 3 {
			fmt.Fprintf(c, "GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("request %d on one client connection: %v", i, err)
			}
			io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.Close {
				t.Fatalf("request %d: the edge passed the worker's Connection: close to the client", i)
			}
		}
	})
}

// TestSessionsShareOneConnection sends the polling requests of several engine.io
// sessions, minted by different workers, over ONE client keep-alive connection: each
// must reach the worker that owns its sid.
func TestSessionsShareOneConnection(t *testing.T) {
	e := startEdge(t, Config{}, 4)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	get := func(path string) (int, string) {
		t.Helper()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	owners := map[string]string{} // sid -> worker
	for range 16 {
		code, body := get("/socket.io/?EIO=4&transport=polling")
		var open struct{ Sid string }
		if code != 200 || !strings.HasPrefix(body, "0{") || json.Unmarshal([]byte(body[1:]), &open) != nil {
			t.Fatalf("handshake: %d %q", code, body)
		}
		owners[open.Sid] = open.Sid[1:strings.Index(open.Sid, "s")]
	}
	workers := map[string]bool{}
	for _, w := range owners {
		workers[w] = true
	}
	if len(workers) < 2 {
		t.Fatalf("16 handshakes all landed on one worker; the test needs several")
	}
	for round := range 3 {
		for sid, w := range owners {
			code, body := get("/socket.io/?EIO=4&transport=polling&sid=" + sid)
			if code != 200 || body != "6:worker"+w {
				t.Fatalf("round %d sid %s (worker %s): %d %q", round, sid, w, code, body)
			}
		}
	}
	code, body := get("/socket.io/?EIO=4&transport=polling&sid=nosuchsession")
	if code != 400 || body != `{"code":1,"message":"Session ID unknown"}` {
		t.Fatalf("unknown sid: %d %q, want engine.io's 400", code, body)
	}
	// And the connection still works after that.
	if code, _ := get("/whoami"); code != 200 {
		t.Fatalf("after the unknown sid: %d", code)
	}
}

// hostile inputs: each gets a defined answer, and the edge keeps serving.
func TestHostileHeads(t *testing.T) {
	e := startEdge(t, Config{HeadTimeout: 300 * time.Millisecond}, 2)
	warm, _ := dialWS(t, e.addr, nil)
	warm.Close()
	e.settle(t)
	baseSet := fdSet()

	cases := []struct {
		name, in string
		want     string // status line prefix; "" means closed without an answer
	}{
		{"CL and TE", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.1 400"},
		{"duplicate CL", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 400"},
		{"duplicate Host", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "HTTP/1.1 400"},
		{"bare LF", "GET / HTTP/1.1\nHost: x\n\n", "HTTP/1.1 400"},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", "HTTP/1.1 400"},
		{"space before colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n", "HTTP/1.1 400"},
		{"oversize head", "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 20<<10) + "\r\n\r\n", "HTTP/1.1 431"},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.1 505"},
		{"bad version", "GET / HTTP/3.7\r\nHost: x\r\n\r\n", "HTTP/1.1 505"},
		{"CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "HTTP/1.1 405"},
		{"no Host", "GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400"},
		{"binary junk", "\x00\x01\x02\x03garbage\r\n\r\n", "HTTP/1.1 400"},
		{"TLS ClientHello", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", ""},
		{"partial head then silence", "GET / HTTP/1.1\r\nHost: x\r\n", "HTTP/1.1 408"},
		{"nothing at all", "", "HTTP/1.1 408"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", e.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, tc.in)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("read: %v (got %q)", err, got)
			}
			if !strings.HasPrefix(string(got), tc.want) || (tc.want == "" && len(got) != 0) {
				t.Fatalf("got %q, want a reply starting %q", firstLine(got), tc.want)
			}
		})
	}
	t.Run("one byte a second", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		go func() {
			for _, b := range []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n") {
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(c)
		if !strings.HasPrefix(string(got), "HTTP/1.1 408") {
			t.Fatalf("slow client got %q, want 408", firstLine(got))
		}
		if el := time.Since(start); el > 3*time.Second {
			t.Fatalf("the head deadline took %v", el)
		}
	})
	t.Run("client closes mid-head", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
		c.Close()
	})
	// The edge still serves, and holds no fd for any of the above.
	c, _ := dialWS(t, e.addr, nil)
	echoOnce(t, c, "after the hostile ones")
	c.Close()
	waitForFDs(t, 0, baseSet)
}

func firstLine(b []byte) string {
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

func TestWorkerCrashIsRemovedAndRestarted(t *testing.T) {
	e := startEdge(t, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-User"}}}}, 3)
	pids := e.sup.Pids()
	victim := pids[1]
	// Sessions on the other workers must survive.
	var survivors []*websocket.Conn
	for u := range 30 {
		c, h := dialWS(t, e.addr, http.Header{"X-User": {fmt.Sprint("u", u)}})
		if h.PID != victim {
			survivors = append(survivors, c)
		} else {
			defer c.Close()
		}
	}
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "slot 1 out of routing", 5*time.Second, func() bool {
		w := e.b.worker(1)
		return w == nil || w.PID != victim
	})
	// New clients succeed, and none reaches the dead worker.
	for u := range 30 {
		c, h := dialWS(t, e.addr, http.Header{"X-User": {fmt.Sprint("u", u)}})
		if h.PID == victim {
			t.Fatal("a client reached the killed worker")
		}
		echoOnce(t, c, "hi")
		c.Close()
	}
	for _, c := range survivors {
		echoOnce(t, c, "survived")
		c.Close()
	}
	waitFor(t, "slot 1 restarted", 10*time.Second, func() bool {
		p := e.sup.Pids()[1]
		return p != 0 && p != victim && e.b.worker(1) != nil
	})
}

func TestCrashDuringHandoffEndsInAClose(t *testing.T) {
	e := startEdge(t, Config{}, 1, "crash")
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	_, _, err := d.Dial("ws://"+e.addr+"/ws", nil)
	if err == nil {
		t.Fatal("handshake succeeded against a worker that crashed holding the connection")
	}
	// The supervisor brings a (crashing again) worker back; the edge stays up.
	waitFor(t, "restart", 10*time.Second, func() bool { return counterValue(e.b.m.WorkerRestarts.WithLabelValues("0")) > 0 })
}

func TestStuckWorkerDoesNotBlockTheEdge(t *testing.T) {
	e := startEdge(t, Config{
		HandoffTimeout: 200 * time.Millisecond,
		Rules:          sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindHeader, Name: "X-User"}}},
	}, 2, "stuck", "echo")
	hdr := func(i int) http.Header { return http.Header{"X-User": {fmt.Sprint(i)}} }
	// Phase 1: clients keep arriving; those routed to the stuck worker queue in its
	// channel until the channel is full, then the edge's handoffs time out.
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := websocket.Dialer{HandshakeTimeout: 3 * time.Second}
			if c, _, err := d.Dial("ws://"+e.addr+"/ws", hdr(i)); err == nil {
				c.Close()
			}
		}()
	}
	waitFor(t, "a handoff to the stuck worker to time out", 10*time.Second, func() bool {
		return counterValue(e.b.m.Handoffs.WithLabelValues("0", "timeout")) > 0
	})
	// Phase 2, while phase 1's unlucky clients still hang: the edge accepts and serves,
	// and new clients go to the healthy worker.
	for i := range 20 {
		c, h := dialWS(t, e.addr, hdr(100000+i))
		if h.Worker != "1" {
			t.Fatalf("hello from worker %s", h.Worker)
		}
		c.Close()
	}
	wg.Wait()
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	c.Write(&m)
	return m.GetCounter().GetValue()
}

// fdSet maps this process's descriptors to what they point at.
func fdSet() map[string]string {
	es, _ := os.ReadDir("/proc/self/fd")
	out := map[string]string{}
	for _, e := range es {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out[e.Name()] = l
	}
	return out
}

// waitForFDs waits until exactly extra descriptors are open that were not in the baseline
// base (fdSet); on failure it names the ones that appeared and disappeared, which says
// what leaked. Baseline descriptors that close meanwhile (a previous test's processes
// being reaped) do not count either way.
func waitForFDs(t *testing.T, extra int, base map[string]string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		now := fdSet()
		var added, gone []string
		for fd, l := range now {
			if base[fd] != l {
				added = append(added, fd+"="+l)
			}
		}
		if len(added) == extra {
			return
		}
		if time.Now().After(deadline) {
			for fd, l := range base {
				if now[fd] != l {
					gone = append(gone, fd+"="+l)
				}
			}
			t.Fatalf("fds: %d new since the baseline, want %d; new: %v; gone: %v", len(added), extra, added, gone)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLimits(t *testing.T) {
	e := startEdge(t, Config{
		MaxConns:      20,
		MaxConnsPerIP: 5,
		MaxBodyBytes:  1 << 20,
		BodyTimeout:   300 * time.Millisecond,
	}, 1)
	status := func(c net.Conn) string {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		return strings.TrimSpace(line)
	}
	t.Run("per-IP cap", func(t *testing.T) {
		var held []net.Conn
		for range 5 {
			c, err := net.Dial("tcp", e.addr)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		waitFor(t, "5 held connections", 5*time.Second, func() bool {
			e.b.mu.Lock()
			defer e.b.mu.Unlock()
			return len(e.b.conns) == 5
		})
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := status(c); !strings.HasPrefix(got, "HTTP/1.1 429") {
			t.Fatalf("6th connection from one IP: %q, want 429", got)
		}
		c.Close()
		// Another loopback address is another client.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
		c2, err := d.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c2, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
		if got := status(c2); got != "HTTP/1.1 200 OK" {
			t.Fatalf("other client: %q", got)
		}
		c2.Close()
		for _, c := range held {
			c.Close()
		}
		waitFor(t, "slots freed", 5*time.Second, func() bool {
			e.b.mu.Lock()
			defer e.b.mu.Unlock()
			return len(e.b.perIP) == 0
		})
	})
	t.Run("body too large", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 2<<20)
		if got := status(c); !strings.HasPrefix(got, "HTTP/1.1 413") {
			t.Fatalf("got %q, want 413", got)
		}
	})
	t.Run("chunked body too large", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			fmt.Fprintf(c, "POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
			chunk := strings.Repeat("x", 64<<10)
			for range 40 {
				if _, err := fmt.Fprintf(c, "%x\r\n%s\r\n", len(chunk), chunk); err != nil {
					return
				}
			}
			fmt.Fprintf(c, "0\r\n\r\n")
		}()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, _ := io.ReadAll(c)
		// The worker may have started answering before the limit was hit; either way
		// the edge must not deliver a complete echo of an over-limit body.
		if len(got) >= 40*64<<10 {
			t.Fatalf("over-limit chunked body was echoed whole (%d bytes)", len(got))
		}
	})
	t.Run("slow body", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
		start := time.Now()
		if got := status(c); !strings.HasPrefix(got, "HTTP/1.1 408") {
			t.Fatalf("got %q, want 408", got)
		}
		if el := time.Since(start); el > 3*time.Second {
			t.Fatalf("slow body held the connection %v", el)
		}
	})
	t.Run("connection cap", func(t *testing.T) {
		var held []net.Conn
		for i := range 20 {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(i+1))}}
			c, err := d.Dial("tcp", e.addr)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		waitFor(t, "20 held connections", 5*time.Second, func() bool {
			e.b.mu.Lock()
			defer e.b.mu.Unlock()
			return len(e.b.conns) == 20
		})
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 2, 1)}}
		c, err := d.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := status(c); !strings.HasPrefix(got, "HTTP/1.1 503") {
			t.Fatalf("connection over the cap: %q, want 503", got)
		}
		c.Close()
		for _, c := range held {
			c.Close()
		}
		// Below the cap again, the edge serves.
		waitFor(t, "connections released", 5*time.Second, func() bool {
			e.b.mu.Lock()
			defer e.b.mu.Unlock()
			return len(e.b.conns) == 0
		})
		cw, _ := dialWS(t, e.addr, nil)
		echoOnce(t, cw, "after the cap")
		cw.Close()
	})
}

// TestCookieIdentityLearnedFromSetCookie runs a Go worker with the engine.io stand-in
// keyed by cookie only: the edge learns cookie → worker from the handshake's Set-Cookie.
func TestCookieIdentityLearnedFromSetCookie(t *testing.T) {
	e := startEdge(t, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindCookie, Name: "io"}}}}, 4)
	cl := httpClient()
	for i := range 12 {
		resp, err := cl.Get("http://" + e.addr + "/socket.io/?EIO=4&transport=polling&cookie=1")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var open struct{ Sid string }
		json.Unmarshal(body[1:], &open)
		var cookie string
		for _, c := range resp.Cookies() {
			if c.Name == "io" {
				cookie = c.Value
			}
		}
		if cookie != open.Sid {
			t.Fatalf("handshake %d: cookie %q, sid %q", i, cookie, open.Sid)
		}
		owner := open.Sid[1:strings.Index(open.Sid, "s")]
		// Follow-ups carry only the cookie (no sid in the query): plain requests.
		for range 3 {
			req, _ := http.NewRequest("GET", "http://"+e.addr+"/whoami", nil)
			req.AddCookie(&http.Cookie{Name: "io", Value: cookie})
			resp, err := cl.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			var who struct{ Worker string }
			json.NewDecoder(resp.Body).Decode(&who)
			resp.Body.Close()
			if who.Worker != owner {
				t.Fatalf("cookie of worker %s's session reached worker %s", owner, who.Worker)
			}
		}
	}
}

func TestPipelinedAndHalfClosedClients(t *testing.T) {
	e := startEdge(t, Config{}, 2)
	t.Run("pipelined requests", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\nGET /slow?ms=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
		br := bufio.NewReader(c)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		for i, want := range []string{"{", "slow", "{"} {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("response %d: %v", i, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.HasPrefix(string(body), want) {
				t.Fatalf("response %d: %q, want it to start with %q (order kept)", i, body, want)
			}
		}
	})
	t.Run("half-closed after the request", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\n\r\n")
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("a client that half-closed after its request got no answer: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		if !strings.HasPrefix(string(body), "slow") {
			t.Fatalf("body %q", body)
		}
	})
	t.Run("WebSocket upgrade after plain requests on one connection", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		// The edge has consumed this connection's bytes; the worker gets them with the fd.
		io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
		resp, err = http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 101 {
			t.Fatalf("upgrade on a used connection: %v %v", resp, err)
		}
	})
	t.Run("non-HTTP bytes", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "SSH-2.0-OpenSSH_9.6\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(c)
		if !strings.HasPrefix(string(got), "HTTP/1.1 400") {
			t.Fatalf("got %q", firstLine(got))
		}
	})
	c, _ := dialWS(t, e.addr, nil)
	echoOnce(t, c, "still serving")
	c.Close()
}

func TestWorkerKilledDuringProxiedRequest(t *testing.T) {
	e := startEdge(t, Config{}, 1)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /slow?ms=10000 HTTP/1.1\r\nHost: x\r\n\r\n")
	// The request is in the worker once it holds a virtual connection from the edge.
	pid := e.sup.Pids()[0]
	waitFor(t, "the request to reach the worker", 5*time.Second, func() bool {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		n := 0
		for _, fd := range fds {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); strings.HasPrefix(l, "socket:") {
				n++
			}
		}
		return n >= 2 // its channel and the virtual connection
	})
	start := time.Now()
	syscall.Kill(pid, syscall.SIGKILL)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("client got no answer when its worker died: %v", err)
	}
	// 502 (the worker failed the request), or 503 once a retry found no other worker.
	if resp.StatusCode != 502 && resp.StatusCode != 503 {
		t.Fatalf("status %d, want 502 or 503", resp.StatusCode)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("the 502 took %v", el)
	}
}

// TestLongPollWaits25s proxies an engine.io-style long-poll that the worker answers after
// 25 s (its ping interval): the edge has no response timeout that would cut it.
func TestLongPollWaits25s(t *testing.T) {
	t.Parallel()
	e := startEdge(t, Config{}, 1)
	start := time.Now()
	cl := &http.Client{Timeout: 40 * time.Second}
	resp, err := cl.Get("http://" + e.addr + "/slow?ms=25000")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "slow") {
		t.Fatalf("long-poll: %d %q", resp.StatusCode, body)
	}
	if el := time.Since(start); el < 25*time.Second {
		t.Fatalf("answered after %v: the worker's wait was not kept", el)
	}
}
