//go:build unix

package balancer

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/sticky"
)

const upgradeRequest = "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

// handshake does one WebSocket upgrade and reads the 101 and the worker's hello frame.
func handshake(b *testing.B, addr string, _ []byte) {
	buf := make([]byte, 512)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, upgradeRequest); err != nil {
		b.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		b.Fatalf("upgrade: %v %v", resp, err)
	}
	if _, err := br.Read(buf); err != nil { // the hello frame
		b.Fatal(err)
	}
}

// directWorker starts the test worker serving plain TCP, as the baseline for the edge.
func directWorker(b *testing.B) string {
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), workerEnv+"=tcp")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	return strings.TrimSpace(line)
}

// BenchmarkHandshake compares WebSocket upgrades straight to one Go worker with the same
// upgrades through the edge (peek, route, SCM_RIGHTS handoff to one worker). The ratio
// is the figure: absolute times on a shared 2-core machine are not.
func BenchmarkHandshake(b *testing.B) {
	buf := make([]byte, 512)
	b.Run("direct", func(b *testing.B) {
		addr := directWorker(b)
		b.SetParallelism(16) // enough clients in flight to load the CPUs, not just the latency
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				handshake(b, addr, buf)
			}
		})
	})
	for _, mode := range []struct {
		name string
		slow bool
	}{{"edge", false}, {"edge-general-path", true}} {
		b.Run(mode.name, func(b *testing.B) {
			e := startEdge(b, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindIP}}}, NoFastPath: mode.slow}, 1)
			b.SetParallelism(16)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					handshake(b, e.addr, buf)
				}
			})
		})
	}
}

// BenchmarkHandoffCost hands connections (one end of a socketpair each, like the edge's
// virtual connections) to one Go worker and to one unmodified Node app, from this
// process: ns/op is the edge's time per handoff (Node's includes waiting for its ACK),
// and cpu-µs/op the edge process's CPU per handoff, read from getrusage.
func BenchmarkHandoffCost(b *testing.B) {
	self, _ := os.Executable()
	kinds := []struct {
		name string
		cmd  []string
		env  []string
	}{
		{"go-worker", []string{self}, []string{workerEnv + "=echo"}},
		{"node-worker", []string{"node", "app.js"}, nil},
	}
	for _, wk := range kinds {
		b.Run(wk.name, func(b *testing.B) {
			if wk.cmd[0] == "node" {
				if _, err := exec.LookPath("node"); err != nil {
					b.Skip("node not installed")
				}
				app := filepath.Join(b.TempDir(), "app.js")
				os.WriteFile(app, []byte("require('http').createServer((q, s) => s.end('ok')).listen(3000)\n"), 0o644)
				wk.cmd = []string{"node", app}
			}
			bal := New(Config{})
			sup := &workers.Supervisor{Edge: bal, Command: wk.cmd, Workers: 1, Env: wk.env, SpawnTimeout: 20 * time.Second, GracePeriod: 2 * time.Second}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { sup.Run(ctx); close(done) }()
			defer func() { cancel(); <-done }()
			select {
			case <-sup.Ready():
			case <-time.After(30 * time.Second):
				b.Fatal("worker not ready")
			}
			w := bal.Workers()[0]
			var ru0, ru1 syscall.Rusage
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
			b.ResetTimer()
			for range b.N {
				mine, theirs, err := fdpass.SocketPair(unix.SOCK_STREAM)
				if err != nil {
					b.Fatal(err)
				}
				if err := w.Channel().Deliver(ctx, theirs, fdpass.Meta{Kind: fdpass.KindVirtual}); err != nil {
					b.Fatal(err)
				}
				theirs.Close()
				mine.Close()
			}
			b.StopTimer()
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
			cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handoffs/s")
		})
	}
}
