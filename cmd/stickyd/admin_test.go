//go:build unix

package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/sticky"
)

// adminRig is the real admin handler on a loopback listener, in front of a real
// balancer whose workers are real `stickyd demo-worker` processes.
type adminRig struct {
	b     *balancer.Balancer
	sup   *workers.Supervisor
	admin string // http://127.0.0.1:port
	edge  string // client address
	logs  *syncBuffer
}

func startAdminRig(t *testing.T, nWorkers int, drainGrace time.Duration) *adminRig {
	t.Helper()
	r := &adminRig{logs: &syncBuffer{}}
	log := slog.New(slog.NewTextHandler(r.logs, nil))
	// Session ids only: with the default client-IP fallback every test request (all from
	// 127.0.0.1) would stick to one worker.
	sources, err := sticky.ParseSources("sid")
	if err != nil {
		t.Fatal(err)
	}
	r.b = balancer.New(balancer.Config{Rules: sticky.Rules{Sources: sources}, Logger: log})
	lns, err := (balancer.ListenConfig{}).Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.edge = lns[0].Addr().String()
	served := make(chan struct{})
	go func() { r.b.Serve(lns[0]); close(served) }()
	r.sup = &workers.Supervisor{
		Edge:         r.b,
		Command:      []string{stickydBinary(t), "demo-worker"},
		Workers:      nWorkers,
		SpawnTimeout: 20 * time.Second,
		GracePeriod:  3 * time.Second,
		DrainGrace:   drainGrace,
		Stdout:       r.logs,
		Stderr:       r.logs,
		Logger:       log,
	}
	ctx, stop := context.WithCancel(context.Background())
	supDone := make(chan struct{})
	go func() { r.sup.Run(ctx); close(supDone) }()
	select {
	case <-r.sup.Ready():
	case <-time.After(30 * time.Second):
		stop()
		t.Fatalf("workers not ready\n%s", r.logs.String())
	}
	aln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.admin = "http://" + aln.Addr().String()
	srv := &http.Server{Handler: adminHandler(r.b, r.sup, prometheus.NewRegistry(), false, log, 0, make(chan struct{}, 1))}
	go srv.Serve(aln)
	t.Cleanup(func() {
		srv.Close()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r.b.Shutdown(sctx)
		<-served
		stop()
		<-supDone
		if t.Failed() {
			t.Logf("logs:\n%s", r.logs.String())
		}
	})
	return r
}

