//go:build unix

package main

// Shared pieces of soak and upgrade-drill: the edge's admin API, a fleet of held
// WebSockets that echo now and then, keep-alive HTTP request streams on raw connections
// (no client-side retry can hide a failure), and a connect→response probe.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// ---- admin API ----

type adminWorker struct {
	Slot       int    `json:"slot"`
	PID        int    `json:"pid"`
	State      string `json:"state"`
	Sessions   int    `json:"sessions"`
	WebSockets int64  `json:"websockets"`
}

type adminState struct {
	Workers    []adminWorker `json:"workers"`
	Generation int           `json:"generation"`
	PID        int           `json:"pid"`
	Ready      bool          `json:"ready"`
}

var adminClient = &http.Client{Timeout: 3 * time.Second}

func getAdmin(ctx context.Context, base string) (*adminState, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/admin/workers", nil)
	if err != nil {
		return nil, err
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		return nil, fmt.Errorf("GET /admin/workers: %s %q", resp.Status, b)
	}
	var st adminState
	return &st, json.NewDecoder(resp.Body).Decode(&st)
}

// allReady reports whether n workers are listed and all of them are ready.
func (s *adminState) allReady(n int) bool {
	if len(s.Workers) != n {
		return false
	}
	for _, w := range s.Workers {
		if w.State != "ready" || w.PID <= 0 {
			return false
		}
	}
	return true
}

func (s *adminState) workerPIDs() []int {
	var p []int
	for _, w := range s.Workers {
		p = append(p, w.PID)
	}
	slices.Sort(p)
	return p
}

func (s *adminState) slot(slot int) (adminWorker, bool) {
	for _, w := range s.Workers {
		if w.Slot == slot {
			return w, true
		}
	}
	return adminWorker{}, false
}

