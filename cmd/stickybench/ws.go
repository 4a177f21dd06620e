//go:build unix

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

func newWSDialer(c *common) *websocket.Dialer {
	return &websocket.Dialer{
		NetDialContext:   sourceDialer(c.sources, c.timeout),
		HandshakeTimeout: c.timeout,
		ReadBufferSize:   1024,
		WriteBufferSize:  1024,
		// wss:// targets use compare -tls's self-signed certificate; every handshake is a
		// full one (no session cache), the worst case a server pays for.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}
}

// dialWS dials u and, when expectHello, reads the first message; it returns the
// worker named by a JSON hello ("" if none).
func dialWS(ctx context.Context, d *websocket.Dialer, u string, expectHello bool, timeout time.Duration) (*websocket.Conn, string, error) {
	c, resp, err := d.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
			resp.Body.Close()
			return nil, "", fmt.Errorf("%v: %s %q", err, resp.Status, body)
		}
		return nil, "", err
	}
	if !expectHello {
		return c, "", nil
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	_, msg, err := c.ReadMessage()
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("reading hello: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	return c, helloWorker(msg), nil
}

// helloWorker returns the worker of a {"type":"hello","worker":"N",...} message.
func helloWorker(msg []byte) string {
	var h struct {
		Type   string `json:"type"`
		Worker any    `json:"worker"`
		PID    int    `json:"pid"`
	}
	if json.Unmarshal(msg, &h) != nil || h.Type != "hello" {
		return "?"
	}
	if h.Worker == nil || h.Worker == "" {
		return "pid:" + strconv.Itoa(h.PID)
	}
	return fmt.Sprint(h.Worker)
}

// tally counts hellos per worker.
type tally struct {
	mu sync.Mutex
	m  map[string]int
}

func (t *tally) add(w string) {
	if w == "" {
		return
	}
	t.mu.Lock()
	if t.m == nil {
		t.m = map[string]int{}
	}
	t.m[w]++
	t.mu.Unlock()
}

type handshakeResult struct {
	Mode        string         `json:"mode"`
	URL         string         `json:"url"`
	N           int            `json:"n"`
	C           int            `json:"c"`
	Sources     int            `json:"sources"`
	ExpectHello bool           `json:"expect_hello"`
	OK          int64          `json:"ok"`
	Errors      int64          `json:"errors"`
	ErrorSample []string       `json:"error_sample,omitempty"`
	Seconds     float64        `json:"seconds"`
	Rate        float64        `json:"rate"`
	Workers     map[string]int `json:"workers,omitempty"`
	latency
}

func runHandshake(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("handshake", flag.ContinueOnError)
	var cm common
	cm.register(fs, "ws://127.0.0.1:8080/ws")
	n := fs.Int("n", 0, "number of WebSocket upgrades (required)")
	c := fs.Int("c", 64, "concurrency")
	hello := fs.Bool("expect-hello", true, "read the first message (the server's hello) before closing")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := cm.check("ws", "wss"); err != nil {
		return err
	}
	if *n <= 0 || *n > 10_000_000 {
		return errors.New("-n is required: 1..10000000 upgrades")
	}
	if *c <= 0 || *c > 10000 {
		return errors.New("-c: want 1..10000")
	}
	res, err := handshake(ctx, &cm, *n, *c, *hello)
	if err != nil {
		return err
	}
	return emit(out, res)
}

func handshake(ctx context.Context, cm *common, n, c int, expectHello bool) (*handshakeResult, error) {
	d := newWSDialer(cm)
	var next, ok atomic.Int64
	errs := newErrSample()
	var rec recorder
	var workers tally
	stop := progress(cm.quiet, "handshake", func() string {
		return fmt.Sprintf("ok=%d errors=%d of %d", ok.Load(), errs.n.Load(), n)
	})
	start := time.Now()
	var wg sync.WaitGroup
	for range min(c, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, n/c+1)
			defer func() { rec.merge(lat) }()
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				t0 := time.Now()
				conn, w, err := dialWS(ctx, d, cm.url, expectHello, cm.timeout)
				if err != nil {
					errs.add(err.Error())
					continue
				}
				lat = append(lat, time.Since(t0))
				conn.Close()
				ok.Add(1)
				workers.add(w)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	stop()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return &handshakeResult{
		Mode: "handshake", URL: cm.url, N: n, C: c, Sources: cm.sources, ExpectHello: expectHello,
		OK: ok.Load(), Errors: errs.n.Load(), ErrorSample: errs.list(),
		Seconds: round3(el.Seconds()), Rate: round1(float64(ok.Load()) / el.Seconds()),
		Workers: workers.m, latency: rec.summary(),
	}, nil
}

type echoResult struct {
	Mode        string         `json:"mode"`
	URL         string         `json:"url"`
	C           int            `json:"c"`
	M           int            `json:"m"`
	Size        int            `json:"size"`
	Binary      bool           `json:"binary"`
	Sources     int            `json:"sources"`
	Connected   int64          `json:"connected"`
	Messages    int64          `json:"messages"`
	Errors      int64          `json:"errors"`
	ErrorSample []string       `json:"error_sample,omitempty"`
	Seconds     float64        `json:"seconds"`
	Rate        float64        `json:"rate"`
	Workers     map[string]int `json:"workers,omitempty"`
	latency
}

func runEcho(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	var cm common
	cm.register(fs, "ws://127.0.0.1:8080/ws")
	c := fs.Int("c", 64, "connections")
	m := fs.Int("m", 0, "messages per connection, one in flight (-m or -d required)")
	d := fs.Duration("d", 0, "stop after this long (-m or -d required)")
	size := fs.Int("size", 64, "message size in bytes")
	binary := fs.Bool("binary", false, "send binary messages (default text)")
	hello := fs.Bool("expect-hello", true, "read and skip the server's first message (hello)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := cm.check("ws", "wss"); err != nil {
		return err
	}
	if *m <= 0 && *d <= 0 {
		return errors.New("bounded runs only: give -m messages per connection and/or -d duration")
	}
	if *d > time.Hour || *m < 0 {
		return errors.New("-d at most 1h, -m >= 0")
	}
	if *c <= 0 || *c > 10000 {
		return errors.New("-c: want 1..10000")
	}
	if *size < 1 || *size > 1<<20 {
		return errors.New("-size: want 1..1048576")
	}
	if soft, _ := nofile(); uint64(*c)+64 > soft {
		return fmt.Errorf("-c %d does not fit the nofile soft limit %d", *c, soft)
	}
	res, err := echo(ctx, &cm, *c, *m, *d, *size, *binary, *hello)
	if err != nil {
		return err
	}
	return emit(out, res)
}

func echo(ctx context.Context, cm *common, c, m int, dur time.Duration, size int, binary, expectHello bool) (*echoResult, error) {
	dialer := newWSDialer(cm)
	var msgs, connected atomic.Int64
	errs := newErrSample()
	var rec recorder
	var workers tally
	typ := websocket.TextMessage
	if binary {
		typ = websocket.BinaryMessage
	}
	conns := make([]*websocket.Conn, c)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			conn, w, err := dialWS(ctx, dialer, cm.url, expectHello, cm.timeout)
			if err != nil {
				errs.add(err.Error())
				return
			}
			conns[i] = conn
			connected.Add(1)
			workers.add(w)
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	total := int64(c) * int64(m)
	stop := progress(cm.quiet, "echo", func() string {
		return fmt.Sprintf("conns=%d messages=%d/%d errors=%d", connected.Load(), msgs.Load(), total, errs.n.Load())
	})
	var deadline time.Time
	start := time.Now()
	if dur > 0 {
		deadline = start.Add(dur)
	}
	for i, conn := range conns {
		if conn == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			payload := bytes.Repeat([]byte{'a' + byte(i%26)}, size)
			lat := make([]time.Duration, 0, min(max(m, 16), 1<<16))
			defer func() { rec.merge(lat) }()
			for j := 0; m <= 0 || j < m; j++ {
				if ctx.Err() != nil || (!deadline.IsZero() && time.Now().After(deadline)) {
					return
				}
				t0 := time.Now()
				conn.SetWriteDeadline(t0.Add(cm.timeout))
				if err := conn.WriteMessage(typ, payload); err != nil {
					errs.add("write: " + err.Error())
					return
				}
				conn.SetReadDeadline(t0.Add(cm.timeout))
				rt, got, err := conn.ReadMessage()
				if err != nil {
					errs.add("read: " + err.Error())
					return
				}
				lat = append(lat, time.Since(t0))
				if rt != typ || !bytes.Equal(got, payload) {
					errs.add(fmt.Sprintf("echo mismatch: type %d, %d bytes", rt, len(got)))
					continue
				}
				msgs.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	stop()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return &echoResult{
		Mode: "echo", URL: cm.url, C: c, M: m, Size: size, Binary: binary, Sources: cm.sources,
		Connected: connected.Load(), Messages: msgs.Load(), Errors: errs.n.Load(), ErrorSample: errs.list(),
		Seconds: round3(el.Seconds()), Rate: round1(float64(msgs.Load()) / el.Seconds()),
		Workers: workers.m, latency: rec.summary(),
	}, nil
}

// parseSteps parses "5000,10000": ascending positive counts.
func parseSteps(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("-steps: %q is not a positive count", f)
		}
		if len(out) > 0 && v <= out[len(out)-1] {
			return nil, errors.New("-steps must be ascending")
		}
		out = append(out, v)
	}
	return out, nil
}

func parsePIDs(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("-pid: %q is not a pid", f)
		}
		out = append(out, v)
	}
	return out, nil
}

