//go:build unix

package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestPprofBehindAdminGuard: /debug/pprof/ profiles the live edge, with the admin API's
// rules (issue 17): a foreign Host is refused, a POST needs the admin header, and nothing
// is served from http.DefaultServeMux.
func TestPprofBehindAdminGuard(t *testing.T) {
	r := startAdminRig(t, 1, time.Second)
	code, body, h := r.call(t, "GET", "/debug/pprof/", nil)
	if code != 200 || !strings.Contains(body, "goroutine") || h.Get(versionHeader) == "" {
		t.Fatalf("GET /debug/pprof/: %d %q", code, body)
	}
	if code, body, _ := r.call(t, "GET", "/debug/pprof/goroutine?debug=1", nil); code != 200 || !strings.Contains(body, "goroutine profile:") {
		t.Fatalf("GET /debug/pprof/goroutine?debug=1: %d %.200q", code, body)
	}
	if code, body, _ := r.call(t, "GET", "/debug/pprof/heap?debug=1", nil); code != 200 || !strings.Contains(body, "heap profile:") {
		t.Fatalf("GET /debug/pprof/heap?debug=1: %d %.200q", code, body)
	}
	if code, body, _ := r.call(t, "GET", "/debug/pprof/cmdline", nil); code != 200 || body == "" {
		t.Fatalf("GET /debug/pprof/cmdline: %d %q", code, body)
	}
	if code, _, _ := r.call(t, "GET", "/debug/pprof/", map[string]string{"Host": "attacker.example"}); code != http.StatusMisdirectedRequest {
		t.Errorf("GET /debug/pprof/ with a foreign Host: %d, want 421", code)
	}
	if code, _, _ := r.call(t, "POST", "/debug/pprof/symbol", map[string]string{"body": "0x1"}); code != http.StatusForbidden {
		t.Errorf("POST /debug/pprof/symbol without %s: %d, want 403", adminHeader, code)
	}
	if code, _, _ := r.call(t, "POST", "/debug/pprof/symbol", map[string]string{"body": "0x1", adminHeader: "1"}); code != 200 {
		t.Errorf("POST /debug/pprof/symbol with %s: %d, want 200", adminHeader, code)
	}
}

// TestStatusEndpoint: GET /admin/status of a live edge agrees with /admin/workers, counts
// handoffs per worker, and its history charts the rate once load ran; the page and its
// assets are served with a CSP that allows nothing external, behind the admin guard.
func TestStatusEndpoint(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "2")
	get := func(path string, hdr map[string]string) (int, string, http.Header) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+d.metrics+path, nil)
		for k, v := range hdr {
			if k == "Host" {
				req.Host = v
			}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header
	}
	read := func() statusDoc {
		t.Helper()
		code, body, _ := get("/admin/status", nil)
		if code != 200 {
			t.Fatalf("GET /admin/status: %d %s", code, body)
		}
		var sd statusDoc
		if err := json.Unmarshal([]byte(body), &sd); err != nil {
			t.Fatal(err)
		}
		return sd
	}
	before := read()
	if !before.Stickyd || len(before.Workers) != 2 || before.Edge.PID != d.cmd.Process.Pid || before.Edge.Uptime == nil || !before.Edge.Ready {
		t.Fatalf("status: %+v", before)
	}
	for i, w := range d.workers(t) {
		s := before.Workers[i]
		if s.Slot != w.Slot || s.PID != w.PID || s.State != w.State || s.Sessions != w.Sessions || s.Uptime == nil {
			t.Errorf("status worker %+v, /admin/workers %+v", s, w)
		}
	}
	const n = 6
	var conns []*websocket.Conn
	for range n {
		c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Samples are taken at most once a second on demand (and every 2 s in the edge):
	// wait for one after the handoffs, so the history has their rate.
	var after statusDoc
	waitFor(t, "a status sample with the handoffs", 10*time.Second, func() bool {
		after = read()
		for _, v := range after.History.Handoffs {
			if v > 0 {
				return true
			}
		}
		return false
	})
	var handoffs float64
	var websockets int64
	for _, w := range after.Workers {
		handoffs += w.Handoffs
		websockets += w.WebSockets
	}
	if after.Edge.Handoffs-before.Edge.Handoffs != n || handoffs != after.Edge.Handoffs || after.Edge.Connections["handed_off"] < n {
		t.Errorf("handoffs: edge %v → %v, per worker sum %v, connections %v; want +%d", before.Edge.Handoffs, after.Edge.Handoffs, handoffs, after.Edge.Connections, n)
	}
	if len(after.History.T) == 0 || len(after.History.Sessions) != 2 || len(after.History.Sessions["0"]) != len(after.History.T) {
		t.Errorf("history after %d handoffs: %+v", n, after.History)
	}
	for _, p := range []string{"/", "/status.js", "/status.css"} {
		code, body, h := get(p, nil)
		if code != 200 || !strings.Contains(h.Get("Content-Security-Policy"), "default-src 'none'") || len(body) < 100 {
			t.Errorf("GET %s: %d, CSP %q", p, code, h.Get("Content-Security-Policy"))
		}
		// The SVG namespace is a name, not a fetch.
		if strings.Contains(strings.ReplaceAll(body, "http://www.w3.org/2000/svg", ""), "://") {
			t.Errorf("GET %s refers to an external address", p)
		}
	}
	if code, _, _ := get("/", map[string]string{"Host": "attacker.example"}); code != http.StatusMisdirectedRequest {
		t.Errorf("GET / with a foreign Host: %d, want 421", code)
	}
	// The live edge's profiles, as `go tool pprof http://ADDR/debug/pprof/heap` reads them.
	if code, body, _ := get("/debug/pprof/heap?debug=1", nil); code != 200 || !strings.Contains(body, "heap profile:") {
		t.Errorf("GET /debug/pprof/heap of the edge: %d %.100q", code, body)
	}
	if code, body, _ := get("/debug/pprof/profile?seconds=1", nil); code != 200 || len(body) < 100 {
		t.Errorf("GET /debug/pprof/profile of the edge: %d, %d bytes", code, len(body))
	}
}

