//go:build unix

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// memSample is what the edge holds at one point: its RSS, and its Go heap and goroutine
// stacks after a forced garbage collection (from the admin port's /debug/pprof/heap).
type memSample struct {
	Conns      int   `json:"conns"`
	RSSKiB     int64 `json:"rss_kib"`
	HeapInuse  int64 `json:"heap_inuse"`
	StackInuse int64 `json:"stack_inuse"`
	Objects    int64 `json:"heap_objects"`
}

type memSlope struct {
	What          string      `json:"what"`
	Samples       []memSample `json:"samples"`
	RSSKiBPerConn float64     `json:"rss_kib_per_conn"`
	// HeapStackBytesPerConn is the slope of heap + stacks after GC between the last two
	// samples: what stays per connection, without the allocator's and the GC's slack.
	HeapStackBytesPerConn float64 `json:"heap_stack_bytes_per_conn"`
}

type memoryResult struct {
	Mode    string     `json:"mode"`
	EdgePID int        `json:"edge_pid"`
	Base    memSample  `json:"base"`
	Slopes  []memSlope `json:"slopes"`
}

// runMemory starts `stickyd demo` and measures what the edge keeps per idle handed-off
// WebSocket (issue 17 target 2) and per idle keep-alive client connection after one
// proxied request (target 4): samples at half and all of each count, slope between them.
func runMemory(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("memory", flag.ContinueOnError)
	bin := fs.String("stickyd", "/tmp/stickyd", "stickyd binary (go build -o /tmp/stickyd ./cmd/stickyd)")
	nWS := fs.Int("ws", 10000, "idle WebSockets (handed off to the demo's workers); sampled at half and all")
	nKA := fs.Int("keepalive", 1000, "idle keep-alive client connections after one GET /whoami each; sampled at half and all")
	conc := fs.Int("c", 64, "concurrency while opening")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *nWS < 2 || *nKA < 2 || *nWS > 100000 || *nKA > 100000 || *conc < 1 || *conc > 1000 {
		return errors.New("-ws and -keepalive: want 2..100000, -c 1..1000")
	}
	soft, _ := nofile()
	if uint64(max(*nWS, *nKA))+128 > soft {
		return fmt.Errorf("-ws/-keepalive do not fit this process's open-file limit %d; lower them or raise ulimit -n", soft)
	}
	if !isExec(*bin) {
		return fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", *bin, *bin)
	}
	p, err := freePort()
	if err != nil {
		return err
	}
	mp, err := freePort()
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	admin := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(mp))
	cmd := exec.Command(*bin, "demo", "-listen", addr, "-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn")
	cmd.Stdout, cmd.Stderr = stderr, stderr
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	wsURL := "ws://" + addr + "/ws"
	if err := waitReady(ctx, wsURL); err != nil {
		return err
	}
	pid := cmd.Process.Pid
	sample := func(n int) (memSample, error) {
		s := memSample{Conns: n}
		// Twice: sync.Pool keeps what it holds across one collection.
		for range 2 {
			if err := readMemStats(ctx, admin, &s); err != nil {
				return s, err
			}
		}
		rss, err := procRSS(pid)
		s.RSSKiB = rss
		return s, err
	}
	res := memoryResult{Mode: "memory", EdgePID: pid}
	if res.Base, err = sample(0); err != nil {
		return err
	}

	// Idle handed-off WebSockets.
	d := &websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	var wsConns []*websocket.Conn
	var mu sync.Mutex
	ws := memSlope{What: "idle handed-off WebSocket"}
	for _, target := range []int{*nWS / 2, *nWS} {
		if err := openN(ctx, target-len(wsConns), *conc, func() error {
			c, _, err := dialWS(ctx, d, wsURL, true, 10*time.Second)
			if err == nil {
				mu.Lock()
				wsConns = append(wsConns, c)
				mu.Unlock()
			}
			return err
		}); err != nil {
			return err
		}
		s, err := sample(len(wsConns))
		if err != nil {
			return err
		}
		ws.Samples = append(ws.Samples, s)
		fmt.Fprintf(stderr, "stickybench memory: %d WebSockets: rss %d KiB, heap %d, stacks %d\n", s.Conns, s.RSSKiB, s.HeapInuse, s.StackInuse)
	}
	for _, c := range wsConns {
		c.Close()
	}
	res.Slopes = append(res.Slopes, ws.slope())

	// Idle keep-alive client connections after one proxied request.
	var kaConns []net.Conn
	ka := memSlope{What: "idle keep-alive client connection"}
	for _, target := range []int{*nKA / 2, *nKA} {
		if err := openN(ctx, target-len(kaConns), *conc, func() error {
			c, err := keepAliveGET(addr)
			if err == nil {
				mu.Lock()
				kaConns = append(kaConns, c)
				mu.Unlock()
			}
			return err
		}); err != nil {
			return err
		}
		s, err := sample(len(kaConns))
		if err != nil {
			return err
		}
		ka.Samples = append(ka.Samples, s)
		fmt.Fprintf(stderr, "stickybench memory: %d keep-alive connections: rss %d KiB, heap %d, stacks %d\n", s.Conns, s.RSSKiB, s.HeapInuse, s.StackInuse)
	}
	for _, c := range kaConns {
		c.Close()
	}
	res.Slopes = append(res.Slopes, ka.slope())
	for _, s := range res.Slopes {
		fmt.Fprintf(stderr, "stickybench memory: per %s: %.0f bytes of heap and stacks after GC, RSS slope %.2f KiB\n", s.What, s.HeapStackBytesPerConn, s.RSSKiBPerConn)
	}
	return json.NewEncoder(out).Encode(res)
}