type idleSample struct {
	Conns  int64 `json:"conns"`
	RSSKiB int64 `json:"rss_kib"`
	FDs    int64 `json:"fds"`
	Procs  int   `json:"procs"`
	// ByPID: RSS KiB of each -pid (with its descendants under -tree).
	ByPID map[string]int64 `json:"rss_kib_by_pid,omitempty"`
}

type idleResult struct {
	Mode         string             `json:"mode"`
	URL          string             `json:"url"`
	N            int                `json:"n"`
	Held         int64              `json:"held"`
	Errors       int64              `json:"errors"`
	ErrorSample  []string           `json:"error_sample,omitempty"`
	Sources      int                `json:"sources"`
	OpenSeconds  float64            `json:"open_seconds"`
	Rate         float64            `json:"rate"`
	HoldSeconds  float64            `json:"hold_seconds"`
	Alive        int64              `json:"alive_after_hold"`
	NofileSoft   uint64             `json:"nofile_soft"`
	NofileHard   uint64             `json:"nofile_hard"`
	PIDs         []int              `json:"pids,omitempty"`
	Tree         bool               `json:"tree"`
	TargetNofile []int64            `json:"target_nofile,omitempty"`
	Baseline     *idleSample        `json:"baseline,omitempty"`
	Steps        []idleSample       `json:"steps,omitempty"`
	AfterHold    *idleSample        `json:"after_hold,omitempty"`
	SlopeFrom    int64              `json:"slope_from,omitempty"`
	SlopeTo      int64              `json:"slope_to,omitempty"`
	KiBPerConn   float64            `json:"kib_per_conn"`
	KiBByPID     map[string]float64 `json:"kib_per_conn_by_pid,omitempty"`
	FDsPerConn   float64            `json:"fds_per_conn"`
	latency
}

