//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
)

// loopEdge runs an edge in front of one backend reached by address, whose upgraded
// connections go to serve (raw bytes after the backend's 101; serve runs on the accepting
// goroutine, so a serve that only keeps the conn costs the test no goroutine).
func loopEdge(t *testing.T, cfg Config, serve func(c *net.TCPConn)) (string, *Balancer) {
	t.Helper()
	return loopEdgeOn(t, cfg, ListenConfig{}, func(c *net.TCPConn, _ string) { serve(c) })
}

// loopEdgeOn is loopEdge on a listener of lc's (DeferAccept: the accept loop sees whole
// heads, the fast path's case), whose serve also gets the head the backend read.
func loopEdgeOn(t *testing.T, cfg Config, lc ListenConfig, serve func(c *net.TCPConn, head string)) (string, *Balancer) {
	t.Helper()
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	b := New(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			head, err := readRawHead(c)
			if err != nil {
				c.Close()
				continue
			}
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			if strings.HasPrefix(head, "GET /warm ") {
				c.Close() // warmLoops' tunnel
				continue
			}
			serve(c.(*net.TCPConn), head)
		}
	}()
	t.Cleanup(func() { ln.Close() })
	b.AddWorker(workers.NewWorker(0, 0, workers.NewBackendChannel("tcp", ln.Addr().String(), nil), 0))
	lns, err := lc.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go b.Serve(lns[0])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
	})
	return lns[0].Addr().String(), b
}

// readHead reads an HTTP head byte by byte (nothing after it), at most 8 KiB.
func readRawHead(c net.Conn) (string, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var head []byte
	one := make([]byte, 1)
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		if len(head) > 8<<10 {
			return "", errors.New("head too long")
		}
		if _, err := c.Read(one); err != nil {
			return "", err
		}
		head = append(head, one[0])
	}
	return string(head), nil
}

// dialLoopTunnel opens a WebSocket upgrade through the edge and reads the backend's 101.
func dialLoopTunnel(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	return dialLoopPath(t, addr, "/ws")
}

func dialLoopPath(t *testing.T, addr, path string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	head, err := readRawHead(c)
	if err != nil || !strings.HasPrefix(head, "HTTP/1.1 101 ") {
		c.Close()
		t.Fatalf("the upgrade through the edge: %q %v", head, err)
	}
	return c.(*net.TCPConn)
}

// warmLoops opens one tunnel that the backend ends, so the loops (shared by the process,
// a few descriptors and goroutines each) exist before a test takes its baseline.
func warmLoops(t *testing.T, addr string) {
	t.Helper()
	c := dialLoopPath(t, addr, "/warm")
	readEnd(t, c, "warm-up tunnel")
	c.Close()
	waitFor(t, "the warm-up tunnel to end", 5*time.Second, func() bool { return tunnelsInLoops() == 0 })
}

// tunnelsInLoops is the number of tunnels the loops hold.
func tunnelsInLoops() int {
	tunnelLoops.mu.Lock()
	loops := tunnelLoops.loops
	tunnelLoops.mu.Unlock()
	n := 0
	for _, l := range loops {
		l.mu.Lock()
		n += len(l.sides) / 2
		l.mu.Unlock()
	}
	return n
}

// stream is a deterministic byte stream for a direction of a test tunnel.
func stream(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return p
}

// TestTunnelLoopCarriesBothWaysConcurrently: several tunnels carry a few MB each way at
// once, intact, and a half-close each way ends each direction where it should: the
// client's FIN reaches the backend after all its bytes, the backend's reaches the client
// after all of its own; then the tunnel ends and leaves no descriptor behind.
func TestTunnelLoopCarriesBothWaysConcurrently(t *testing.T) {
	const size = 3 << 20
	const tunnels = 4
	type got struct {
		sum [32]byte
		n   int
		err error
	}
	results := make(chan got, tunnels)
	addr, _ := loopEdge(t, Config{}, func(c *net.TCPConn) {
		go func() {
			defer c.Close()
			var seed [8]byte
			if _, err := io.ReadFull(c, seed[:]); err != nil {
				results <- got{err: err}
				return
			}
			down := stream(uint64(seed[0])+1000, size)
			wrote := make(chan struct{})
			go func() { c.Write(down); c.CloseWrite(); close(wrote) }()
			h := sha256.New()
			n, err := io.Copy(h, c) // until the client's FIN
			<-wrote
			var g got
			copy(g.sum[:], h.Sum(nil))
			g.n, g.err = int(n), err
			results <- g
		}()
	})
	warmLoops(t, addr)
	base := fdSet()
	var wg sync.WaitGroup
	var clients []net.Conn
	for i := range tunnels {
		c := dialLoopTunnel(t, addr)
		clients = append(clients, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			up := append([]byte{byte(i), 0, 0, 0, 0, 0, 0, 0}, stream(uint64(i), size)...)
			go func() { c.Write(up); c.CloseWrite() }()
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			down, err := io.ReadAll(c) // until the backend's FIN
			if err != nil {
				t.Errorf("tunnel %d: reading: %v", i, err)
				return
			}
			if want := stream(uint64(i)+1000, size); !bytes.Equal(down, want) {
				t.Errorf("tunnel %d: the client got %d bytes, want the backend's %d intact", i, len(down), len(want))
			}
		}()
	}
	wg.Wait()
	for _, c := range clients {
		c.Close()
	}
	sums := map[[32]byte]bool{}
	for i := range tunnels {
		sums[sha256.Sum256(stream(uint64(i), size))] = true
	}
	for range tunnels {
		g := <-results
		if g.err != nil || g.n != size || !sums[g.sum] {
			t.Errorf("a backend got %d bytes (err %v), want a client's %d intact", g.n, g.err, size)
		}
	}
	waitFDsBack(t, base)
	if n := tunnelsInLoops(); n != 0 {
		t.Errorf("%d tunnels still in the loops", n)
	}
}

