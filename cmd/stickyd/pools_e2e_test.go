//go:build unix

package main

// End-to-end tests of worker pools (issue 15) with real Node workers (pools-app.js) and
// real socket.io clients (pools-clients.js): slow requests go to a pool that grows on
// demand while the socket.io workers keep their sessions, and a min=0 pool's first
// request waits for its worker while a full queue answers 503 with Retry-After.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// poolsAdmin is GET /admin/workers with the pools fields.
type poolsAdmin struct {
	Workers []struct {
		Slot       int    `json:"slot"`
		Pool       string `json:"pool"`
		PID        int    `json:"pid"`
		State      string `json:"state"`
		Sessions   int    `json:"sessions"`
		WebSockets int64  `json:"websockets"`
		InFlight   int    `json:"in_flight"`
	} `json:"workers"`
	Pools []poolsAdminPool `json:"pools"`
}

type poolsAdminPool struct {
	Name        string `json:"name"`
	Workers     int    `json:"workers"`
	Ready       int    `json:"ready"`
	InFlight    int    `json:"in_flight"`
	Waiting     int    `json:"waiting"`
	Concurrency int    `json:"concurrency"`
	Min         int    `json:"min"`
	Max         int    `json:"max"`
}

var poolsAdminClient = &http.Client{Timeout: 10 * time.Second}

// getPoolsAdmin returns an error rather than failing: the phase-B poller calls it from its
// own goroutine.
func getPoolsAdmin(d *daemon) (poolsAdmin, error) {
	var a poolsAdmin
	resp, err := poolsAdminClient.Get("http://" + d.metrics + "/admin/workers")
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return a, fmt.Errorf("GET /admin/workers: %s", resp.Status)
	}
	return a, json.NewDecoder(resp.Body).Decode(&a)
}

func mustPoolsAdmin(t *testing.T, d *daemon) poolsAdmin {
	t.Helper()
	a, err := getPoolsAdmin(d)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// pool returns the pools entry named name (a zero one if it is missing).
func (a poolsAdmin) pool(name string) poolsAdminPool {
	for _, p := range a.Pools {
		if p.Name == name {
			return p
		}
	}
	return poolsAdminPool{}
}

// poolClientsMsg is one JSON line of pools-clients.js (see its header for the events).
type poolClientsMsg struct {
	Event         string         `json:"event"`
	Clients       int            `json:"clients"`
	Connected     int            `json:"connected"`
	Upgraded      int            `json:"upgraded"`
	PerWorker     map[string]int `json:"perWorker"`
	Errors        map[string]int `json:"errors"`
	Phase         string         `json:"phase"`
	Echoes        int            `json:"echoes"`
	Failed        int            `json:"failed"`
	P50           float64        `json:"p50"`
	P99           float64        `json:"p99"`
	Max           float64        `json:"max"`
	Disconnects   int            `json:"disconnects"`
	WorkerChanged int            `json:"workerChanged"`
	PIDs          []int          `json:"pids"`
	Error         string         `json:"error"`
	Raw           string         `json:"-"`
}

// poolClients drives pools-clients.js: one command line in, one JSON line out.
type poolClients struct {
	t      *testing.T
	in     io.WriteCloser
	lines  chan string
	stderr *syncBuffer
}

func startPoolClients(t *testing.T, d *daemon, n int) *poolClients {
	t.Helper()
	cmd := exec.Command("node", "pools-clients.js", "--url", "http://"+d.addr, "--clients", strconv.Itoa(n))
	cmd.Dir = nodeFixtures(t)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &poolClients{t: t, lines: make(chan string, 16), stderr: &syncBuffer{}}
	cmd.Stderr = p.stderr
	var err error
	if p.in, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pools-clients.js: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		p.in.Close() // end of stdin: the clients disconnect and the script exits
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	return p
}

func (p *poolClients) read(what string, timeout time.Duration) poolClientsMsg {
	p.t.Helper()
	select {
	case line, ok := <-p.lines:
		if !ok {
			p.t.Fatalf("pools-clients.js ended before answering %s; stderr:\n%s", what, tail(p.stderr.String(), 4096))
		}
		var m poolClientsMsg
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			p.t.Fatalf("pools-clients.js %s: %q: %v", what, line, err)
		}
		m.Raw = line
		if m.Event == "error" {
			p.t.Fatalf("pools-clients.js %s: %s", what, m.Error)
		}
		return m
	case <-time.After(timeout):
		p.t.Fatalf("pools-clients.js did not answer %s within %v; stderr:\n%s", what, timeout, tail(p.stderr.String(), 4096))
	}
	return poolClientsMsg{}
}

