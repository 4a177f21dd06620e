//go:build unix

package balancer

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
)

// size is a pool's min, max and idle time, and its own command (nil: the default pool's).
type size struct {
	min, max int
	idle     time.Duration
	cmd      []string
}

// startPoolEdge runs an edge with one default worker (slot 0) and the named pool p, whose
// workers (slots 1…) are started on demand by a real Supervisor: this test binary in
// echo mode, unless sz names another command.
func startPoolEdge(t *testing.T, p Pool, sz size) (*Balancer, string, *metrics.Metrics) {
	t.Helper()
	m, _ := metrics.New(nil, false)
	p.Gate.Metrics = m
	cfg := Config{Pools: []Pool{p}, Metrics: m,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))}
	e := startEdgeWith(t, cfg, 1, func(b *Balancer, root *workers.Supervisor) {
		pool := &workers.Supervisor{Edge: b, Command: root.Command, Env: root.Env, SpawnTimeout: root.SpawnTimeout,
			GracePeriod: root.GracePeriod, Stdout: root.Stdout, Stderr: root.Stderr,
			Name: p.Name, FirstSlot: 1, Gate: p.Gate, Min: sz.min, Max: sz.max, Idle: sz.idle}
		if sz.cmd != nil {
			pool.Command = sz.cmd
		}
		root.Pools = []*workers.Supervisor{pool}
	})
	return e.b, e.addr, m
}

func poolWorkers(b *Balancer, name string) []*workers.Worker {
	var out []*workers.Worker
	for _, w := range b.Workers() {
		if w.PoolName == name {
			out = append(out, w)
		}
	}
	return out
}

type poolAnswer struct {
	status     int
	retryAfter string
	body       string
	done       time.Time
}

func poolGet(t *testing.T, addr, path string, hdr http.Header) poolAnswer {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	for k, v := range hdr {
		req.Header[k] = v
	}
	// A transport of its own: each request on its own connection, as separate clients.
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Errorf("GET %s: %v", path, err)
		return poolAnswer{}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return poolAnswer{resp.StatusCode, resp.Header.Get("Retry-After"), string(body), time.Now()}
}