// TestTunnelLoopHalfClose: after one side's FIN the other direction still carries bytes,
// each way round; the tunnel ends when both have ended.
func TestTunnelLoopHalfClose(t *testing.T) {
	backends := make(chan *net.TCPConn, 2)
	addr, _ := loopEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
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
	t.Run("client first", func(t *testing.T) {
		c := dialLoopTunnel(t, addr)
		defer c.Close()
		bc := <-backends
		defer bc.Close()
		io.WriteString(c, "last words")
		c.CloseWrite()
		if got := readAll(bc); got != "last words" {
			t.Fatalf("backend got %q then the FIN, want %q", got, "last words")
		}
		io.WriteString(bc, "the answer after your FIN")
		bc.CloseWrite()
		if got := readAll(c); got != "the answer after your FIN" {
			t.Fatalf("client got %q", got)
		}
	})
	t.Run("backend first", func(t *testing.T) {
		c := dialLoopTunnel(t, addr)
		defer c.Close()
		bc := <-backends
		defer bc.Close()
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
	})
	waitFDsBack(t, base)
}

// waitFDsBack waits until the process holds no descriptor that was not in base (the
// edge's own listener may be gone: Shutdown closed it).
func waitFDsBack(t *testing.T, base map[string]string) {
	t.Helper()
	var added []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		added = added[:0]
		for fd, l := range fdSet() {
			if base[fd] != l && l != "" && !strings.HasPrefix(l, "/proc/") { // ReadDir's own
				added = append(added, fd+"="+l)
			}
		}
		if len(added) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("descriptors left after the tunnels ended: %v", added)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// readEnd reads until the connection ends; it fails the test if it does not end in time
// (a reset or a FIN both count).
func readEnd(t *testing.T, c net.Conn, what string) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if isTimeout(err) {
		t.Fatalf("%s: the connection did not end: %v", what, err)
	}
	return err
}

// TestTunnelLoopClientReset: a client's reset reaches the backend as a reset (not a clean
// end) and the tunnel is gone.
func TestTunnelLoopClientReset(t *testing.T) {
	backends := make(chan *net.TCPConn, 2)
	addr, _ := loopEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
	warmLoops(t, addr)
	base := fdSet()
	c := dialLoopTunnel(t, addr)
	bc := <-backends
	c.SetLinger(0)
	c.Close()
	if err := readEnd(t, bc, "backend"); err == nil {
		t.Errorf("the backend saw a clean end, want the client's reset")
	}
	bc.Close()
	waitFDsBack(t, base)
}

// TestTunnelLoopBackendReset: the same the other way round.
func TestTunnelLoopBackendReset(t *testing.T) {
	backends := make(chan *net.TCPConn, 2)
	addr, _ := loopEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
	warmLoops(t, addr)
	base := fdSet()
	c := dialLoopTunnel(t, addr)
	bc := <-backends
	io.WriteString(bc, "partial")
	bc.SetLinger(0)
	bc.Close()
	if err := readEnd(t, c, "client"); err == nil {
		t.Errorf("the client saw a clean end, want the backend's reset")
	}
	c.Close()
	waitFDsBack(t, base)
}