// TestMetricsDefaultIsLoopback: -metrics defaults to the client commands' default address,
// on loopback, off Prometheus's 9090.
func TestMetricsDefaultIsLoopback(t *testing.T) {
	for _, mode := range []string{"demo", "run", "serve"} {
		fs := flag.NewFlagSet(mode, flag.ContinueOnError)
		var f edgeFlags
		f.register(fs, mode)
		def := fs.Lookup("metrics").DefValue
		host, port, err := net.SplitHostPort(def)
		if err != nil || def != defaultAdmin || !net.ParseIP(host).IsLoopback() || port == "9090" {
			t.Errorf("%s: -metrics default %q, want %q on loopback", mode, def, defaultAdmin)
		}
	}
}

// TestMetricsPortTakenNamesTheFix: a taken -metrics port fails the start with the flag
// that moves it.
func TestMetricsPortTakenNamesTheFix(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	out, err := exec.Command(stickydBinary(t), "demo", "-workers", "1", "-listen", "127.0.0.1:0", "-metrics", taken.Addr().String()).CombinedOutput()
	want := "-metrics " + taken.Addr().String() + " is in use"
	if err == nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "pick another with -metrics ADDR") {
		t.Fatalf("stickyd with a taken metrics port: %v\n%s\nwant %q and the fix", err, out, want)
	}
}

// notifySocket is a unixgram socket standing in for systemd's NOTIFY_SOCKET.
type notifySocket struct {
	path string
	msgs chan string
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	// A short path: sun_path holds 108 bytes and t.TempDir() can be long.
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ns := &notifySocket{path: filepath.Join(dir, "notify"), msgs: make(chan string, 1024)}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: ns.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(ns.msgs)
				return
			}
			ns.msgs <- string(buf[:n])
		}
	}()
	return ns
}

// wait returns the next message containing want, skipping others (watchdog pings).
func (ns *notifySocket) wait(t *testing.T, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m, ok := <-ns.msgs:
			if !ok {
				t.Fatalf("notify socket closed waiting for %q", want)
			}
			if strings.Contains(m, want) {
				return m
			}
		case <-deadline:
			t.Fatalf("no sd_notify message with %q within %v", want, timeout)
		}
	}
}