// call sends one request to the admin port and returns status, body and headers.
func (r *adminRig) call(t *testing.T, method, path string, hdr map[string]string) (int, string, http.Header) {
	t.Helper()
	var body io.Reader
	if v := hdr["body"]; v != "" {
		body = strings.NewReader(v)
	}
	req, err := http.NewRequest(method, r.admin+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		switch k {
		case "body":
		case "Host":
			req.Host = v
		default:
			req.Header.Set(k, v)
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

var admin1 = map[string]string{adminHeader: "1"}

func (r *adminRig) states() map[int]string {
	out := map[int]string{}
	for _, w := range r.b.Workers() {
		out[w.Slot] = w.State().String()
	}
	return out
}

// TestAdminRefusesCrossSiteRequests: a page on any site can make the operator's browser
// POST a form to 127.0.0.1:9090 (the peer is then loopback). The admin API must refuse
// it, and every other request a browser can send cross-site, and change nothing.
func TestAdminRefusesCrossSiteRequests(t *testing.T) {
	r := startAdminRig(t, 2, 2*time.Second)
	pids := r.sup.Pids()
	form := map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example", "body": "x=1"}
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		want string
	}{
		{"cross-site form POST", form, "cross-origin"},
		{"form POST, old browser without Origin", map[string]string{"Content-Type": "application/x-www-form-urlencoded", "body": "x=1"}, adminHeader + ": 1"},
		{"header but foreign Origin", map[string]string{adminHeader: "1", "Origin": "http://evil.example"}, "cross-origin"},
		{"header but Origin null", map[string]string{adminHeader: "1", "Origin": "null"}, "cross-origin"},
		{"Sec-Fetch-Site cross-site", map[string]string{adminHeader: "1", "Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"},
		{"Sec-Fetch-Site same-site", map[string]string{adminHeader: "1", "Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site"},
		{"plain POST without the header", nil, adminHeader + ": 1"},
		{"header value not 1", map[string]string{adminHeader: "yes"}, adminHeader + ": 1"},
	} {
		for _, path := range []string{"/admin/drain", "/admin/drain/0", "/admin/restart/1", "/admin/restart", "/admin/upgrade"} {
			code, body, h := r.call(t, "POST", path, tc.hdr)
			if code != http.StatusForbidden || !strings.Contains(body, tc.want) || strings.Count(strings.TrimSpace(body), "\n") != 0 {
				t.Errorf("%s to %s: %d %q, want 403 naming %q in one line", tc.name, path, code, body, tc.want)
			}
			if h.Get(versionHeader) == "" {
				t.Errorf("%s to %s: refusal without %s", tc.name, path, versionHeader)
			}
		}
	}
	if !r.b.Ready() {
		t.Error("the edge is draining after refused requests")
	}
	for slot, st := range r.states() {
		if st != "ready" {
			t.Errorf("worker %d is %s after refused requests", slot, st)
		}
	}
	for slot, pid := range r.sup.Pids() {
		if pids[slot] != pid {
			t.Errorf("worker %d restarted by a refused request", slot)
		}
	}
	// What the stickyd client and curl with the header send goes through, also from a
	// same-origin page (the operator's own tab on the admin address).
	host := strings.TrimPrefix(r.admin, "http://")
	if code, body, _ := r.call(t, "POST", "/admin/drain/0", map[string]string{adminHeader: "1", "Origin": r.admin, "Sec-Fetch-Site": "same-origin"}); code != 200 {
		t.Fatalf("same-origin drain with the header: %d %s", code, body)
	}
	if code, body, _ := r.call(t, "POST", "/admin/undrain/0", map[string]string{adminHeader: "1", "Host": strings.ToUpper("localhost") + ":" + host[strings.LastIndex(host, ":")+1:]}); code != 200 {
		t.Fatalf("undrain with the header: %d %s", code, body)
	}
}

// TestAdminRefusesForeignHost: a DNS name an attacker rebinds to 127.0.0.1 arrives with
// that name as Host; the open endpoints stay open for any Host.
func TestAdminRefusesForeignHost(t *testing.T) {
	r := startAdminRig(t, 1, time.Second)
	port := r.admin[strings.LastIndex(r.admin, ":")+1:]
	for _, host := range []string{"attacker.example", "attacker.example:" + port, "localhost.attacker.example", "127.0.0.1.nip.io:" + port, ""} {
		code, body, h := r.call(t, "GET", "/admin/workers", map[string]string{"Host": host})
		if host == "" {
			// Go's client sends the URL's host when Host is empty: nothing to test there.
			continue
		}
		if code != http.StatusMisdirectedRequest || !strings.Contains(body, "IP address") || h.Get(versionHeader) == "" {
			t.Errorf("GET /admin/workers with Host %q: %d %q", host, code, body)
		}
		if code, _, _ := r.call(t, "POST", "/admin/drain", map[string]string{"Host": host, adminHeader: "1"}); code != http.StatusMisdirectedRequest {
			t.Errorf("POST /admin/drain with Host %q: %d", host, code)
		}
		for _, open := range []string{"/metrics", "/healthz", "/readyz"} {
			if code, body, _ := r.call(t, "GET", open, map[string]string{"Host": host}); code != 200 {
				t.Errorf("GET %s with Host %q: %d %q, want it open", open, host, code, body)
			}
		}
	}
	if !r.b.Ready() {
		t.Error("a refused drain drained the edge")
	}
	for _, host := range []string{"127.0.0.1:" + port, "127.0.0.1", "localhost:" + port, "LocalHost", "[::1]:" + port, "[::1]", "::1"} {
		code, body, h := r.call(t, "GET", "/admin/workers", map[string]string{"Host": host})
		if code != 200 {
			t.Errorf("GET /admin/workers with Host %q: %d %q", host, code, body)
			continue
		}
		var v struct {
			Stickyd bool
			Workers []struct{ Slot, PID int }
		}
		if err := json.Unmarshal([]byte(body), &v); err != nil || !v.Stickyd || len(v.Workers) != 1 || h.Get(versionHeader) == "" {
			t.Errorf("GET /admin/workers: %q %v, header %q", body, err, h.Get(versionHeader))
		}
	}
}

// TestAdminAbortedRestartCompletes: the client of POST /admin/restart/N hangs up while
// the worker drains (its WebSocket holds it). The restart must still replace the worker;
// it used to stop at the hang-up and leave the worker draining for good.
func TestAdminAbortedRestartCompletes(t *testing.T) {
	r := startAdminRig(t, 1, 2*time.Second)
	old := r.sup.Pids()[0]
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+r.edge+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	// Workers report their WebSocket count about once a second; until this one has, the
	// worker looks drained and the restart would not wait at all.
	waitFor(t, "worker 0 to report its WebSocket", 10*time.Second, func() bool { return r.b.Workers()[0].WebSockets() > 0 })

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", r.admin+"/admin/restart/0", nil)
	req.Header.Set(adminHeader, "1")
	errc := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	waitFor(t, "worker 0 draining", 10*time.Second, func() bool { return r.states()[0] == "draining" })
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("the restart answered before it was interrupted; the test needs it to be draining still")
	}
	waitFor(t, "worker 0 replaced after the interrupted restart", 30*time.Second, func() bool {
		pid, ok := r.sup.Pids()[0]
		return ok && pid != old && r.states()[0] == "ready"
	})
	if !strings.Contains(r.logs.String(), "the client went away; the restart carries on") {
		t.Error("the interrupted restart was not logged")
	}
	// The WebSocket on the drained worker ends when its grace is over; a new one works.
	c, _, err := websocket.DefaultDialer.Dial("ws://"+r.edge+"/ws", nil)
	if err != nil {
		t.Fatalf("after the restart: %v", err)
	}
	c.Close()

	// A restart nobody interrupts answers when it is done.
	old = r.sup.Pids()[0]
	code, body, _ := r.call(t, "POST", "/admin/restart/0", admin1)
	if code != 200 || r.sup.Pids()[0] == old {
		t.Fatalf("restart: %d %q, pid %d→%d", code, body, old, r.sup.Pids()[0])
	}
	if code, body, _ := r.call(t, "POST", "/admin/restart/7", admin1); code != http.StatusNotFound {
		t.Errorf("restart of an empty slot: %d %q", code, body)
	}
}

// TestAdminUndrainRestoresRouting: undrain undoes every drain, the edge's and the
// workers', and /admin/undrain/{slot} one worker's; routing and readiness come back.
func TestAdminUndrainRestoresRouting(t *testing.T) {
	r := startAdminRig(t, 2, time.Second)
	for _, p := range []string{"/admin/drain", "/admin/drain/0", "/admin/drain/1"} {
		if code, body, _ := r.call(t, "POST", p, admin1); code != 200 {
			t.Fatalf("%s: %d %q", p, code, body)
		}
	}
	if r.b.Ready() || r.states()[0] != "draining" || r.states()[1] != "draining" {
		t.Fatalf("after drains: ready %v, workers %v", r.b.Ready(), r.states())
	}
	code, body, _ := r.call(t, "POST", "/admin/undrain", admin1)
	if code != 200 || !strings.Contains(body, "0, 1") {
		t.Fatalf("undrain: %d %q", code, body)
	}
	if !r.b.Ready() || r.states()[0] != "ready" || r.states()[1] != "ready" {
		t.Fatalf("after undrain: ready %v, workers %v", r.b.Ready(), r.states())
	}
	if code, _, _ := r.call(t, "GET", "/readyz", nil); code != 200 {
		t.Fatalf("/readyz after undrain: %d", code)
	}
	// One worker: new clients go to the other while it drains; after its undrain it is
	// routed again (shown by draining the other one).
	pids := r.sup.Pids()
	r.call(t, "POST", "/admin/drain/1", admin1)
	for range 6 {
		if pid := whoami(t, r.edge); pid != pids[0] {
			t.Fatalf("a new client went to pid %d, not worker 0 (%d), while worker 1 drains", pid, pids[0])
		}
	}
	if code, body, _ := r.call(t, "POST", "/admin/undrain/1", admin1); code != 200 || body != "worker 1 ready\n" {
		t.Fatalf("undrain/1: %d %q", code, body)
	}
	if r.states()[1] != "ready" {
		t.Fatalf("worker 1 is %s after undrain/1", r.states()[1])
	}
	r.call(t, "POST", "/admin/drain/0", admin1)
	for range 6 {
		if pid := whoami(t, r.edge); pid != pids[1] {
			t.Fatalf("a new client went to pid %d, not the undrained worker 1 (%d)", pid, pids[1])
		}
	}
	if code, _, _ := r.call(t, "POST", "/admin/undrain/7", admin1); code != http.StatusNotFound {
		t.Errorf("undrain of an empty slot: %d", code)
	}
	if code, _, _ := r.call(t, "POST", "/admin/undrain/x", admin1); code != http.StatusBadRequest {
		t.Errorf("undrain/x: %d", code)
	}
}

// whoami asks the demo worker behind the edge for its pid, on a fresh connection without
// cookies: the balancer picks the worker.
func whoami(t *testing.T, edge string) int {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + edge + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct{ PID int }
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v.PID
}