func (p *poolClients) do(cmd string, timeout time.Duration) poolClientsMsg {
	p.t.Helper()
	if _, err := io.WriteString(p.in, cmd+"\n"); err != nil {
		p.t.Fatalf("pools-clients.js %s: %v", cmd, err)
	}
	return p.read(cmd, timeout)
}

// checkEchoPhase fails unless every echo of the phase came back and nobody disconnected.
func checkEchoPhase(t *testing.T, m poolClientsMsg) {
	t.Helper()
	t.Logf("phase %s: %d echoes, p50 %.1f ms, p99 %.1f ms, max %.1f ms, failed %d, disconnects %d, errors %v",
		m.Phase, m.Echoes, m.P50, m.P99, m.Max, m.Failed, m.Disconnects, m.Errors)
	if m.Event != "phase" || m.Echoes == 0 || m.Failed != 0 || m.Disconnects != 0 || len(m.Errors) != 0 {
		t.Errorf("phase %s: echoes %d, failed %d, disconnects %d, errors %v: want echoes and no failure",
			m.Phase, m.Echoes, m.Failed, m.Disconnects, m.Errors)
	}
}

// checkSessionsKept fails unless all n clients are still connected to the same worker of
// the default pool (slots 0 and 1) that said hello.
func checkSessionsKept(t *testing.T, pc *poolClients, n int) {
	t.Helper()
	c := pc.do("check", 2*time.Minute)
	t.Logf("clients check: %s", c.Raw)
	if c.Connected != n || c.WorkerChanged != 0 || c.Disconnects != 0 || len(c.Errors) != 0 {
		t.Errorf("clients: connected %d of %d, worker changed %d, disconnects %d, errors %v: want every session kept on its worker",
			c.Connected, n, c.WorkerChanged, c.Disconnects, c.Errors)
	}
	for k := range c.PerWorker {
		if k != "0" && k != "1" {
			t.Errorf("clients perWorker %v: a session is on worker %s, want only the default pool's 0 and 1", c.PerWorker, k)
		}
	}
}

// reportAnswer is GET /reports/NAME's answer from pools-app.js.
type reportAnswer struct {
	Name       string `json:"name"`
	PID        int    `json:"pid"`
	Worker     string `json:"worker"`
	Concurrent int    `json:"concurrent"`
	MS         int    `json:"ms"` // the app's own wait (REPORT_MS)

	status     int
	retryAfter string
	body       string
	err        error
	doneAt     time.Time
	seq        int64 // completion order, from 1
}

// getReport sends GET /reports/name on its own connection.
func getReport(addr, name string, seq *atomic.Int64) reportAnswer {
	c := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	var r reportAnswer
	resp, err := c.Get("http://" + addr + "/reports/" + name)
	if err != nil {
		r.err = err
	} else {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		r.status, r.retryAfter, r.body = resp.StatusCode, resp.Header.Get("Retry-After"), string(b)
		if r.status == http.StatusOK {
			if err := json.Unmarshal(b, &r); err != nil {
				r.err = fmt.Errorf("answer %q: %v", b, err)
			}
		}
	}
	r.doneAt = time.Now()
	r.seq = seq.Add(1)
	return r
}

// poolHistogramCount is the sample count of histogram family name for pool.
func poolHistogramCount(mf map[string]*dto.MetricFamily, name, pool string) uint64 {
	f := mf[name]
	if f == nil {
		return 0
	}
	for _, m := range f.GetMetric() {
		for _, lp := range m.GetLabel() {
			if lp.GetName() == "pool" && lp.GetValue() == pool && m.Histogram != nil {
				return m.Histogram.GetSampleCount()
			}
		}
	}
	return 0
}

