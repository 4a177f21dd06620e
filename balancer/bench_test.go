package balancer

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

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

var _ = fdpass.EnvFD
var _ = time.Second
