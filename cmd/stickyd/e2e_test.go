//go:build unix

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// stickydBin is the daemon built once per test binary run: the end-to-end tests run it
// as users do, as a separate process with its own workers.
var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func stickydBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "stickyd-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "stickyd")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// daemon is a running stickyd process.
type daemon struct {
	cmd     *exec.Cmd
	addr    string // client address
	metrics string // metrics address
	logs    *syncBuffer
	exited  chan struct{}
	err     error
}

var listenRE = regexp.MustCompile(`msg="edge listening" addr=(\S+)`)
var metricsRE = regexp.MustCompile(`msg="metrics listening" addr=(\S+)`)

// startDaemon runs `stickyd ARGS` on loopback ports chosen by the kernel and waits until
// it serves. dir is the working directory ("" for the package dir).
func startDaemon(t *testing.T, dir string, args ...string) *daemon {
	t.Helper()
	bin := stickydBinary(t)
	full := append([]string{args[0], "-listen", "127.0.0.1:0", "-metrics", "127.0.0.1:0"}, args[1:]...)
	cmd := exec.Command(bin, full...)
	cmd.Dir = dir
	d := &daemon{cmd: cmd, logs: &syncBuffer{}, exited: make(chan struct{})}
	pr, pw := io.Pipe()
	cmd.Stdout = d.logs
	cmd.Stderr = io.MultiWriter(d.logs, pw)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.err = cmd.Wait()
		pw.Close()
		close(d.exited)
	}()
	t.Cleanup(func() {
		d.signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("stickyd logs:\n%s", d.logs.String())
		}
	})
	found := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			// Set once, before found closes: an upgraded edge logs these lines again.
			if m := metricsRE.FindStringSubmatch(line); m != nil && d.addr == "" {
				d.metrics = m[1]
			}
			if m := listenRE.FindStringSubmatch(line); m != nil && d.addr == "" {
				d.addr = m[1]
				close(found)
			}
		}
		io.Copy(io.Discard, pr)
	}()
	select {
	case <-found:
	case <-d.exited:
		t.Fatalf("stickyd exited before serving: %v\n%s", d.err, d.logs.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("stickyd did not start serving\n%s", d.logs.String())
	}
	return d
}

func (d *daemon) signal(sig syscall.Signal) {
	select {
	case <-d.exited:
	default:
		d.cmd.Process.Signal(sig)
	}
}

// workerPids lists the pids of the daemon's workers from its admin API.
func (d *daemon) workers(t *testing.T) []adminWorker {
	t.Helper()
	resp, err := http.Get("http://" + d.metrics + "/admin/workers")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct{ Workers []adminWorker }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out.Workers
}

type adminWorker struct {
	Slot, PID, Sessions int
	State               string
}