// waitAdmin polls the admin API until cond holds.
func waitAdmin(ctx context.Context, base string, timeout time.Duration, cond func(*adminState) bool) (*adminState, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		st, err := getAdmin(ctx, base)
		if err == nil && cond(st) {
			return st, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("admin %s: condition not reached within %s (last error %v)", base, timeout, last)
}

// edgeFlags: start stickyd ourselves (-stickyd) or attach (-admin and -url).
type edgeFlags struct {
	stickyd, admin, url string
	workers             int
}

func (e *edgeFlags) register(fs_ *flag.FlagSet, workers int) {
	fs_.StringVar(&e.stickyd, "stickyd", "/tmp/stickyd", "start this stickyd binary: stickyd run -workers N -- stickybench serve-worker (ignored with -admin)")
	fs_.StringVar(&e.admin, "admin", "", "attach to a running edge instead: its metrics/admin base URL, e.g. http://127.0.0.1:8071 (needs -url)")
	fs_.StringVar(&e.url, "url", "", "with -admin: the edge's WebSocket URL, e.g. ws://127.0.0.1:8080/ws (its workers must serve /ws and /whoami like serve-worker)")
	e.workers = workers
}

// start returns the WebSocket URL, the admin base and a stop function.
func (e *edgeFlags) start(ctx context.Context, mode string) (wsURL, admin string, stop func(), err error) {
	if e.admin != "" {
		if e.url == "" {
			return "", "", nil, errors.New("-admin needs -url (the edge's ws:// URL)")
		}
		u, err := url.Parse(e.admin)
		if err != nil || checkLoopback(u.Hostname()) != nil {
			return "", "", nil, fmt.Errorf("-admin %q: want a loopback http URL", e.admin)
		}
		w, err := url.Parse(e.url)
		if err != nil || (w.Scheme != "ws") || checkLoopback(w.Hostname()) != nil {
			return "", "", nil, fmt.Errorf("-url %q: want a loopback ws:// URL", e.url)
		}
		st, err := getAdmin(ctx, e.admin)
		if err != nil {
			return "", "", nil, err
		}
		e.workers = len(st.Workers)
		return e.url, e.admin, func() {}, nil
	}
	if !isExec(e.stickyd) {
		return "", "", nil, fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", e.stickyd, e.stickyd)
	}
	self, err := os.Executable()
	if err != nil {
		return "", "", nil, err
	}
	p, err := freePort()
	if err != nil {
		return "", "", nil, err
	}
	mp, err := freePort()
	if err != nil {
		return "", "", nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	admin = "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(mp))
	cmd := exec.Command(e.stickyd, "run", "-listen", addr, "-workers", strconv.Itoa(e.workers),
		"-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn", "-shutdown-timeout", "5s",
		"--", self, "serve-worker")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return "", "", nil, err
	}
	t := &target{name: "stickyd", procs: []*exec.Cmd{cmd}}
	if _, err := waitAdmin(ctx, admin, 30*time.Second, func(s *adminState) bool { return s.allReady(e.workers) }); err != nil {
		t.stop()
		return "", "", nil, err
	}
	fmt.Fprintf(stderr, "stickybench %s: started %s run -listen %s -workers %d -metrics %s -- stickybench serve-worker (edge pid %d)\n",
		mode, e.stickyd, addr, e.workers, admin, cmd.Process.Pid)
	return "ws://" + addr + "/ws", admin, t.stop, nil
}

// ---- WebSocket fleet ----

type lossEvent struct {
	PID int
	At  time.Time
	Err string
}

type fleetConn struct {
	conn *websocket.Conn
	pid  int
}

type wsFleet struct {
	url       string
	dialer    *websocket.Dialer
	interval  time.Duration
	timeout   time.Duration
	reconnect bool

	conns      []*fleetConn
	mu         sync.Mutex
	losses     []lossEvent
	echoes     atomic.Int64
	reconnects atomic.Int64
	openErrs   *errSample
	rec        recorder
}

// hello parses the serve-worker hello {"type":"hello","worker":…,"pid":…}.
func helloPID(msg []byte) int {
	var h struct {
		Type string `json:"type"`
		PID  int    `json:"pid"`
	}
	if json.Unmarshal(msg, &h) != nil || h.Type != "hello" {
		return 0
	}
	return h.PID
}

func (f *wsFleet) dial(ctx context.Context) (*fleetConn, error) {
	c, _, err := dialWS(ctx, f.dialer, f.url, false, f.timeout)
	if err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(f.timeout))
	_, msg, err := c.ReadMessage()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("reading hello: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	pid := helloPID(msg)
	if pid == 0 {
		c.Close()
		return nil, fmt.Errorf("no pid in hello %q", trunc(msg))
	}
	return &fleetConn{conn: c, pid: pid}, nil
}

// open dials n WebSockets, c at a time.
func (f *wsFleet) open(ctx context.Context, n, c int, quiet bool, mode string) error {
	f.openErrs = newErrSample()
	f.conns = make([]*fleetConn, n)
	var next, held atomic.Int64
	stop := progress(quiet, mode, func() string {
		return fmt.Sprintf("opening WebSockets: %d/%d, errors %d", held.Load(), n, f.openErrs.n.Load())
	})
	defer stop()
	var wg sync.WaitGroup
	for range min(c, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(n) || ctx.Err() != nil {
					return
				}
				fc, err := f.dial(ctx)
				if err != nil {
					f.openErrs.add(err.Error())
					continue
				}
				f.conns[i] = fc
				held.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	if e := f.openErrs.n.Load(); e > 0 {
		return fmt.Errorf("%d of %d WebSockets failed to open: %v", e, n, f.openErrs.list())
	}
	return nil
}

// run echoes one message on every WebSocket every interval (spread over the interval)
// until ctx ends; a failed echo is a loss, recorded with the pid that served it.
func (f *wsFleet) run(ctx context.Context) *sync.WaitGroup {
	var wg sync.WaitGroup
	for i, fc := range f.conns {
		if fc == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			defer func() { f.rec.merge(lat) }()
			wait := time.Duration(rand.Int64N(int64(f.interval)))
			payload := []byte("ping " + strconv.Itoa(i))
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
				wait = f.interval
				t0 := time.Now()
				err := echoOnce(fc.conn, payload, f.timeout)
				if err == nil {
					lat = append(lat, time.Since(t0))
					f.echoes.Add(1)
					continue
				}
				if ctx.Err() != nil {
					return
				}
				f.mu.Lock()
				f.losses = append(f.losses, lossEvent{PID: fc.pid, At: time.Now(), Err: err.Error()})
				f.mu.Unlock()
				fc.conn.Close()
				if !f.reconnect {
					f.mu.Lock()
					fc.conn = nil
					f.mu.Unlock()
					return
				}
				for ctx.Err() == nil {
					nc, err := f.dial(ctx)
					if err == nil {
						f.mu.Lock()
						*fc = *nc
						f.mu.Unlock()
						f.reconnects.Add(1)
						break
					}
					select {
					case <-ctx.Done():
					case <-time.After(200 * time.Millisecond):
					}
				}
			}
		}()
	}
	return &wg
}