// The seed's case in small: slow requests go to a pool that grows on demand to its max,
// one request per worker at a time, while the default pool's worker takes nothing of
// them; then the pool shrinks back to zero processes.
func TestPoolTakesItsRequestsGrowsAndShrinks(t *testing.T) {
	gate := &workers.Gate{Name: "slow", Concurrency: 1}
	b, addr, m := startPoolEdge(t, Pool{Name: "slow", PathPrefix: "/slow", Gate: gate},
		size{0, 3, 300 * time.Millisecond, nil})
	if n := len(poolWorkers(b, "slow")); n != 0 {
		t.Fatalf("a min=0 pool runs %d workers before its first request", n)
	}

	// Sample every pool worker's requests in flight while the load runs.
	var maxInFlight, maxWorkers int
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			ws := poolWorkers(b, "slow")
			maxWorkers = max(maxWorkers, len(ws))
			for _, w := range ws {
				maxInFlight = max(maxInFlight, w.InFlight())
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	const n = 7
	answers := make([]poolAnswer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() { defer wg.Done(); answers[i] = poolGet(t, addr, "/slow?ms=300", nil) }()
	}
	who := poolGet(t, addr, "/whoami", nil) // the default pool still answers at once
	wg.Wait()
	close(stop)
	<-sampled

	if who.status != 200 || !strings.Contains(who.body, `"worker":"0"`) {
		t.Errorf("default pool: %d %q, want worker 0", who.status, who.body)
	}
	for i, a := range answers {
		if a.status != 200 || !slices.Contains([]string{"slow 1", "slow 2", "slow 3"}, a.body) {
			t.Errorf("request %d: %d %q, want 200 from a slow-pool worker (slots 1–3)", i, a.status, a.body)
		}
	}
	if maxInFlight > 1 {
		t.Errorf("a worker of a concurrency=1 pool had %d requests in flight", maxInFlight)
	}
	if maxWorkers != 3 {
		t.Errorf("the pool grew to %d workers for 7 waiting requests, want its max 3", maxWorkers)
	}
	if got := metricValue(m.PoolSpawns.WithLabelValues("slow")); got != 3 {
		t.Errorf("stickyd_pool_spawns_total = %v, want 3", got)
	}
	waitFor(t, "the idle pool to shrink to min=0", 10*time.Second, func() bool { return len(poolWorkers(b, "slow")) == 0 })
	// The pool counts a retirement after it drained the worker out of the edge's lists.
	waitFor(t, "stickyd_pool_retirements_total to reach 3", 10*time.Second, func() bool {
		return metricValue(m.PoolRetirements.WithLabelValues("slow")) == 3
	})
	if q := metricValue(m.PoolQueueLength.WithLabelValues("slow")); q != 0 {
		t.Errorf("queue length %v after the load", q)
	}
	// And it grows again for the next request, at once: a slot whose worker is still
	// exiting does not hold the growth back (another slot is taken).
	if a := poolGet(t, addr, "/slow?ms=1", nil); a.status != 200 || !slices.Contains([]string{"slow 1", "slow 2", "slow 3"}, a.body) {
		t.Errorf("after shrinking: %d %q, want 200 from a slow-pool worker", a.status, a.body)
	}
}

// A saturated pool queues in arrival order; beyond its queue a request is answered 503
// with Retry-After at once, and a request that waits past the queue timeout too.
func TestPoolQueueIsFIFOAndBounded(t *testing.T) {
	gate := &workers.Gate{Name: "slow", Concurrency: 1, MaxQueue: 2, Timeout: 20 * time.Second}
	b, addr, m := startPoolEdge(t, Pool{Name: "slow", PathPrefix: "/slow", Gate: gate},
		size{1, 1, time.Minute, nil})
	waitFor(t, "the pool's min worker", 10*time.Second, func() bool { return len(poolWorkers(b, "slow")) == 1 })

	answers := make(chan poolAnswer, 3)
	go func() { answers <- poolGet(t, addr, "/slow?ms=700", nil) }()
	waitFor(t, "the first request in flight", 5*time.Second, func() bool { return poolWorkers(b, "slow")[0].InFlight() == 1 })
	var order []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, tag := range []string{"second", "third"} {
		before, _ := gate.Waiting()
		wg.Add(1)
		go func() {
			defer wg.Done()
			a := poolGet(t, addr, "/slow?ms=50&tag="+tag, nil)
			mu.Lock()
			order = append(order, tag)
			mu.Unlock()
			answers <- a
		}()
		waitFor(t, tag+" request queued", 5*time.Second, func() bool { n, _ := gate.Waiting(); return n == before+1 })
	}
	full := poolGet(t, addr, "/slow?ms=1", nil)
	if full.status != 503 || full.retryAfter == "" {
		t.Errorf("beyond the queue: %d Retry-After %q, want 503 with Retry-After", full.status, full.retryAfter)
	}
	wg.Wait()
	for range 3 {
		if a := <-answers; a.status != 200 {
			t.Errorf("queued request: %d %q", a.status, a.body)
		}
	}
	if !slices.Equal(order, []string{"second", "third"}) {
		t.Errorf("completion order %v, want arrival order", order)
	}
	if got := metricValue(m.Rejections.WithLabelValues(metrics.RejectQueueFull)); got != 1 {
		t.Errorf("queue_full rejections = %v, want 1", got)
	}
}

// A request that waits longer than its pool's queue timeout gets 503 with Retry-After.
func TestPoolQueueTimeout(t *testing.T) {
	gate := &workers.Gate{Name: "slow", Concurrency: 1, Timeout: 200 * time.Millisecond}
	b, addr, m := startPoolEdge(t, Pool{Name: "slow", PathPrefix: "/slow", Gate: gate}, size{1, 1, time.Minute, nil})
	waitFor(t, "the pool's min worker", 10*time.Second, func() bool { return len(poolWorkers(b, "slow")) == 1 })
	answers := make(chan poolAnswer, 1)
	go func() { answers <- poolGet(t, addr, "/slow?ms=1500", nil) }()
	waitFor(t, "the slow request in flight", 5*time.Second, func() bool { return poolWorkers(b, "slow")[0].InFlight() == 1 })
	if a := poolGet(t, addr, "/slow?ms=1", nil); a.status != 503 || a.retryAfter == "" {
		t.Errorf("after the queue timeout: %d Retry-After %q, want 503 with Retry-After", a.status, a.retryAfter)
	}
	if got := metricValue(m.Rejections.WithLabelValues(metrics.RejectQueueTimeout)); got != 1 {
		t.Errorf("queue_timeout rejections = %v, want 1", got)
	}
	if a := <-answers; a.status != 200 {
		t.Errorf("the slow request: %d", a.status)
	}
}

// A WebSocket for a pool with no worker yet waits for the pool's first one; a WebSocket
// is a session, not a request in flight, so it does not hold the worker's concurrency.
func TestPoolWebSocketWaitsForTheFirstWorker(t *testing.T) {
	gate := &workers.Gate{Name: "live", Concurrency: 1}
	b, addr, _ := startPoolEdge(t, Pool{Name: "live", Header: "X-Pool", HeaderValue: "live", Gate: gate},
		size{0, 2, time.Minute, nil})
	c, h := dialWS(t, addr, http.Header{"X-Pool": {"live"}})
	defer c.Close()
	if h.Worker != "1" {
		t.Errorf("WebSocket went to worker %q, want the pool's first (1)", h.Worker)
	}
	echoOnce(t, c, "hi")
	ws := poolWorkers(b, "live")
	if len(ws) != 1 || ws[0].InFlight() != 0 {
		t.Fatalf("pool workers %d, in flight %d: want 1 worker with nothing in flight", len(ws), ws[0].InFlight())
	}
	// A request for the pool now finds room at once on that worker.
	if a := poolGet(t, addr, "/whoami", http.Header{"X-Pool": {"live"}}); a.status != 200 || !strings.Contains(a.body, `"worker":"1"`) {
		t.Errorf("pool request: %d %q", a.status, a.body)
	}
	// Without the header: the default pool.
	if a := poolGet(t, addr, "/whoami", nil); !strings.Contains(a.body, `"worker":"0"`) {
		t.Errorf("default request: %q", a.body)
	}
}

// metricValue reads a counter's or gauge's current value.
func metricValue(c prometheus.Metric) float64 {
	var d dto.Metric
	c.Write(&d)
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

// A pool whose command cannot start answers the requests that wait for it 503 as soon as
// it gave up (not after the queue timeout), answers new ones at once, and does not fork
// again and again.
func TestPoolThatCannotStartAnswers503(t *testing.T) {
	gate := &workers.Gate{Name: "broken", Concurrency: 1, Timeout: time.Minute}
	b, addr, m := startPoolEdge(t, Pool{Name: "broken", PathPrefix: "/slow", Gate: gate},
		size{0, 2, time.Minute, []string{"false"}})
	start := time.Now()
	a := poolGet(t, addr, "/slow?ms=1", nil)
	if a.status != 503 || a.retryAfter == "" {
		t.Errorf("a pool that cannot start: %d Retry-After %q, want 503 with Retry-After", a.status, a.retryAfter)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("answered after %v: it waited for the queue timeout", d)
	}
	if a := poolGet(t, addr, "/slow?ms=1", nil); a.status != 503 || !strings.Contains(a.body, "cannot start") {
		t.Errorf("a request after the pool gave up: %d %q", a.status, a.body)
	}
	if n := len(poolWorkers(b, "broken")); n != 0 {
		t.Errorf("%d workers in routing", n)
	}
	spawns := metricValue(m.PoolSpawns.WithLabelValues("broken"))
	if spawns < 1 || spawns > 2 {
		t.Errorf("%v spawns for one request to a pool that cannot start, want 1 (2 at most: max)", spawns)
	}
	// The default pool is untouched.
	if a := poolGet(t, addr, "/whoami", nil); a.status != 200 {
		t.Errorf("default pool: %d", a.status)
	}
}

// Misbehaving peers around a pool's queue: a client that leaves while it waits gives its
// place up (noticed within about a second, counted as client_gone), and a pool worker
// killed in the middle of a request answers that request 502 and gives its room back —
// the request queued behind it is served by the replacement worker, and nothing stays
// counted in flight.
func TestPoolQueueWithVanishingClientAndDyingWorker(t *testing.T) {
	gate := &workers.Gate{Name: "slow", Concurrency: 1, Timeout: time.Minute}
	b, addr, m := startPoolEdge(t, Pool{Name: "slow", PathPrefix: "/slow", Gate: gate}, size{1, 1, time.Minute, nil})
	waitFor(t, "the pool's min worker", 10*time.Second, func() bool { return len(poolWorkers(b, "slow")) == 1 })
	w := poolWorkers(b, "slow")[0]

	// A POST: it is not sent again to another worker once it reached one, so the client
	// gets the failure (a GET would be retried on the replacement).
	held := make(chan poolAnswer, 1)
	go func() {
		resp, err := http.Post("http://"+addr+"/slow?ms=20000", "text/plain", strings.NewReader("x"))
		if err != nil {
			t.Error(err)
			held <- poolAnswer{}
			return
		}
		resp.Body.Close()
		held <- poolAnswer{status: resp.StatusCode}
	}()
	waitFor(t, "the long request in flight", 5*time.Second, func() bool { return w.InFlight() == 1 })

	// A client queues, then vanishes.
	gone0 := metricValue(m.Rejections.WithLabelValues(metrics.RejectClientGone))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /slow?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n")
	waitFor(t, "the vanishing client queued", 5*time.Second, func() bool { n, _ := gate.Waiting(); return n == 1 })
	c.Close()
	waitFor(t, "the vanished client out of the queue", 5*time.Second, func() bool { n, _ := gate.Waiting(); return n == 0 })
	if got := metricValue(m.Rejections.WithLabelValues(metrics.RejectClientGone)) - gone0; got != 1 {
		t.Errorf("client_gone counted %v times, want 1", got)
	}

	// A request queues behind the long one; then the worker holding it dies.
	queued := make(chan poolAnswer, 1)
	go func() { queued <- poolGet(t, addr, "/slow?ms=1", nil) }()
	waitFor(t, "a request queued", 5*time.Second, func() bool { n, _ := gate.Waiting(); return n == 1 })
	if err := syscall.Kill(w.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if a := <-held; a.status != 502 {
		t.Errorf("the request whose worker died: %d %q, want 502", a.status, a.body)
	}
	if a := <-queued; a.status != 200 || a.body != "slow 1" {
		t.Errorf("the queued request: %d %q, want 200 from the replacement in slot 1", a.status, a.body)
	}
	if w.InFlight() != 0 {
		t.Errorf("the dead worker still counts %d requests in flight", w.InFlight())
	}
	waitFor(t, "nothing in flight in the pool", 5*time.Second, func() bool {
		for _, pw := range poolWorkers(b, "slow") {
			if pw.InFlight() != 0 {
				return false
			}
		}
		n, _ := gate.Waiting()
		return n == 0
	})
}