// TestPoolsKeepSlowRequestsOffSocketWorkers is the seed's scenario (issue 15 "Must show"):
// 2 socket.io workers in the default pool, 100 clients echoing, and 20 simultaneous
// 5-second /reports/ requests that a reports pool (min=0, max=8, concurrency=1) takes on
// workers it starts for them and stops again when they are idle. Times are logged, never
// asserted (stickybench pools prints the timeline, bench/RESULTS.md records it).
func TestPoolsKeepSlowRequestsOffSocketWorkers(t *testing.T) {
	dir := nodeFixtures(t)
	const (
		clients = 100
		reports = 20
		maxPool = 8
	)
	// idle=3s rather than a production-like 30s: the test waits for the pool to shrink.
	d := startDaemon(t, dir, "run", "-workers", "2",
		"-pool", "reports:path=/reports/,min=0,max=8,concurrency=1,idle=3s", "--", "node", "pools-app.js")
	sioWaitWorkers(t, d, 2, 60*time.Second)
	before := mustPoolsAdmin(t, d)
	defaultPIDs := map[int]int{} // pid → slot
	for _, w := range before.Workers {
		if w.Pool != "default" {
			t.Fatalf("before any request: worker %+v is in pool %q, want only the default pool (reports has min=0)", w, w.Pool)
		}
		defaultPIDs[w.PID] = w.Slot
	}
	if p := before.pool("reports"); p.Workers != 0 || p.Max != maxPool || p.Concurrency != 1 {
		t.Fatalf("reports pool before any request: %+v, want 0 workers, max 8, concurrency 1", p)
	}

	pc := startPoolClients(t, d, clients)
	conn := pc.read("connect", 3*time.Minute)
	t.Logf("clients: %s", conn.Raw)
	if conn.Connected != clients || conn.Upgraded != clients || len(conn.Errors) != 0 {
		t.Fatalf("clients: connected %d, upgraded %d of %d, errors %v", conn.Connected, conn.Upgraded, clients, conn.Errors)
	}

	// Phase A: echo without the reports load. A measurement window, not a wait for an event.
	pc.do("start A", 30*time.Second)
	time.Sleep(8 * time.Second)
	phaseA := pc.do("stop", time.Minute)
	checkEchoPhase(t, phaseA)

	// Phase B: the same echoes while 20 reports run. The poller keeps the pool's peak.
	pc.do("start B", 30*time.Second)
	var (
		mu          sync.Mutex
		peakWorkers int
		peakReady   int
		fourthReady time.Duration // since the reports were sent; 0: not seen
		overload    []string      // a reports worker with 2 in flight, or holding a session
		pollErr     error
	)
	stopPoll := make(chan struct{})
	polled := make(chan struct{})
	sent := time.Now()
	go func() {
		defer close(polled)
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for {
			a, err := getPoolsAdmin(d)
			mu.Lock()
			if err != nil {
				pollErr = err
			} else {
				p := a.pool("reports")
				peakWorkers, peakReady = max(peakWorkers, p.Workers), max(peakReady, p.Ready)
				if p.Ready >= 4 && fourthReady == 0 {
					fourthReady = time.Since(sent)
				}
				for _, w := range a.Workers {
					if w.Pool == "reports" && (w.InFlight > 1 || w.Sessions > 0 || w.WebSockets > 0) && len(overload) < 10 {
						overload = append(overload, fmt.Sprintf("%+v", w))
					}
				}
			}
			mu.Unlock()
			select {
			case <-stopPoll:
				return
			case <-tick.C:
			}
		}
	}()
	answers := make([]reportAnswer, reports)
	var seq atomic.Int64
	var wg sync.WaitGroup
	for i := range reports {
		wg.Go(func() { answers[i] = getReport(d.addr, "r"+strconv.Itoa(i), &seq) })
	}
	wg.Wait()
	total := time.Since(sent)
	phaseB := pc.do("stop", time.Minute)
	close(stopPoll)
	<-polled
	checkEchoPhase(t, phaseB)

	t.Logf("20 reports done in %.1fs; reports pool peak %d workers (%d ready); 4th worker ready at %.1fs",
		total.Seconds(), peakWorkers, peakReady, fourthReady.Seconds())
	ratio := 0.0
	if phaseA.P99 > 0 {
		ratio = phaseB.P99 / phaseA.P99
	}
	t.Logf("echo p50/p99: A %.1f/%.1f ms (%d echoes), B %.1f/%.1f ms (%d echoes); p99 B/A = %.2f",
		phaseA.P50, phaseA.P99, phaseA.Echoes, phaseB.P50, phaseB.P99, phaseB.Echoes, ratio)

	pids := map[int]bool{}
	for i, r := range answers {
		if r.err != nil || r.status != http.StatusOK {
			t.Errorf("GET /reports/r%d: status %d, err %v, body %q", i, r.status, r.err, r.body)
			continue
		}
		if r.Concurrent != 0 {
			t.Errorf("GET /reports/r%d: %+v: concurrent %d, want 0 (concurrency=1: one report at a time per worker)", i, r, r.Concurrent)
		}
		if slot, ok := defaultPIDs[r.PID]; ok {
			t.Errorf("GET /reports/r%d answered by pid %d, the default pool's worker %d: want a reports worker", i, r.PID, slot)
		}
		if n, err := strconv.Atoi(r.Worker); err != nil || n < 2 || n > 9 {
			t.Errorf("GET /reports/r%d: worker %q, want a reports slot 2..9 (after the default pool's 0 and 1)", i, r.Worker)
		}
		pids[r.PID] = true
	}
	if len(pids) > maxPool {
		t.Errorf("reports answered by %d distinct pids, want at most %d (max=8)", len(pids), maxPool)
	}
	mu.Lock()
	if pollErr != nil {
		t.Errorf("polling /admin/workers: %v", pollErr)
	}
	if peakWorkers != maxPool || peakReady != maxPool {
		t.Errorf("reports pool peaked at %d workers (%d ready), want %d: 20 requests waiting must grow it to max", peakWorkers, peakReady, maxPool)
	}
	if len(overload) > 0 {
		t.Errorf("reports workers with more than 1 request in flight or a session: %v", overload)
	}
	mu.Unlock()

	// The default pool's 2 workers still hold every session.
	a := mustPoolsAdmin(t, d)
	var sessions, websockets int64
	for _, w := range a.Workers {
		if w.Pool == "default" {
			if _, ok := defaultPIDs[w.PID]; !ok || w.State != "ready" {
				t.Errorf("default pool worker %+v: want the same ready workers as at start %v", w, defaultPIDs)
			}
			sessions += int64(w.Sessions)
			websockets += w.WebSockets
		}
	}
	if sessions != clients || websockets != clients {
		t.Errorf("default pool holds %d sessions and %d WebSockets, want %d each: %+v", sessions, websockets, clients, a.Workers)
	}
	checkSessionsKept(t, pc, clients)

	// Idle for 3 s, the reports workers are stopped: back to min=0.
	shrinkFrom := time.Now()
	waitFor(t, "the reports pool to shrink back to 0 workers", time.Minute, func() bool {
		a, err := getPoolsAdmin(d)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range a.Workers {
			if w.Pool == "reports" {
				return false
			}
		}
		return a.pool("reports").Workers == 0
	})
	t.Logf("reports pool back to 0 workers %.1fs after the last report (idle=3s)", time.Since(shrinkFrom).Seconds())
	for pid := range pids {
		waitFor(t, fmt.Sprintf("retired reports worker pid %d to exit", pid), 30*time.Second, func() bool { return !alive(pid) })
	}
	mf := sioScrape(t, d)
	spawns := sioSum(mf, "stickyd_pool_spawns_total", map[string]string{"pool": "reports"})
	retired := sioSum(mf, "stickyd_pool_retirements_total", map[string]string{"pool": "reports"})
	t.Logf("stickyd_pool_spawns_total %v, stickyd_pool_retirements_total %v, queue waits observed %d", spawns, retired,
		poolHistogramCount(mf, "stickyd_pool_queue_wait_seconds", "reports"))
	if spawns < maxPool || retired != spawns {
		t.Errorf("reports pool: %v spawns, %v retirements: want at least %d spawns, each retired", spawns, retired, maxPool)
	}
	// The gauge follows the pool's supervisor, which sees its last worker end a moment
	// after the process is gone.
	waitFor(t, "stickyd_pool_workers{pool=reports} to sum to 0 after the shrink", 10*time.Second, func() bool {
		return sioSum(sioScrape(t, d), "stickyd_pool_workers", map[string]string{"pool": "reports"}) == 0
	})
	// Shrinking the reports pool touched no session.
	checkSessionsKept(t, pc, clients)
}