// TestSdNotify: the edge tells systemd (Type=notify) when it serves, reloads, upgrades and
// stops, with a STATUS line, and pings the watchdog when WatchdogSec= asks for it.
func TestSdNotify(t *testing.T) {
	ns := listenNotify(t)
	d := startDaemonEnv(t, "", []string{"NOTIFY_SOCKET=" + ns.path, "WATCHDOG_USEC=200000"}, "demo", "-workers", "2", "-shutdown-timeout", "5s")
	ready := ns.wait(t, "READY=1", 10*time.Second)
	if !strings.Contains(ready, "STATUS=") || !strings.Contains(ready, "MAINPID="+strconv.Itoa(d.cmd.Process.Pid)) {
		t.Errorf("ready message %q: want STATUS= and MAINPID=", ready)
	}
	ns.wait(t, "WATCHDOG=1", 5*time.Second)
	ns.wait(t, "WATCHDOG=1", 5*time.Second)

	d.signal(syscall.SIGHUP) // rolling restart (and a reload of the settings)
	if m := ns.wait(t, "RELOADING=1", 10*time.Second); !strings.Contains(m, "MONOTONIC_USEC=") {
		t.Errorf("reload message %q: want MONOTONIC_USEC=", m)
	}
	ns.wait(t, "READY=1", 60*time.Second)

	d.signal(syscall.SIGUSR2) // edge upgrade: the new image reports READY=1 itself
	ns.wait(t, "RELOADING=1", 10*time.Second)
	if m := ns.wait(t, "READY=1", 60*time.Second); !strings.Contains(m, "generation 1") {
		t.Errorf("after the upgrade: %q, want the new generation in STATUS", m)
	}

	d.signal(syscall.SIGTERM)
	ns.wait(t, "STOPPING=1", 10*time.Second)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("edge did not stop")
	}
}

