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
// answers the edge's newconn with accepted:false and closes its copy. With SLOW=1 each
// upgrade costs it 5 ms of JavaScript, so handoffs queue in the edge.
const nodeUpgradeApp = `
const http = require('http');
const s = http.createServer((q, r) => r.end('ok'));
if (process.env.REFUSE === '1') s.maxConnections = -1; // 0 would mean no limit
s.on('upgrade', (req, sock) => {
  if (process.env.SLOW === '1') { const t = Date.now(); while (Date.now() - t < 5) {} }
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Pid: ' + process.pid + '\r\n\r\n');
  sock.on('data', d => sock.write(d));
});
s.listen(3000);
`

const nodeUpgradeHead = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

// startNodeEdge runs an edge with two Node workers (nodeUpgradeApp); worker 0 gets env0.
func startNodeEdge(t *testing.T, env0 string) *testEdge {
	t.Helper()
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
	return startEdgeWith(t, Config{}, 2, func(b *Balancer, sup *workers.Supervisor) {
		sup.Command = []string{"node", app}
		sup.Env = nil
		sup.SlotEnv = func(slot int) []string {
			if slot == 0 {
				return []string{env0}
			}
			return nil
		}
	})
}

// slot0Label is the metric label of the worker in slot 0 now.
func slot0Label(e *testEdge) string {
	for _, w := range e.b.Workers() {
		if w.Slot == 0 {
			return w.Label()
		}
	}
	return ""
}

// nodeUpgrade sends one upgrade through the edge and reads the answer's status line and
// X-Pid; err is the dial, write or read error (a read timeout: no answer at all).
func nodeUpgrade(addr string, timeout time.Duration) (status int, pid string, err error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(nodeUpgradeHead)); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	return resp.StatusCode, resp.Header.Get("X-Pid"), nil
}

// A burst of WebSocket upgrades to two Node workers, one of which refuses every
// connection: the edge hands them over without a goroutine waiting for each answer
// (AsyncChannel), and each refusal, which comes back on the worker channel's reader,
// goes on to the other worker. Every client gets its 101 from the worker that accepts,
// the edge lets go of every connection, and no descriptor is left behind.
func TestNodeHandoffRefusedGoesToAnotherWorker(t *testing.T) {
	e := startNodeEdge(t, "REFUSE=1")
	refusing, accepting := slot0Label(e), ""
	for _, w := range e.b.Workers() {
		if w.Slot != 0 {
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
			status, pid, err := nodeUpgrade(e.addr, 10*time.Second)
			if err != nil || status != 101 {
				t.Errorf("upgrade: %d, %v", status, err)
				return
			}
			pids <- pid
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
	e := startNodeEdge(t, "SLOW=1")
	victim := strconv.Itoa(e.sup.Pids()[0])
	label := slot0Label(e) // the killed worker's (its replacement has another)
	const n = 200
	var killOnce sync.Once
	outcomes := make(chan string, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, pid, err := nodeUpgrade(e.addr, 15*time.Second)
			switch {
			case err != nil && isTimeout(err):
				t.Errorf("a client got no answer: %v", err)
				return
			case err != nil:
				outcomes <- "closed" // its handle was on its way to the killed worker
				return
			case status != 101:
				outcomes <- strconv.Itoa(status)
				return
			}
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