// TestPoolMinZeroFirstRequestAndFullQueue: a min=0 pool runs no worker until its first
// request, which waits in the queue for the worker it starts and then succeeds; with one
// request in flight and the queue (queue=2) full, the next gets 503 with Retry-After at
// once, and the waiting ones are served in arrival order.
func TestPoolMinZeroFirstRequestAndFullQueue(t *testing.T) {
	dir := nodeFixtures(t)
	// Reports take 4 s instead of 5: the test waits for three of them in a row (4 s leaves request 4 ample time
	// to arrive while request 1 still runs).
	d := startDaemonEnv(t, dir, []string{"REPORT_MS=4000"}, "run", "-workers", "1",
		"-pool", "slow:path=/reports/,min=0,max=1,concurrency=1,queue=2,queue-timeout=20s", "--", "node", "pools-app.js")
	sioWaitWorkers(t, d, 1, 60*time.Second)
	a := mustPoolsAdmin(t, d)
	if p := a.pool("slow"); p.Name != "slow" || p.Workers != 0 || p.Ready != 0 || p.Min != 0 || p.Max != 1 {
		t.Fatalf("pool slow before its first request: %+v (all pools %+v), want it listed with 0 workers, min 0, max 1", p, a.Pools)
	}
	for _, w := range a.Workers {
		if w.Pool != "default" {
			t.Fatalf("before the first request: worker %+v in pool %q, want none outside the default pool", w, w.Pool)
		}
	}
	poolState := func() poolsAdminPool { return mustPoolsAdmin(t, d).pool("slow") }

	var seq atomic.Int64
	results := make([]chan reportAnswer, 4)
	send := func(i int) {
		results[i] = make(chan reportAnswer, 1)
		go func() { results[i] <- getReport(d.addr, "q"+strconv.Itoa(i+1), &seq) }()
	}
	// 1: waits for the pool's first worker, then runs on it.
	start := time.Now()
	send(0)
	waitFor(t, "the first request to run on the slow pool's new worker", time.Minute, func() bool {
		p := poolState()
		return p.Ready == 1 && p.InFlight == 1
	})
	// 2 and 3 queue behind it, one after the other so their order is known.
	send(1)
	waitFor(t, "request 2 to wait in the queue", 30*time.Second, func() bool { return poolState().Waiting == 1 })
	send(2)
	waitFor(t, "request 3 to wait in the queue", 30*time.Second, func() bool { return poolState().Waiting == 2 })
	// 4: the queue is full.
	fourth := getReport(d.addr, "q4", &seq)
	if fourth.err != nil || fourth.status != http.StatusServiceUnavailable {
		t.Fatalf("request 4 with the queue full: status %d, err %v, body %q: want 503", fourth.status, fourth.err, fourth.body)
	}
	if n, err := strconv.Atoi(fourth.retryAfter); err != nil || n <= 0 {
		t.Errorf("request 4's 503 has Retry-After %q, want a number of seconds", fourth.retryAfter)
	}
	t.Logf("request 4: 503 Retry-After %s, %q", fourth.retryAfter, strings.TrimSpace(fourth.body))
	// At once: the 503 came before the request in flight finished (the queue never held it).
	if fourth.seq != 1 {
		t.Errorf("request 4's 503 was answer number %d: want it before any queued or running report finished", fourth.seq)
	}

	var got []reportAnswer
	for i := range 3 {
		select {
		case r := <-results[i]:
			got = append(got, r)
		case <-time.After(2 * time.Minute):
			t.Fatalf("request %d did not finish", i+1)
		}
	}
	var order []string
	for i, r := range got {
		if r.err != nil || r.status != http.StatusOK {
			t.Fatalf("request %d: status %d, err %v, body %q: want 200", i+1, r.status, r.err, r.body)
		}
		if r.Worker != "1" || r.Concurrent != 0 || r.PID != got[0].PID {
			t.Errorf("request %d answered %+v: want the slow pool's only worker (slot 1, pid %d), one at a time", i+1, r, got[0].PID)
		}
		order = append(order, r.Name)
	}
	slices.SortFunc(got, func(a, b reportAnswer) int { return int(a.seq - b.seq) })
	var finished []string
	for _, r := range got {
		finished = append(finished, r.Name)
	}
	t.Logf("sent %v, finished %v; answered after %v, %v, %v since sent (first: includes the worker's start)", order, finished,
		got[0].doneAt.Sub(start).Round(time.Millisecond), got[1].doneAt.Sub(start).Round(time.Millisecond), got[2].doneAt.Sub(start).Round(time.Millisecond))
	if !slices.Equal(finished, []string{"q1", "q2", "q3"}) {
		t.Errorf("requests finished in the order %v, want q1 q2 q3 (first in, first out)", finished)
	}
	mf := sioScrape(t, d)
	if s := sioSum(mf, "stickyd_pool_spawns_total", map[string]string{"pool": "slow"}); s != 1 {
		t.Errorf("stickyd_pool_spawns_total{pool=slow} = %v, want 1 (max=1)", s)
	}
	// The first request waited for the worker (min=0), and 2 and 3 for room on it: three
	// waits observed when a worker took them.
	if n := poolHistogramCount(mf, "stickyd_pool_queue_wait_seconds", "slow"); n != 3 {
		t.Errorf("stickyd_pool_queue_wait_seconds{pool=slow} counts %d waits, want 3 (requests 1, 2, 3)", n)
	}
}