func (m memSlope) slope() memSlope {
	a, b := m.Samples[len(m.Samples)-2], m.Samples[len(m.Samples)-1]
	n := float64(b.Conns - a.Conns)
	m.RSSKiBPerConn = float64(b.RSSKiB-a.RSSKiB) / n
	m.HeapStackBytesPerConn = float64(b.HeapInuse+b.StackInuse-a.HeapInuse-a.StackInuse) / n
	return m
}

// openN runs open n times, conc at once, and returns the first error.
func openN(ctx context.Context, n, conc int, open func() error) error {
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	jobs := make(chan struct{})
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				if err := open(); err != nil {
					once.Do(func() { first = err })
				}
			}
		}()
	}
	for range n {
		if ctx.Err() != nil || first != nil {
			break
		}
		jobs <- struct{}{}
	}
	close(jobs)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// keepAliveGET opens a connection, sends GET /whoami and reads the whole answer; the
// connection stays open (HTTP/1.1 keep-alive).
func keepAliveGET(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /whoami HTTP/1.1\r\nHost: stickybench\r\n\r\n"); err != nil {
		c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(c, 1024), nil)
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err == nil && (resp.StatusCode != 200 || resp.Close) {
			err = fmt.Errorf("GET /whoami: %s, close %v", resp.Status, resp.Close)
		}
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// readMemStats fills s from the "# Name = value" lines of /debug/pprof/heap?debug=1,
// which runs a garbage collection first (gc=1).
func readMemStats(ctx context.Context, admin string, s *memSample) error {
	req, err := http.NewRequestWithContext(ctx, "GET", admin+"/debug/pprof/heap?gc=1&debug=1", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s/debug/pprof/heap: %s", admin, resp.Status)
	}
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	found := 0
	for sc.Scan() {
		name, val, ok := strings.Cut(strings.TrimPrefix(sc.Text(), "# "), " = ")
		if !ok {
			continue
		}
		val, _, _ = strings.Cut(val, " / ") // "# Stack = inuse / sys"
		v, err := strconv.ParseInt(val, 10, 64)
		if err != nil {
			continue
		}
		switch name {
		case "HeapInuse":
			s.HeapInuse, found = v, found+1
		case "Stack":
			s.StackInuse, found = v, found+1
		case "HeapObjects":
			s.Objects = v
		}
	}
	if found < 2 {
		return fmt.Errorf("%s/debug/pprof/heap?debug=1: no HeapInuse and Stack lines", admin)
	}
	return sc.Err()
}
