//go:build unix

package nodeipc

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestListenAppTCP(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000")
	w.waitReady(t)
	if s := w.p.Style(); s != StyleListen {
		t.Fatalf("style = %v, want listen", s)
	}
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatalf("Deliver: %v", err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(client, "GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "hello /tcp from ") {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}

func TestListenAppSocketpairKeepAlive(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000")
	w.waitReady(t)
	edge, app := unixPair(t)
	defer edge.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, app); err != nil {
		app.Close()
		t.Fatalf("Deliver: %v", err)
	}
	app.Close()
	edge.SetDeadline(time.Now().Add(10 * time.Second))
	// Two pipelined requests on one keep-alive virtual connection.
	if _, err := io.WriteString(edge, "GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(edge)
	for _, path := range []string{"/one", "/two"} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.HasPrefix(string(body), "hello "+path+" from ") || resp.Close {
			t.Fatalf("%s: got %q (close=%v)", path, body, resp.Close)
		}
	}
}

func TestStickyWorker(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "sticky.js")
	w.waitReady(t)
	if s := w.p.Style(); s != StyleSticky {
		t.Fatalf("style = %v, want sticky", s)
	}
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatalf("Deliver: %v", err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(client, "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	const prefix = `0{"sid":"`
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), prefix) {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	sid := string(body[len(prefix):])
	sid = sid[:strings.IndexByte(sid, '"')]
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-w.p.Events():
			if e.Kind == EventStickyConnection {
				if e.SID != sid {
					t.Fatalf("sticky:connection sid %q, handshake sid %q", e.SID, sid)
				}
				return
			}
		case <-timeout:
			t.Fatal("no sticky:connection event")
		}
	}
}

func TestWorkerKilled(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000")
	w.waitReady(t)
	if err := w.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-w.runErr:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the worker died")
	}
	if _, err := w.ch.Recv(); err != io.EOF {
		t.Fatalf("Recv after death: %v, want io.EOF", err)
	}
	client, server := tcpPair(t)
	defer client.Close()
	defer server.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := w.p.Deliver(ctx, server)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("Deliver to a dead worker: %v, want ErrClosed", err)
	}
	// The edge still owns the conn: it can answer.
	if _, err := io.WriteString(server, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"); err != nil {
		t.Fatalf("conn unusable after failed Deliver: %v", err)
	}
}

func TestAckTimeoutRealChild(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{cfg: Config{AckTimeout: 300 * time.Millisecond}, noChannel: true, noRun: true}, "silent.js")
	client, server := tcpPair(t)
	defer client.Close()
	defer server.Close()
	start := time.Now()
	err := w.ch.SendHandle(context.Background(), "net.Native", map[string]any{"cmd": "NODE_CLUSTER", "act": "newconn", "key": "k", "seq": 0}, server)
	if !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("SendHandle: %v, want ErrAckTimeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
	if err := w.ch.Send(map[string]any{"x": 1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Send after timeout: %v, want ErrClosed", err)
	}
}

func TestTwoServers(t *testing.T) {
	checkFDs(t)
	front, target := freePort(t), freePort(t)
	shared := new(SharedListeners)
	defer shared.Close()
	w := startWorker(t, workerOpts{shared: shared}, "twoserver.js", strconv.Itoa(front), strconv.Itoa(target))
	w.waitReady(t)
	// Wait for the second server's listening report.
	timeout := time.After(15 * time.Second)
	for got := false; !got; {
		select {
		case e := <-w.p.Events():
			got = e.Kind == EventServerListening && e.Port == target
		case <-timeout:
			t.Fatal("target server not listening")
		}
	}
	// The target port is really served by the worker.
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := hc.Get("http://127.0.0.1:" + strconv.Itoa(target) + "/direct")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "target /direct\n" {
		t.Fatalf("target: %q", body)
	}
	// The front (app server) gets the edge's connection and reaches the target itself.
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatal(err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(client, "GET /via HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	resp, err = http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "front(target /via)\n" {
		t.Fatalf("front: %q", body)
	}
}

// freePort returns a port the app can bind on every address. It is picked below the
// kernel's ephemeral range: a port handed out for :0 may meanwhile become the source port
// of an outgoing connection, whose TIME-WAIT then blocks the app's bind.
func freePort(t testing.TB) int {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 12000 {
				lo = v
			}
		}
	}
	seed := int(time.Now().UnixNano()/1000) + os.Getpid()
	for i := range 200 {
		port := 10000 + (seed+i*7919)%(lo-10000)
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		ln.Close()
		return port
	}
	t.Fatalf("no free port in 10000..%d", lo)
	return 0
}

func TestDeliverRejected(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000", "1") // maxConnections = 1
	w.waitReady(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The first connection is accepted and stays open...
	c1, s1 := tcpPair(t)
	defer c1.Close()
	if err := w.p.Deliver(ctx, s1); err != nil {
		s1.Close()
		t.Fatalf("first Deliver: %v", err)
	}
	s1.Close()
	// ...so the second one is over maxConnections.
	client, server := tcpPair(t)
	defer client.Close()
	defer server.Close()
	if err := w.p.Deliver(ctx, server); !errors.Is(err, ErrRejected) {
		t.Fatalf("Deliver: %v, want ErrRejected", err)
	}
	// The worker closed its copy; ours still works.
	if _, err := io.WriteString(server, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
}

func TestSharedListenerAcrossWorkers(t *testing.T) {
	checkFDs(t)
	front, target := freePort(t), freePort(t)
	shared := new(SharedListeners)
	defer shared.Close()
	var ws []*worker
	for i := 0; i < 2; i++ {
		w := startWorker(t, workerOpts{shared: shared}, "twoserver.js", strconv.Itoa(front), strconv.Itoa(target))
		w.waitReady(t)
		ws = append(ws, w)
	}
	for _, w := range ws {
		timeout := time.After(15 * time.Second)
		for got := false; !got; {
			select {
			case e := <-w.p.Events():
				got = e.Kind == EventServerListening && e.Port == target
			case <-timeout:
				t.Fatal("target server not listening")
			}
		}
	}
	if n := len(shared.Addrs()); n != 1 {
		t.Fatalf("%d shared sockets bound, want 1", n)
	}
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	for i := 0; i < 10; i++ {
		resp, err := hc.Get("http://127.0.0.1:" + strconv.Itoa(target) + "/n")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "target /n\n" {
			t.Fatalf("target: %q", body)
		}
	}
	hc.CloseIdleConnections()
}

// BenchmarkDeliver measures handoffs per second to one Node worker (socketpair ends, the
// per-request "virtual connection" case; the worker's HTTP server accepts each one and sees it
// close). Serial: one Deliver at a time. Parallel: 8 concurrent callers, which overlap the
// newconn reply of one with the handle of the next (the handle ACK itself is one at a time).
func BenchmarkDeliver(b *testing.B) {
	requireNode(b)
	parent, child, err := NewPair()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("node", "listen.js", "3000")
	cmd.Dir = "testdata"
	cmd.ExtraFiles = []*os.File{child}
	cmd.Env = append(os.Environ(), Env(3, 1)...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	child.Close()
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	ch := NewChannel(parent, Config{Logger: slog.New(slog.DiscardHandler)})
	defer ch.Close()
	p := &Primary{Channel: ch}
	go p.Run(context.Background())
	select {
	case <-p.Ready():
	case <-time.After(15 * time.Second):
		b.Fatal("worker not ready")
	}
	ctx := context.Background()
	deliver := func() error {
		a, c := unixPair(b)
		defer a.Close()
		defer c.Close()
		return p.Deliver(ctx, c)
	}
	for range 2000 { // let V8 warm up
		if err := deliver(); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("serial", func(b *testing.B) {
		start := time.Now()
		for b.Loop() {
			if err := deliver(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handoffs/s")
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(4) // 4 x GOMAXPROCS goroutines
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := deliver(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handoffs/s")
	})
}

func TestPreloadIgnoresOtherMessageListeners(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listenmsg.js", "3000")
	w.waitReady(t)
	if s := w.p.Style(); s != StyleListen {
		t.Fatalf("style = %v, want listen", s)
	}
	// The app's own message listener still works: a plain message reaches it.
	if err := w.ch.Send("shutdown"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.waitErr:
		w.waitErr <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("app did not receive the plain message")
	}
	for {
		select {
		case e := <-w.p.Events():
			if e.Kind == EventStickyReady {
				t.Fatal("preload reported sticky-ready for a non-sticky app")
			}
		default:
			return
		}
	}
}