// TestSocketActivation: started by a systemd socket unit, the edge serves on the sockets it
// inherits (LISTEN_FDS, named by LISTEN_FDNAMES: "admin" for -metrics) instead of binding
// -listen and -metrics (here both taken, so a bind would fail), and its workers inherit
// neither the sockets nor the variables.
func TestSocketActivation(t *testing.T) {
	client, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	admin, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := client.(*net.TCPListener).File()
	af, _ := admin.(*net.TCPListener).File()
	clientAddr, adminAddr := client.Addr().String(), admin.Addr().String()
	// LISTEN_PID must be the edge's pid, known only after the fork: the shell sets it to
	// its own and execs stickyd in its place, as systemd does for the service it starts.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, stickydBinary(t), "demo", "-workers", "1",
		"-listen", clientAddr, "-metrics", adminAddr)
	cmd.ExtraFiles = []*os.File{cf, af}
	cmd.Env = append(os.Environ(), "LISTEN_FDS=2", "LISTEN_FDNAMES=web:admin")
	logs := &syncBuffer{}
	pr, pw := io.Pipe()
	cmd.Stderr = io.MultiWriter(logs, pw)
	cmd.Stdout = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Only the edge holds the sockets now.
	cf.Close()
	af.Close()
	client.Close()
	admin.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); pw.Close(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("stickyd logs:\n%s", logs.String())
		}
	})
	serving := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		once := false
		for sc.Scan() {
			if !once && strings.Contains(sc.Text(), `msg="edge listening"`) {
				once = true
				close(serving)
			}
		}
	}()
	select {
	case <-serving:
	case <-exited:
		t.Fatalf("stickyd exited: %s", logs.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("stickyd did not serve: %s", logs.String())
	}
	resp, err := http.Get("http://" + adminAddr + "/admin/workers")
	if err != nil {
		t.Fatal(err)
	}
	var wl struct{ Workers []adminWorker }
	json.NewDecoder(resp.Body).Decode(&wl)
	resp.Body.Close()
	if resp.Header.Get(versionHeader) == "" || len(wl.Workers) != 1 {
		t.Fatalf("admin API on the inherited socket: %s %+v", resp.Status, wl)
	}
	c, _, err := websocket.DefaultDialer.Dial("ws://"+clientAddr+"/ws", nil)
	if err != nil {
		t.Fatalf("WebSocket through the inherited client socket: %v", err)
	}
	c.WriteMessage(websocket.TextMessage, []byte("hello"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, msg, err := c.ReadMessage(); err != nil || !strings.Contains(string(msg), "hello") {
		t.Errorf("echo through the inherited socket: %q %v", msg, err)
	}
	c.Close()
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", wl.Workers[0].PID))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(env), "LISTEN_FDS=") || strings.Contains(string(env), "LISTEN_PID=") {
		t.Errorf("the worker inherited the socket-activation variables")
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", wl.Workers[0].PID))
	for _, fd := range fds {
		if n, _ := strconv.Atoi(fd.Name()); n == 3 || n == 4 {
			// fds 3 and 4 of a worker are its own (channel, preload…), never a listening
			// socket of the edge: check it is not one of ours.
			if link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", wl.Workers[0].PID, n)); strings.HasPrefix(link, "socket:") && listening(t, wl.Workers[0].PID, link) {
				t.Errorf("worker fd %d is a listening socket (%s): the inherited sockets leaked to the worker", n, link)
			}
		}
	}
}

// listening reports whether the socket inode in link ("socket:[N]") is a listening TCP
// socket on this host (state 0A in /proc/net/tcp).
func listening(t *testing.T, pid int, link string) bool {
	inode := strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")
	for _, f := range []string{"tcp", "tcp6"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		for _, line := range strings.Split(string(b), "\n") {
			fl := strings.Fields(line)
			if len(fl) > 9 && fl[9] == inode && fl[3] == "0A" {
				return true
			}
		}
	}
	return false
}

// TestJSONLogsWrapWorkerOutput: with -log-format json every line on the edge's stderr is
// one JSON record, worker output included: each line a worker prints is a record with
// worker, pid, stream and msg — not a raw "[worker N] …" line in the JSON stream.
func TestJSONLogsWrapWorkerOutput(t *testing.T) {
	bin := stickydBinary(t)
	cmd := exec.Command(bin, "run", "-log-format", "json", "-workers", "2", "-listen", "127.0.0.1:0", "-metrics", "127.0.0.1:0", "--",
		"sh", "-c", `echo "to stdout from $STICKYD_WORKER_ID"; echo 'to stderr, with "quotes"' >&2; exec "$0" demo-worker`, bin)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	type rec struct {
		Msg    string `json:"msg"`
		Level  string `json:"level"`
		Worker *int   `json:"worker"`
		PID    int    `json:"pid"`
		Stream string `json:"stream"`
		Addr   string `json:"addr"`
	}
	var recs []rec
	parse := func() (bool, string) {
		recs = recs[:0]
		all := out.String()
		all = all[:strings.LastIndexByte(all, '\n')+1] // complete lines only
		for _, l := range strings.Split(all, "\n") {
			if l == "" {
				continue
			}
			var r rec
			if err := json.Unmarshal([]byte(l), &r); err != nil {
				return false, l
			}
			recs = append(recs, r)
		}
		return true, ""
	}
	var metrics string
	waitFor(t, "both workers' output and the metrics address", 30*time.Second, func() bool {
		ok, bad := parse()
		if !ok {
			t.Fatalf("a line of the edge's output is not JSON: %q\n%s", bad, out.String())
		}
		n := 0
		for _, r := range recs {
			if r.Msg == "metrics listening" {
				metrics = r.Addr
			}
			if r.Stream != "" {
				n++
			}
		}
		return n >= 4 && metrics != ""
	})
	// A worker writes its lines before it is ready: wait until the edge lists both.
	pids := map[int]int{}
	waitFor(t, "both workers in /admin/workers", 30*time.Second, func() bool {
		resp, err := http.Get("http://" + metrics + "/admin/workers")
		if err != nil {
			t.Fatal(err)
		}
		var wl struct{ Workers []adminWorker }
		json.NewDecoder(resp.Body).Decode(&wl)
		resp.Body.Close()
		clear(pids)
		for _, w := range wl.Workers {
			if w.PID != 0 {
				pids[w.Slot] = w.PID
			}
		}
		return len(pids) == 2
	})
	seen := map[string]bool{}
	for _, r := range recs {
		if r.Stream == "" {
			continue
		}
		if r.Worker == nil || r.PID == 0 || r.Level != "INFO" {
			t.Errorf("worker record %+v: want worker, pid and level", r)
			continue
		}
		// The shell execs the worker: its pid is the worker's.
		if pids[*r.Worker] != r.PID {
			t.Errorf("record %+v: worker %d has pid %d", r, *r.Worker, pids[*r.Worker])
		}
		seen[fmt.Sprintf("%d %s %s", *r.Worker, r.Stream, r.Msg)] = true
	}
	for _, want := range []string{"0 stdout to stdout from 0", "1 stdout to stdout from 1", `0 stderr to stderr, with "quotes"`, `1 stderr to stderr, with "quotes"`} {
		if !seen[want] {
			t.Errorf("no record %q in %v", want, seen)
		}
	}
	if strings.Contains(out.String(), "[worker ") {
		t.Errorf("raw worker lines in the JSON stream:\n%s", out.String())
	}
}