func echoOnce(c *websocket.Conn, payload []byte, timeout time.Duration) error {
	c.SetWriteDeadline(time.Now().Add(timeout))
	if err := c.WriteMessage(websocket.TextMessage, payload); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	_, msg, err := c.ReadMessage()
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(msg) != string(payload) {
		return fmt.Errorf("echo mismatch: %q", trunc(msg))
	}
	return nil
}

// verify echoes once on every held WebSocket (64 at a time); it returns the pids of the
// ones that did not answer (one entry per WebSocket).
func (f *wsFleet) verify() (alive int64, deadPIDs []int) {
	var mu sync.Mutex
	var n atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, fc := range f.conns {
		if fc == nil || fc.conn == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if echoOnce(fc.conn, []byte("verify"), f.timeout) == nil {
				n.Add(1)
				return
			}
			mu.Lock()
			deadPIDs = append(deadPIDs, fc.pid)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return n.Load(), deadPIDs
}

func (f *wsFleet) close() {
	for _, fc := range f.conns {
		if fc != nil && fc.conn != nil {
			fc.conn.Close()
		}
	}
}

func (f *wsFleet) byPID() map[int]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := map[int]int{}
	for _, fc := range f.conns {
		if fc != nil && fc.conn != nil {
			m[fc.pid]++
		}
	}
	return m
}

// ---- keep-alive HTTP streams ----

// httpFailure is one failed request: when it ended, on which stream, which worker pid
// answered that stream's last successful request, and why.
type httpFailure struct {
	Stream  int       `json:"stream"`
	At      time.Time `json:"at"`
	LastPID int       `json:"last_pid"`
	Err     string    `json:"err"`
}

// httpStreams runs `streams` request loops; each holds ONE keep-alive TCP connection from
// its own source address (127.0.0.(i%sources+1)) and sends GET path on it, pausing
// `pause` between requests. A failure (connect error, write/read error, a response that
// is not 200, the server closing the connection) is recorded and the loop reconnects.
type httpStreams struct {
	addr, host, path string
	streams, sources int
	pause, timeout   time.Duration

	requests, ok, conns atomic.Int64
	mu                  sync.Mutex
	failures            []httpFailure
	rec                 recorder
}

func (h *httpStreams) run(ctx context.Context) *sync.WaitGroup {
	var wg sync.WaitGroup
	for i := range h.streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.loop(ctx, i)
		}()
	}
	return &wg
}

