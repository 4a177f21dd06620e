//go:build linux

package balancer

import (
	"bufio"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
)

// nodeUpgradeApp answers every upgrade with a 101 that names the process (no WebSocket
// library: the test reads only the status and the pid). With REFUSE=1 it refuses every
// connection the way Node's cluster worker does when maxConnections is reached: it
// answers the edge's newconn with accepted:false and closes its copy.
const nodeUpgradeApp = `
const http = require('http');
const s = http.createServer((q, r) => r.end('ok'));
if (process.env.REFUSE === '1') s.maxConnections = -1; // 0 would mean no limit
s.on('upgrade', (req, sock) => {
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Pid: ' + process.pid + '\r\n\r\n');
  sock.on('data', d => sock.write(d));
});
s.listen(3000);
`

const nodeUpgradeHead = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

// A burst of WebSocket upgrades to two Node workers, one of which refuses every
// connection: the edge hands them over without a goroutine waiting for each answer
// (AsyncChannel), and each refusal, which comes back on the worker channel's reader,
// goes on to the other worker. Every client gets its 101 from the worker that accepts,
// the edge lets go of every connection, and no descriptor is left behind.
func TestNodeHandoffRefusedGoesToAnotherWorker(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("node not installed; CI must install Node")
		}
		t.Skip("node not installed")
	}
	app := filepath.Join(t.TempDir(), "app.js")
	if err := os.WriteFile(app, []byte(nodeUpgradeApp), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startEdgeWith(t, Config{}, 2, func(b *Balancer, sup *workers.Supervisor) {
		sup.Command = []string{"node", app}
		sup.Env = nil
		sup.SlotEnv = func(slot int) []string {
			if slot == 0 {
				return []string{"REFUSE=1"}
			}
			return nil
		}
	})
	var refusing, accepting string
	for _, w := range e.b.Workers() {
		if w.Slot == 0 {
			refusing = w.Label()
		} else {
			accepting = w.Label()
		}
	}
	base := fdSet()
	const n = 40
	pids := make(chan string, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", e.addr, 5*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte(nodeUpgradeHead)); err != nil {
				t.Error(err)
				return
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Errorf("upgrade: %v", err)
				return
			}
			if resp.StatusCode != 101 {
				t.Errorf("upgrade: %s", resp.Status)
				return
			}
			pids <- resp.Header.Get("X-Pid")
		}()
	}
	wg.Wait()
	close(pids)
	seen := map[string]int{}
	for p := range pids {
		seen[p]++
	}
	if len(seen) != 1 {
		t.Fatalf("answered by %v, want every upgrade on the one worker that accepts", seen)
	}
	e.settle(t) // the edge counts a handoff when the worker's answer reaches it, maybe after the client's 101
	refused := counterValue(e.b.m.Handoffs.WithLabelValues(refusing, metrics.HandoffError))
	retried := counterValue(e.b.m.Handoffs.WithLabelValues(refusing, metrics.HandoffRetried))
	ok := counterValue(e.b.m.Handoffs.WithLabelValues(accepting, metrics.HandoffOK))
	if refused == 0 || retried != refused || ok != n {
		t.Fatalf("handoffs: %v refused and %v retried by the refusing worker, %v taken by the other (want >0, equal, %d)", refused, retried, ok, n)
	}
	waitForFDs(t, 0, base)
}

// A Node worker killed while the edge has a queue of handoffs for it (it is slow to take
// them: each upgrade costs it 5 ms of JavaScript): the handoffs still queued go to the
// other worker, the ones on their way are answered by the kill (the client sees its
// connection end), and none is left waiting — every client has its answer, and the edge
// lets go of every connection.
func TestNodeWorkerKilledWithHandoffsQueued(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("node not installed; CI must install Node")
		}
		t.Skip("node not installed")
	}
	app := filepath.Join(t.TempDir(), "app.js")
	slow := strings.Replace(nodeUpgradeApp, "s.on('upgrade', (req, sock) => {",
		"s.on('upgrade', (req, sock) => {\n  if (process.env.SLOW === '1') { const t = Date.now(); while (Date.now() - t < 5) {} }", 1)
	if err := os.WriteFile(app, []byte(slow), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startEdgeWith(t, Config{}, 2, func(b *Balancer, sup *workers.Supervisor) {
		sup.Command = []string{"node", app}
		sup.Env = nil
		sup.SlotEnv = func(slot int) []string {
			if slot == 0 {
				return []string{"SLOW=1"}
			}
			return nil
		}
	})
	victim := strconv.Itoa(e.sup.Pids()[0])
	var label string // the killed worker's (its replacement has another)
	for _, w := range e.b.Workers() {
		if w.Slot == 0 {
			label = w.Label()
		}
	}
	const n = 200
	var killOnce sync.Once
	outcomes := make(chan string, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", e.addr, 5*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := c.Write([]byte(nodeUpgradeHead)); err != nil {
				outcomes <- "write failed"
				return
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			switch {
			case err != nil && isTimeout(err):
				t.Errorf("a client got no answer: %v", err)
				return
			case err != nil:
				outcomes <- "closed" // its handle was on its way to the killed worker
				return
			case resp.StatusCode != 101:
				outcomes <- resp.Status
				return
			}
			pid := resp.Header.Get("X-Pid")
			if pid == victim {
				killOnce.Do(func() { syscall.Kill(e.sup.Pids()[0], syscall.SIGKILL) })
				outcomes <- "victim"
				return
			}
			outcomes <- "survivor"
		}()
	}
	wg.Wait()
	close(outcomes)
	seen := map[string]int{}
	for o := range outcomes {
		seen[o]++
	}
	retried := counterValue(e.b.m.Handoffs.WithLabelValues(label, metrics.HandoffRetried))
	t.Logf("outcomes: %v; handoffs to the killed worker retried elsewhere: %v", seen, retried)
	if seen["survivor"] < n/2 || seen["victim"] == 0 {
		t.Fatalf("outcomes %v: want most upgrades on the surviving worker after the kill", seen)
	}
	e.settle(t)
}