func runIdle(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	var cm common
	cm.register(fs, "ws://127.0.0.1:8080/ws")
	n := fs.Int("n", 0, "idle WebSockets to open and hold (required)")
	c := fs.Int("c", 64, "concurrency while opening")
	hold := fs.Duration("hold", 0, "hold all connections this long after the last step")
	pidList := fs.String("pid", "", "server pid(s), comma-separated: sample RSS and fds before connecting and at each step")
	tree := fs.Bool("tree", false, "with -pid: add every descendant process of each pid")
	stepList := fs.String("steps", "", "held-connection counts at which to sample (default N/2,N); the slope between the last two is the per-connection cost")
	settle := fs.Duration("settle", time.Second, "wait this long at each step before sampling")
	hello := fs.Bool("expect-hello", true, "read the server's first message (hello) on each connection")
	verify := fs.Bool("verify", true, "after the hold, echo one message on every connection to count the live ones")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := cm.check("ws", "wss"); err != nil {
		return err
	}
	if *n <= 0 {
		return errors.New("-n is required: the number of connections to hold")
	}
	if *hold < 0 || *hold > time.Hour {
		return errors.New("-hold: want 0..1h")
	}
	if *c <= 0 || *c > 10000 {
		return errors.New("-c: want 1..10000")
	}
	soft, hard := nofile()
	fmt.Fprintf(stderr, "stickybench idle: nofile soft=%d hard=%d\n", soft, hard)
	const reserve = 64
	if uint64(*n)+reserve > soft {
		return fmt.Errorf("-n %d does not fit this process's open-file limit: soft=%d hard=%d, and %d fds are kept for other use; lower -n (or raise the hard limit, e.g. ulimit -Hn / LimitNOFILE)", *n, soft, hard, reserve)
	}
	steps, err := parseSteps(*stepList)
	if err != nil {
		return err
	}
	if len(steps) == 0 {
		steps = []int{*n / 2, *n}
		if *n/2 == 0 {
			steps = []int{*n}
		}
	}
	if steps[len(steps)-1] > *n {
		return fmt.Errorf("-steps: last step %d is above -n %d", steps[len(steps)-1], *n)
	}
	if steps[len(steps)-1] != *n {
		steps = append(steps, *n)
	}
	pids, err := parsePIDs(*pidList)
	if err != nil {
		return err
	}
	res := &idleResult{Mode: "idle", URL: cm.url, N: *n, Sources: cm.sources, NofileSoft: soft, NofileHard: hard, PIDs: pids, Tree: *tree}
	for _, p := range pids {
		lim, err := procNofile(p)
		if err != nil {
			return fmt.Errorf("-pid %d: %v", p, err)
		}
		res.TargetNofile = append(res.TargetNofile, lim)
		if lim > 0 && int64(*n)+reserve > lim {
			fmt.Fprintf(stderr, "stickybench idle: warning: pid %d has an open-file soft limit of %d, below -n %d plus overhead; a proxy needs 2 fds per connection\n", p, lim, *n)
		}
	}
	sample := func(conns int64) (idleSample, error) {
		s := idleSample{Conns: conns}
		if len(pids) == 0 {
			return s, nil
		}
		s.ByPID = map[string]int64{}
		seen := map[int]bool{}
		for _, top := range pids {
			group := []int{top}
			if *tree {
				group = withDescendants(group, pids...) // a listed pid is its own group
			}
			for _, p := range group {
				if seen[p] {
					continue
				}
				seen[p] = true
				rss, err := procRSS(p)
				if err != nil {
					if p == top {
						return s, fmt.Errorf("pid %d: %v", p, err)
					}
					continue // a descendant that just exited
				}
				fds, _ := procFDs(p)
				s.Procs++
				s.RSSKiB += rss
				s.FDs += fds
				s.ByPID[strconv.Itoa(top)] += rss
			}
		}
		return s, nil
	}
	if len(pids) > 0 {
		b, err := sample(0)
		if err != nil {
			return err
		}
		res.Baseline = &b
	}

	d := newWSDialer(&cm)
	errs := newErrSample()
	conns := make([]*websocket.Conn, 0, *n)
	var mu sync.Mutex
	var held atomic.Int64
	var rec recorder
	stop := progress(cm.quiet, "idle", func() string {
		return fmt.Sprintf("held=%d errors=%d of %d", held.Load(), errs.n.Load(), *n)
	})
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	opened := 0
	start := time.Now()
	var openTime time.Duration
	for _, step := range steps {
		var wg sync.WaitGroup
		var next atomic.Int64
		next.Store(int64(opened))
		for range min(*c, step-opened) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var lat []time.Duration
				defer func() { rec.merge(lat) }()
				for next.Add(1) <= int64(step) && ctx.Err() == nil {
					t0 := time.Now()
					conn, _, err := dialWS(ctx, d, cm.url, *hello, cm.timeout)
					if err != nil {
						errs.add(err.Error())
						continue
					}
					lat = append(lat, time.Since(t0))
					mu.Lock()
					conns = append(conns, conn)
					mu.Unlock()
					held.Add(1)
				}
			}()
		}
		t0 := time.Now()
		wg.Wait()
		openTime += time.Since(t0)
		opened = step
		if err := ctx.Err(); err != nil {
			stop()
			return err
		}
		if len(pids) > 0 {
			time.Sleep(*settle)
			s, err := sample(held.Load())
			if err != nil {
				stop()
				return err
			}
			res.Steps = append(res.Steps, s)
		}
	}
	_ = start
	if *hold > 0 {
		select {
		case <-ctx.Done():
			stop()
			return ctx.Err()
		case <-time.After(*hold):
		}
		res.HoldSeconds = hold.Seconds()
		if len(pids) > 0 {
			s, err := sample(held.Load())
			if err != nil {
				stop()
				return err
			}
			res.AfterHold = &s
		}
	}
	if *verify {
		res.Alive = verifyAlive(conns, cm.timeout, errs)
	}
	stop()
	res.Held = held.Load()
	res.Errors = errs.n.Load()
	res.ErrorSample = errs.list()
	res.OpenSeconds = round3(openTime.Seconds())
	res.Rate = round1(float64(res.Held) / openTime.Seconds())
	res.latency = rec.summary()
	if k := len(res.Steps); k >= 2 {
		a, b := res.Steps[k-2], res.Steps[k-1]
		res.SlopeFrom, res.SlopeTo = a.Conns, b.Conns
		res.KiBPerConn = round2(slope(float64(a.Conns), float64(a.RSSKiB), float64(b.Conns), float64(b.RSSKiB)))
		res.FDsPerConn = round2(slope(float64(a.Conns), float64(a.FDs), float64(b.Conns), float64(b.FDs)))
		res.KiBByPID = map[string]float64{}
		for k, v := range b.ByPID {
			res.KiBByPID[k] = round2(slope(float64(a.Conns), float64(a.ByPID[k]), float64(b.Conns), float64(v)))
		}
	} else if k == 1 && res.Baseline != nil {
		a, b := *res.Baseline, res.Steps[0]
		res.SlopeFrom, res.SlopeTo = a.Conns, b.Conns
		res.KiBPerConn = round2(slope(0, float64(a.RSSKiB), float64(b.Conns), float64(b.RSSKiB)))
		res.FDsPerConn = round2(slope(0, float64(a.FDs), float64(b.Conns), float64(b.FDs)))
	}
	return emit(out, res)
}

// verifyAlive echoes one short message on every connection, 64 at a time.
func verifyAlive(conns []*websocket.Conn, timeout time.Duration, errs *errSample) int64 {
	var alive atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.SetWriteDeadline(time.Now().Add(timeout))
			if err := c.WriteMessage(websocket.TextMessage, []byte("alive?")); err != nil {
				errs.add("verify write: " + err.Error())
				return
			}
			c.SetReadDeadline(time.Now().Add(timeout))
			if _, msg, err := c.ReadMessage(); err != nil || string(msg) != "alive?" {
				errs.add(fmt.Sprintf("verify read: %v", err))
				return
			}
			alive.Add(1)
		}()
	}
	wg.Wait()
	return alive.Load()
}
