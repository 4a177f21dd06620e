//go:build linux

package balancer

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/workers"
)

// fastEdge is loopEdge with the fast path's listener (TCP_DEFER_ACCEPT, as stickyd
// listens): accept returns once the client's head is there.
func fastEdge(t *testing.T, cfg Config, serve func(c *net.TCPConn)) (string, *Balancer) {
	t.Helper()
	return loopEdgeOn(t, cfg, ListenConfig{DeferAccept: true}, func(c *net.TCPConn, _ string) { serve(c) })
}

// wantFast fails the test unless exactly n tunnels took the accept loop's fast path since
// before (the general path would carry them just as well: only this tells them apart).
func wantFast(t *testing.T, before int64, n int) {
	t.Helper()
	if got := fastTunnels.Load() - before; got != int64(n) {
		t.Fatalf("%d tunnels went by the fast path, want %d", got, n)
	}
}

// TestFastTunnelCarriesAndHalfCloses: an upgrade whose head came at once goes from the
// accept loop to a tunnel loop (no net.Conn, no goroutine): bytes go both ways, and a
// half-close each way ends only its direction.
func TestFastTunnelCarriesAndHalfCloses(t *testing.T) {
	backends := make(chan *net.TCPConn, 4)
	addr, _ := fastEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
	warmLoops(t, addr)
	base := fdSet()
	readAll := func(c net.Conn) string {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		p, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("reading to the FIN: %v", err)
		}
		return string(p)
	}
	before := fastTunnels.Load()

	c := dialLoopTunnel(t, addr)
	bc := <-backends
	io.WriteString(c, "ping from the client")
	buf := make([]byte, 64)
	bc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadAtLeast(bc, buf, len("ping from the client")); err != nil || string(buf[:n]) != "ping from the client" {
		t.Fatalf("backend got %q %v", buf[:n], err)
	}
	io.WriteString(bc, "pong from the backend")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadAtLeast(c, buf, len("pong from the backend")); err != nil || string(buf[:n]) != "pong from the backend" {
		t.Fatalf("client got %q %v", buf[:n], err)
	}
	c.CloseWrite()
	if got := readAll(bc); got != "" {
		t.Fatalf("backend got %q before the client's FIN", got)
	}
	io.WriteString(bc, "the answer after your FIN")
	bc.CloseWrite()
	if got := readAll(c); got != "the answer after your FIN" {
		t.Fatalf("client got %q", got)
	}
	c.Close()
	bc.Close()

	c = dialLoopTunnel(t, addr)
	bc = <-backends
	io.WriteString(bc, "bye")
	bc.CloseWrite()
	if got := readAll(c); got != "bye" {
		t.Fatalf("client got %q then the FIN, want %q", got, "bye")
	}
	io.WriteString(c, "still talking")
	c.CloseWrite()
	if got := readAll(bc); got != "still talking" {
		t.Fatalf("backend got %q", got)
	}
	c.Close()
	bc.Close()
	wantFast(t, before, 2)
	waitFDsBack(t, base)
}

// TestFastTunnelForwardedFor: the backend gets the head rewritten as the general path
// writes it — the true client in X-Forwarded-For, the client's own claims dropped.
func TestFastTunnelForwardedFor(t *testing.T) {
	heads := make(chan string, 1)
	addr, _ := loopEdgeOn(t, Config{}, ListenConfig{DeferAccept: true}, func(c *net.TCPConn, head string) {
		heads <- head
		io.WriteString(c, "after the head")
		c.Close()
	})
	before := fastTunnels.Load()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"+ClientAddrField+": 6.6.6.6:1\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !strings.HasPrefix(string(got), "HTTP/1.1 101 ") || !strings.HasSuffix(string(got), "\r\n\r\nafter the head") {
		t.Fatalf("the client got %q %v, want the 101 and the backend's bytes", got, err)
	}
	want := "GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
	if head := <-heads; head != want {
		t.Errorf("the backend got the head\n%q\nwant the client's, its claims dropped, the true client added:\n%q", head, want)
	}
	wantFast(t, before, 1)
}

// TestFastTunnelMaxConns: a fast tunnel counts against MaxConns for as long as it lives.
func TestFastTunnelMaxConns(t *testing.T) {
	backends := make(chan *net.TCPConn, 8)
	addr, _ := fastEdge(t, Config{MaxConns: 3}, func(c *net.TCPConn) { backends <- c })
	before := fastTunnels.Load()
	for range 3 {
		c := dialLoopTunnel(t, addr)
		defer c.Close()
	}
	wantFast(t, before, 3)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	if !strings.Contains(line, "503") {
		t.Errorf("a 4th connection with 3 fast tunnels open and MaxConns 3 got %q, want 503", line)
	}
	for range 3 {
		(<-backends).Close()
	}
}

// TestFastTunnelCountsPerAddress: a fast tunnel counts against -max-conns-per-ip for as
// long as it lives, once: the 4th from an address with 3 open is refused, and once one
// ends the address may open another.
func TestFastTunnelCountsPerAddress(t *testing.T) {
	backends := make(chan *net.TCPConn, 8)
	addr, b := fastEdge(t, Config{MaxConnsPerIP: 3}, func(c *net.TCPConn) { backends <- c })
	before := fastTunnels.Load()
	var clients []*net.TCPConn
	for range 3 {
		clients = append(clients, dialLoopTunnel(t, addr))
	}
	wantFast(t, before, 3)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if !strings.Contains(line, "429") {
		t.Errorf("a 4th connection from the address got %q, want 429", line)
	}
	bcs := []*net.TCPConn{<-backends, <-backends, <-backends}
	clients[0].Close()
	readEnd(t, bcs[0], "backend")
	bcs[0].Close() // both directions ended: the tunnel ends
	// The loop untracks the tunnel as it ends it: the address's count is then back to 2
	// (tracked once: counted twice, or never released, it would not be).
	waitFor(t, "the address's count to drop", 5*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.perIP[netip.MustParseAddr("127.0.0.1")] == 2
	})
	clients[0] = dialLoopTunnel(t, addr)
	wantFast(t, before, 4)
	bcs[0] = <-backends
	for i, c := range clients {
		c.Close()
		bcs[i].Close()
	}
}