func (h *httpStreams) loop(ctx context.Context, i int) {
	var lat []time.Duration
	defer func() { h.rec.merge(lat) }()
	d := net.Dialer{Timeout: h.timeout}
	if h.sources > 1 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i%h.sources+1))}
	}
	var conn net.Conn
	var br *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	lastPID := 0
	req := "GET " + h.path + " HTTP/1.1\r\nHost: " + h.host + "\r\nUser-Agent: stickybench\r\n\r\n"
	fail := func(err error) {
		if ctx.Err() != nil {
			return
		}
		h.mu.Lock()
		h.failures = append(h.failures, httpFailure{Stream: i, At: time.Now(), LastPID: lastPID, Err: err.Error()})
		h.mu.Unlock()
		if conn != nil {
			conn.Close()
			conn = nil
		}
	}
	for ctx.Err() == nil {
		if conn == nil {
			c, err := d.DialContext(ctx, "tcp4", h.addr)
			if err != nil {
				fail(fmt.Errorf("connect: %w", err))
				sleepCtx(ctx, 100*time.Millisecond)
				continue
			}
			conn, br = c, bufio.NewReader(c)
			h.conns.Add(1)
		}
		t0 := time.Now()
		h.requests.Add(1)
		conn.SetDeadline(t0.Add(h.timeout))
		if _, err := io.WriteString(conn, req); err != nil {
			fail(fmt.Errorf("write: %w", err))
			continue
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			fail(fmt.Errorf("read: %w", err))
			continue
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if err != nil {
			fail(fmt.Errorf("body: %w", err))
			continue
		}
		if resp.StatusCode != 200 {
			fail(fmt.Errorf("status %d: %q", resp.StatusCode, trunc(body)))
			continue
		}
		var who struct {
			PID int `json:"pid"`
		}
		json.Unmarshal(body, &who)
		lastPID = who.PID
		lat = append(lat, time.Since(t0))
		h.ok.Add(1)
		if resp.Close {
			conn.Close()
			conn = nil
		}
		sleepCtx(ctx, h.pause)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// ---- connect→response probe ----

type probeSample struct {
	At      time.Time
	Latency time.Duration
	Err     string
}

// connectProbe opens a NEW TCP connection every `every`, sends one GET path with
// Connection: close and times connect→complete response. While the edge is not
// accepting, the connect still succeeds (the kernel's backlog) and the response waits:
// the latency spike is the time the listener was not being served.
func connectProbe(ctx context.Context, addr, host, path string, every, timeout time.Duration) func() []probeSample {
	var mu sync.Mutex
	var out []probeSample
	done := make(chan struct{})
	go func() {
		defer close(done)
		req := "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n"
		t := time.NewTicker(every)
		defer t.Stop()
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				s := probeSample{At: t0}
				err := func() error {
					c, err := net.DialTimeout("tcp4", addr, timeout)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(t0.Add(timeout))
					if _, err := io.WriteString(c, req); err != nil {
						return err
					}
					resp, err := http.ReadResponse(bufio.NewReader(c), nil)
					if err != nil {
						return err
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						return fmt.Errorf("status %d", resp.StatusCode)
					}
					return nil
				}()
				s.Latency = time.Since(t0)
				if err != nil {
					s.Err = err.Error()
				}
				mu.Lock()
				out = append(out, s)
				mu.Unlock()
			}()
		}
	}()
	return func() []probeSample {
		<-done
		mu.Lock()
		defer mu.Unlock()
		slices.SortFunc(out, func(a, b probeSample) int { return a.At.Compare(b.At) })
		return out
	}
}

// window is a time interval [From, To].
type window struct{ From, To time.Time }

func (w window) contains(t time.Time) bool { return !t.Before(w.From) && !t.After(w.To) }

// probeStats splits probe samples into those that started inside any window and the
// rest; it returns the baseline p50/p99 (outside), the max latency inside each window,
// and the count of failed probes.
func probeStats(samples []probeSample, wins []window) (base latency, maxIn []time.Duration, failed int) {
	var outside []time.Duration
	maxIn = make([]time.Duration, len(wins))
	for _, s := range samples {
		if s.Err != "" {
			failed++
		}
		in := false
		for i, w := range wins {
			if w.contains(s.At) {
				in = true
				maxIn[i] = max(maxIn[i], s.Latency)
			}
		}
		if !in {
			outside = append(outside, s.Latency)
		}
	}
	slices.Sort(outside)
	return summarize(outside), maxIn, failed
}