// TestTunnelLoopBackendNeverReads: a client that sends into a backend that never reads
// fills the sockets, not the edge: the edge holds at most one read's worth for the
// blocked direction and no goroutine for it, and the tunnel ends when the client leaves.
func TestTunnelLoopBackendNeverReads(t *testing.T) {
	backends := make(chan *net.TCPConn, 2)
	addr, _ := loopEdge(t, Config{}, func(c *net.TCPConn) { c.SetReadBuffer(64 << 10); backends <- c })
	warmLoops(t, addr)
	base := fdSet()
	goroutines := runtime.NumGoroutine()
	c := dialLoopTunnel(t, addr)
	bc := <-backends
	chunk := make([]byte, 256<<10)
	sent := 0
	for sent < 256<<20 {
		c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		n, err := c.Write(chunk)
		sent += n
		if isTimeout(err) {
			break // the client's own send buffer is full: the edge stopped reading it
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if sent >= 256<<20 {
		t.Fatalf("the client wrote %d MB into a backend that never reads", sent>>20)
	}
	if held := loopHeld.Load(); held <= 0 || held > loopChunk {
		t.Errorf("the edge holds %d bytes for the blocked direction, want 1..%d", held, loopChunk)
	}
	if g := runtime.NumGoroutine(); g > goroutines+2 {
		t.Errorf("%d goroutines with the blocked tunnel, %d before", g, goroutines)
	}
	t.Logf("the client sent %d KiB before blocking; the edge holds %d bytes", sent>>10, loopHeld.Load())
	// A client that leaves with bytes it could not send: its close says nothing on the
	// wire (the FIN waits behind those bytes), so it leaves abortively, as a client
	// that gives up does.
	c.SetLinger(0)
	c.Close()
	readEnd(t, bc, "backend")
	bc.Close()
	waitFDsBack(t, base)
	if held := loopHeld.Load(); held != 0 {
		t.Errorf("the ended tunnel still holds %d bytes", held)
	}
}

// TestTunnelLoopIdleTunnelsHoldNoGoroutines: 500 idle tunnels cost the edge no goroutine
// (the goroutine design held two each) and Shutdown ends every one promptly; then the
// descriptors are back where they were.
func TestTunnelLoopIdleTunnelsHoldNoGoroutines(t *testing.T) {
	var mu sync.Mutex
	var held []*net.TCPConn
	addr, b := loopEdge(t, Config{}, func(c *net.TCPConn) { mu.Lock(); held = append(held, c); mu.Unlock() })
	warmLoops(t, addr)
	base := fdSet()
	goroutines := runtime.NumGoroutine()
	const n = 500
	clients := make([]*net.TCPConn, n)
	for i := range clients {
		clients[i] = dialLoopTunnel(t, addr)
	}
	waitFor(t, "the tunnels to be in the loops", 5*time.Second, func() bool { return tunnelsInLoops() == n })
	waitFor(t, "the handshake goroutines to end", 5*time.Second, func() bool { return runtime.NumGoroutine() <= goroutines+5 })
	if g := runtime.NumGoroutine(); g > goroutines+5 {
		t.Fatalf("%d idle tunnels: %d goroutines, %d before", n, g, goroutines)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with %d tunnels: %v, want every tunnel ended before its deadline", n, err)
	}
	for _, c := range clients {
		readEnd(t, c, "client")
		c.Close()
	}
	mu.Lock()
	for _, c := range held {
		readEnd(t, c, "backend")
		c.Close()
	}
	mu.Unlock()
	waitFDsBack(t, base)
	if n := tunnelsInLoops(); n != 0 {
		t.Errorf("%d tunnels still in the loops after Shutdown", n)
	}
}

// TestTunnelLoopFreezeEndsTunnels: an edge upgrade's Freeze ends loop tunnels (they do
// not go over) instead of waiting for them.
func TestTunnelLoopFreezeEndsTunnels(t *testing.T) {
	backends := make(chan *net.TCPConn, 32)
	addr, b := loopEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
	warmLoops(t, addr)
	var clients []*net.TCPConn
	for range 20 {
		clients = append(clients, dialLoopTunnel(t, addr))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _, _, err := b.Freeze(ctx)
	if err != nil {
		t.Fatalf("Freeze with 20 tunnels: %v", err)
	}
	for _, c := range clients {
		readEnd(t, c, "client")
		c.Close()
	}
	for range clients {
		(<-backends).Close()
	}
	b.Thaw()
}

// TestTunnelLoopCountsPerAddress: a loop tunnel still counts against -max-conns-per-ip.
func TestTunnelLoopCountsPerAddress(t *testing.T) {
	backends := make(chan *net.TCPConn, 8)
	addr, _ := loopEdge(t, Config{MaxConnsPerIP: 3}, func(c *net.TCPConn) { backends <- c })
	for range 3 {
		c := dialLoopTunnel(t, addr)
		defer c.Close()
	}
	waitFor(t, "the tunnels to be in the loops", 5*time.Second, func() bool { return tunnelsInLoops() >= 3 })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	if !strings.Contains(line, "429") {
		t.Errorf("a 4th connection from the address got %q, want 429", line)
	}
	for range 3 {
		(<-backends).Close()
	}
}

// TestTunnelLoopDialRefused: a backend that refuses the connect (made in the loop) is
// reported to passive health and the upgrade goes to another backend; the client never
// notices.
func TestTunnelLoopDialRefused(t *testing.T) {
	backends := make(chan *net.TCPConn, 16)
	addr, b := loopEdge(t, Config{}, func(c *net.TCPConn) { backends <- c })
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close() // its port now refuses
	refused := make(chan error, 16)
	b.AddWorker(workers.NewWorker(1, 0, workers.NewBackendChannel("tcp", deadAddr, func(err error) { refused <- err }), 0))
	for range 6 {
		c := dialLoopTunnel(t, addr) // fails the test unless a backend answered 101
		c.Close()
		(<-backends).Close()
	}
	select {
	case err := <-refused:
		if !errors.Is(err, workers.ErrBackendDown) {
			t.Errorf("passive health got %v, want ErrBackendDown", err)
		}
	default:
		t.Errorf("6 upgrades, none tried the refusing backend (or its refusal was not reported)")
	}
}