// TestFastTunnelShutdownAndFreeze: Shutdown and an edge upgrade's Freeze end fast
// tunnels (their stand-ins are where both look).
func TestFastTunnelShutdownAndFreeze(t *testing.T) {
	for _, how := range []string{"shutdown", "freeze"} {
		t.Run(how, func(t *testing.T) {
			backends := make(chan *net.TCPConn, 16)
			addr, b := fastEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
			before := fastTunnels.Load()
			var clients []*net.TCPConn
			for range 10 {
				clients = append(clients, dialLoopTunnel(t, addr))
			}
			wantFast(t, before, 10)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if how == "shutdown" {
				if err := b.Shutdown(ctx); err != nil {
					t.Fatalf("Shutdown with 10 fast tunnels: %v, want them ended before its deadline", err)
				}
			} else {
				if _, _, _, err := b.Freeze(ctx); err != nil {
					t.Fatalf("Freeze with 10 fast tunnels: %v", err)
				}
				defer b.Thaw()
			}
			for _, c := range clients {
				readEnd(t, c, "client")
				c.Close()
			}
			for range clients {
				bc := <-backends
				readEnd(t, bc, "backend")
				bc.Close()
			}
		})
	}
}

// blackhole is a TCP port whose connects neither succeed nor fail: its one-slot accept
// queue is full and nobody accepts, so the kernel drops further SYNs.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: net.IP{127, 0, 0, 1}, Port: sa.(*unix.SockaddrInet4).Port}).String()
	filler, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	return addr
}

// TestFastTunnelBackendFails: a backend that refuses, or whose connect times out, is
// reported to passive health, and the client — nothing read from it yet — still gets its
// upgrade from another backend. The live backend holds one tunnel first, so the next
// keyless upgrade goes to the failing one.
func TestFastTunnelBackendFails(t *testing.T) {
	for _, how := range []string{"refused", "timeout"} {
		t.Run(how, func(t *testing.T) {
			backends := make(chan *net.TCPConn, 16)
			addr, b := fastEdge(t, Config{HandoffTimeout: 300 * time.Millisecond}, func(c *net.TCPConn) { backends <- c })
			held := dialLoopTunnel(t, addr)
			defer held.Close()
			defer (<-backends).Close()
			var bad string
			if how == "refused" {
				dead, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				bad = dead.Addr().String()
				dead.Close() // its port now refuses
			} else {
				bad = blackhole(t)
			}
			reported := make(chan error, 16)
			b.AddWorker(workers.NewWorker(1, 0, workers.NewBackendChannel("tcp", bad, func(err error) { reported <- err }), 0))
			fails, fallbacks := fastConnectFailures.Load(), fastFallbacks.Load()
			c := dialLoopTunnel(t, addr) // fails the test unless a backend answered 101
			c.Close()
			(<-backends).Close()
			want := workers.ErrBackendDown
			if how == "timeout" {
				want = workers.ErrWorkerTimeout
			}
			select {
			case err := <-reported:
				if !errors.Is(err, want) {
					t.Errorf("passive health got %v, want %v", err, want)
				}
			default:
				t.Errorf("the failed connect was not reported to passive health")
			}
			if fastConnectFailures.Load() == fails {
				t.Errorf("the fast path did not try the failing backend")
			}
			t.Logf("the fast path gave %d clients to the general path after a connect failed in the loop",
				fastFallbacks.Load()-fallbacks)
			if how == "timeout" && fastFallbacks.Load() == fallbacks {
				t.Errorf("the timed-out connect did not give the client to the general path")
			}
		})
	}
}

// TestFastTunnelNoLeaks: 200 fast tunnels open and close (the client's end first for
// half of them, the backend's for the others): every descriptor and goroutine of theirs
// is gone after, and nothing is held for a blocked direction.
func TestFastTunnelNoLeaks(t *testing.T) {
	const n = 200
	var mu sync.Mutex
	var held []*net.TCPConn
	addr, _ := fastEdge(t, Config{}, func(c *net.TCPConn) { mu.Lock(); held = append(held, c); mu.Unlock() })
	warmLoops(t, addr)
	base := fdSet()
	goroutines := runtime.NumGoroutine()
	before := fastTunnels.Load()
	clients := make([]*net.TCPConn, n)
	for i := range clients {
		clients[i] = dialLoopTunnel(t, addr)
	}
	wantFast(t, before, n)
	waitFor(t, "the backends to hold every tunnel", 5*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(held) == n })
	mu.Lock()
	for i, c := range clients {
		if i%2 == 0 {
			c.Close()
		} else {
			held[i].Close()
		}
	}
	for i, c := range clients {
		if i%2 == 0 {
			readEnd(t, held[i], "backend")
			held[i].Close()
		} else {
			readEnd(t, c, "client")
			c.Close()
		}
	}
	mu.Unlock()
	waitFor(t, "the tunnels to leave the loops", 5*time.Second, func() bool { return tunnelsInLoops() == 0 })
	waitFDsBack(t, base)
	waitFor(t, "the goroutines to end", 5*time.Second, func() bool { return runtime.NumGoroutine() <= goroutines })
	if held := loopHeld.Load(); held != 0 {
		t.Errorf("the ended tunnels still hold %d bytes", held)
	}
}
