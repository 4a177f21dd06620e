//go:build unix

package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// poolBackend is a backend on loopback that names itself and, for /slow, holds its answer
// until release closes, counting the requests it holds at once.
type poolBackend struct {
	name    string
	addr    string
	release chan struct{}
	mu      sync.Mutex
	held    int
	maxHeld int
}

func startPoolBackend(t *testing.T, name string) *poolBackend {
	t.Helper()
	pb := &poolBackend{name: name, release: make(chan struct{})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pb.addr = ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/reports/") {
			pb.mu.Lock()
			pb.held++
			pb.maxHeld = max(pb.maxHeld, pb.held)
			pb.mu.Unlock()
			<-pb.release
			pb.mu.Lock()
			pb.held--
			pb.mu.Unlock()
		}
		fmt.Fprintf(w, "%s %s", pb.name, r.URL.Path)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return pb
}

func (pb *poolBackend) holding() int {
	pb.mu.Lock()
	defer pb.mu.Unlock()
	return pb.held
}

// In proxy mode a pool is a fixed list of backends: its requests go there and nowhere
// else, at most concurrency at a time on each, the rest queued; beyond the queue, 503
// with Retry-After.
func TestProxyPoolOfBackends(t *testing.T) {
	main := startPoolBackend(t, "main")
	rep := startPoolBackend(t, "reports")
	d := startDaemon(t, "", "proxy", "-backend", main.addr,
		"-pool", "reports:path=/reports/,backend="+rep.addr+",concurrency=1,queue=1,queue-timeout=20s")
	get := func(path string) (int, string, string) {
		tr := &http.Transport{DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get("http://" + d.addr + path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
			return 0, "", ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header.Get("Retry-After")
	}
	if code, body, _ := get("/app"); code != 200 || body != "main /app" {
		t.Fatalf("default pool: %d %q", code, body)
	}
	done := make(chan string, 2)
	go func() { _, body, _ := get("/reports/a"); done <- body }()
	waitFor(t, "the first report held by the pool's backend", 10*time.Second, func() bool { return rep.holding() == 1 })
	go func() { _, body, _ := get("/reports/b"); done <- body }()
	waitFor(t, "the second report queued", 10*time.Second, func() bool {
		return strings.Contains(httpBody(t, "http://"+d.metrics+"/metrics"), `stickyd_pool_queue_length{pool="reports"} 1`)
	})
	if code, _, retry := get("/reports/c"); code != 503 || retry == "" {
		t.Errorf("beyond the queue: %d Retry-After %q, want 503 with Retry-After", code, retry)
	}
	if code, body, _ := get("/app"); code != 200 || body != "main /app" {
		t.Errorf("the default pool while reports are saturated: %d %q", code, body)
	}
	close(rep.release)
	for range 2 {
		if body := <-done; !strings.HasPrefix(body, "reports /reports/") {
			t.Errorf("report answered by %q, want the pool's backend", body)
		}
	}
	if rep.maxHeld != 1 || main.maxHeld != 0 {
		t.Errorf("held at once: pool backend %d (want 1), default backend %d (want 0)", rep.maxHeld, main.maxHeld)
	}
}

func httpBody(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