// generation is the edge's generation from its admin API (-1 while it does not answer).
func (d *daemon) generation() int {
	resp, err := http.Get("http://" + d.metrics + "/admin/workers")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var v struct{ Generation int }
	json.NewDecoder(resp.Body).Decode(&v)
	return v.Generation
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func TestDemo1000ConcurrentWebSockets(t *testing.T) {
	d := startDaemon(t, "", "demo")
	const n = 1000
	var wg sync.WaitGroup
	errs := make(chan error, n)
	workers := sync.Map{}
	conns := make([]*websocket.Conn, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dl := websocket.Dialer{HandshakeTimeout: 20 * time.Second}
			c, _, err := dl.Dial("ws://"+d.addr+"/ws", nil)
			if err != nil {
				errs <- fmt.Errorf("client %d dial: %w", i, err)
				return
			}
			conns[i] = c
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			var h struct{ Type, Worker string }
			if err := c.ReadJSON(&h); err != nil || h.Type != "hello" {
				errs <- fmt.Errorf("client %d hello: %+v %v", i, h, err)
				return
			}
			workers.Store(h.Worker, true)
			for j := range 3 {
				msg := fmt.Sprintf("client %d message %d", i, j)
				typ := websocket.TextMessage
				if j == 2 {
					typ = websocket.BinaryMessage
				}
				if err := c.WriteMessage(typ, []byte(msg)); err != nil {
					errs <- err
					return
				}
				gt, got, err := c.ReadMessage()
				if err != nil || string(got) != msg || gt != typ {
					errs <- fmt.Errorf("client %d echo %d: %q type %d, %v", i, j, got, gt, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	var failed int
	for err := range errs {
		if failed < 5 {
			t.Error(err)
		}
		failed++
	}
	if failed > 0 {
		t.Fatalf("%d of %d clients failed", failed, n)
	}
	// All 1000 were connected at once and they are all in the workers now: the edge
	// process holds none of them.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) > 100 {
		t.Errorf("the edge holds %d fds with %d WebSockets open; they should live in the workers", len(fds), n)
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

func TestDemoPageInChromium(t *testing.T) {
	d := startDaemon(t, "", "demo")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res := runDemoPage(t, ctx, "http://"+d.addr+"/", 4)
	if res.Connected != 4 || res.Echoed != 4 {
		t.Fatalf("demo page: %+v", res)
	}
	re := regexp.MustCompile(`^worker \d+ \(pid \d+\)$`)
	for _, w := range res.Workers {
		if !re.MatchString(w) {
			t.Errorf("tab shows %q", w)
		}
	}
}

func TestDemoShutdownIsClean(t *testing.T) {
	d := startDaemon(t, "", "demo")
	ws := d.workers(t)
	if len(ws) != 4 {
		t.Fatalf("demo runs %d workers, want 4", len(ws))
	}
	c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.ReadMessage() // hello
	// An idle keep-alive client must not hold shutdown up.
	idle, err := http.Get("http://" + d.addr + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(idle.Body)
	idle.Body.Close()

	start := time.Now()
	d.signal(syscall.SIGINT)
	// The WebSocket's worker closes it with 1001 (going away).
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err = c.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseGoingAway) {
		t.Errorf("WebSocket ended with %v, want close 1001", err)
	}
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("stickyd did not exit after SIGINT")
	}
	if d.err != nil {
		t.Errorf("stickyd exit: %v", d.err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("shutdown took %v", el)
	}
	for _, w := range ws {
		if alive(w.PID) {
			t.Errorf("worker %d (pid %d) outlived the edge", w.Slot, w.PID)
		}
	}
}

func TestListenRefusesTakenAddress(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "1")
	bin := stickydBinary(t)
	out, err := exec.Command(bin, "demo", "-workers", "1", "-listen", d.addr, "-metrics", "").CombinedOutput()
	if err == nil {
		t.Fatal("a second stickyd started on a taken address")
	}
	if !strings.Contains(string(out), d.addr) || !strings.Contains(string(out), "address already in use") {
		t.Fatalf("error does not name the address: %s", out)
	}
}

func TestBadFlagsNameTheFix(t *testing.T) {
	bin := stickydBinary(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run"}, "no worker command"},
		{[]string{"run", "-key", "bogus", "--", "true"}, `-key item "bogus"`},
		{[]string{"run", "-trusted-proxies", "10.0.0.0/99", "--", "true"}, "-trusted-proxies"},
		{[]string{"frobnicate"}, "unknown subcommand"},
		{[]string{"run", "-log-level", "loud", "--", "true"}, "-log-level"},
	} {
		cmd := exec.Command(bin, tc.args...)
		cmd.Env = append(os.Environ(), "STICKYD_LISTEN=127.0.0.1:0", "STICKYD_METRICS=")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("stickyd %v: %v\n%s\nwant an error mentioning %q", tc.args, err, out, tc.want)
		}
	}
}

func TestEnvironmentConfiguresFlags(t *testing.T) {
	bin := stickydBinary(t)
	cmd := exec.Command(bin, "run", "--", "true")
	cmd.Env = append(os.Environ(), "STICKYD_WORKERS=notanumber")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "STICKYD_WORKERS") {
		t.Fatalf("bad STICKYD_WORKERS: %v %s", err, out)
	}
}

// waitFor polls cond until it holds or the deadline passes; for state with no signal to
// wait on (another process's logs, /proc).
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func httpStatus(t *testing.T, method, url string) int {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	if method == http.MethodPost {
		req.Header.Set("X-Stickyd-Admin", "1") // the admin API's guard against cross-site requests
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func TestReadyzFollowsDrainAndAdminListsWorkers(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "2")
	m := "http://" + d.metrics
	if got := httpStatus(t, "GET", m+"/readyz"); got != 200 {
		t.Fatalf("/readyz = %d before drain", got)
	}
	ws := d.workers(t)
	if len(ws) != 2 || ws[0].State != "ready" || ws[0].PID == 0 {
		t.Fatalf("/admin/workers = %+v", ws)
	}
	if got := httpStatus(t, "POST", m+"/admin/drain"); got != 200 {
		t.Fatalf("drain: %d", got)
	}
	if got := httpStatus(t, "GET", m+"/readyz"); got != 503 {
		t.Fatalf("/readyz = %d while draining, want 503", got)
	}
	// Draining is for the orchestrator: clients that still arrive are served.
	c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
	if err != nil {
		t.Fatalf("while draining: %v", err)
	}
	c.Close()
	if got := httpStatus(t, "POST", m+"/admin/undrain"); got != 200 {
		t.Fatalf("undrain: %d", got)
	}
	if got := httpStatus(t, "GET", m+"/readyz"); got != 200 {
		t.Fatalf("/readyz = %d after undrain", got)
	}
	if got := httpStatus(t, "GET", m+"/healthz"); got != 200 {
		t.Fatalf("/healthz = %d", got)
	}
	// The drain subcommand is what a Kubernetes preStop hook runs.
	out, err := exec.Command(stickydBinary(t), "drain", "-url", m+"/admin/drain").CombinedOutput()
	if err != nil {
		t.Fatalf("stickyd drain: %v %s", err, out)
	}
	if got := httpStatus(t, "GET", m+"/readyz"); got != 503 {
		t.Fatalf("/readyz = %d after `stickyd drain`", got)
	}
}

// TestRollingRestartKeepsServing restarts every worker one at a time (SIGHUP) while
// clients connect: each worker is drained and replaced, and no client is refused.
func TestRollingRestartKeepsServing(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "2", "-shutdown-timeout", "2s")
	before := d.workers(t)
	held, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	held.ReadMessage()
	d.signal(syscall.SIGHUP)
	stop := make(chan struct{})
	var failures, served int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for served+failures < 1500 { // bounded: pace, not volume, is what matters here
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			c, _, err := (&websocket.Dialer{HandshakeTimeout: 5 * time.Second}).Dial("ws://"+d.addr+"/ws", nil)
			if err != nil {
				failures++
				continue
			}
			if _, _, err := c.ReadMessage(); err != nil {
				failures++
			} else {
				served++
			}
			c.Close()
		}
	}()
	waitFor(t, "both workers replaced", 30*time.Second, func() bool {
		return strings.Contains(d.logs.String(), "rolling restart done")
	})
	close(stop)
	<-done
	after := d.workers(t)
	for _, a := range after {
		for _, b := range before {
			if a.PID == b.PID {
				t.Errorf("worker %d kept pid %d through a rolling restart", a.Slot, a.PID)
			}
		}
	}
	if failures > 0 {
		t.Errorf("%d of %d connections failed during the rolling restart", failures, failures+served)
	}
	// The WebSocket held on a drained worker ends with 1001 (going away) once its grace is over.
	held.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := held.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseGoingAway) {
		t.Errorf("held WebSocket ended with %v, want 1001", err)
	}
	t.Logf("%d connections served during the restart", served)
}

func edgeFDs(t *testing.T, pid int) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// TestEdgeUpgradeDropsNothing replaces the running edge's image twice (SIGUSR2, then
// `stickyd upgrade`) under 200 live WebSockets and a steady stream of proxied requests:
// no WebSocket drops, no request fails, workers and pid stay, no descriptor leaks.
func TestEdgeUpgradeDropsNothing(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "2")
	pid := d.cmd.Process.Pid
	before := d.workers(t)
	const n = 200
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
		if err != nil {
			t.Fatal(err)
		}
		c.ReadMessage()
		conns[i] = c
		defer c.Close()
	}
	// One keep-alive client connection, idle across the upgrades: the edge parks it and
	// the next image serves its next request on the same TCP connection.
	kc, err := net.Dial("tcp", d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	kbr := bufio.NewReader(kc)
	keepAliveGet := func(when string) {
		t.Helper()
		kc.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(kc, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(kbr, nil)
		if err != nil {
			t.Fatalf("keep-alive request %s: %v", when, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Close {
			t.Fatalf("keep-alive request %s: %s close=%v", when, resp.Status, resp.Close)
		}
	}
	keepAliveGet("before the upgrades")
	// The baseline includes what a keep-alive connection brings once: the idle poller's
	// epoll descriptor (each image makes its own at its first idle connection).
	fds := edgeFDs(t, pid)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var okReqs, failed int
	var firstErr error
	tr := &http.Transport{MaxIdleConnsPerHost: 4}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := &http.Client{Timeout: 10 * time.Second, Transport: tr}
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := cl.Get("http://" + d.addr + "/whoami")
				if err == nil {
					_, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				mu.Lock()
				if err != nil {
					failed++
					if firstErr == nil {
						firstErr = err
					}
				} else {
					okReqs++
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	d.signal(syscall.SIGUSR2)
	waitFor(t, "generation 1", 20*time.Second, func() bool { return d.generation() == 1 })
	out, err := exec.Command(stickydBinary(t), "upgrade", "-url", "http://"+d.metrics).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "generation 2") {
		t.Fatalf("stickyd upgrade: %v %s", err, out)
	}
	time.Sleep(200 * time.Millisecond) // let the request stream run on the new image
	close(stop)
	wg.Wait()
	keepAliveGet("after two upgrades, on the same TCP connection")

	if failed > 0 {
		t.Errorf("%d of %d proxied requests failed across the upgrades; first: %v", failed, failed+okReqs, firstErr)
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		msg := fmt.Sprint("after upgrade ", i)
		if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			t.Fatalf("WebSocket %d: %v", i, err)
		}
		if _, got, err := c.ReadMessage(); err != nil || string(got) != msg {
			t.Fatalf("WebSocket %d after the upgrades: %q %v", i, got, err)
		}
	}
	if d.cmd.Process.Pid != pid {
		t.Fatal("pid changed")
	}
	after := d.workers(t)
	for i := range before {
		if after[i].PID != before[i].PID {
			t.Errorf("worker %d restarted across the upgrade (%d → %d)", i, before[i].PID, after[i].PID)
		}
	}
	// Once the request stream's keep-alive connections are gone (the client's now, the
	// edge's idle virtual connections after their idle timeout), the edge holds what it
	// held before the upgrades.
	tr.CloseIdleConnections()
	kc.Close()
	waitFor(t, "edge fds back to their count before the upgrades", 15*time.Second, func() bool {
		return edgeFDs(t, pid) <= fds
	})
	t.Logf("%d proxied requests served across two upgrades; %d WebSockets kept", okReqs, n)
}

// TestServeModeSidecarWorkers runs the edge in sidecar mode: Go workers started on their
// own dial the control socket. It also upgrades the edge under a live WebSocket.
func TestServeModeSidecarWorkers(t *testing.T) {
	ctl := filepath.Join(t.TempDir(), "run", "ctl.sock")
	d := startDaemon(t, "", "serve", "-control", ctl)
	if fi, err := os.Stat(ctl); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v %v, want mode 0600", fi, err)
	}
	startWorker := func(id string) *exec.Cmd {
		cmd := exec.Command(stickydBinary(t), "demo-worker", "-control", ctl)
		cmd.Env = append(os.Environ(), "STICKYD_WORKER_ID="+id)
		cmd.Stderr = d.logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	wa := startWorker("a")
	waitFor(t, "worker a admitted", 10*time.Second, func() bool { return len(d.workers(t)) == 1 })
	c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var h struct{ Worker string }
	c.ReadJSON(&h)
	if h.Worker != "a" {
		t.Fatalf("hello from %q", h.Worker)
	}
	out, err := exec.Command(stickydBinary(t), "upgrade", "-url", "http://"+d.metrics).CombinedOutput()
	if err != nil {
		t.Fatalf("upgrade: %v %s", err, out)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	c.WriteMessage(websocket.TextMessage, []byte("still there"))
	if _, got, err := c.ReadMessage(); err != nil || string(got) != "still there" {
		t.Fatalf("after the upgrade: %q %v", got, err)
	}
	// The upgraded edge still admits workers and routes to the ones it inherited.
	startWorker("b")
	waitFor(t, "worker b admitted by the upgraded edge", 10*time.Second, func() bool { return len(d.workers(t)) == 2 })
	resp, err := http.Get("http://" + d.addr + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("whoami: %d", resp.StatusCode)
	}
	// A worker whose channel closes (it died) leaves routing at once; when it comes back
	// and dials again, it is routed again.
	wa.Process.Kill()
	wa.Wait()
	waitFor(t, "worker a out of routing", 10*time.Second, func() bool { return len(d.workers(t)) == 1 })
	for range 5 {
		resp, err := http.Get("http://" + d.addr + "/whoami")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("with worker a gone: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	startWorker("a")
	waitFor(t, "worker a back in routing", 10*time.Second, func() bool { return len(d.workers(t)) == 2 })
}
