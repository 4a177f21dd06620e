//go:build unix

package main

// End-to-end tests of what stickyd does for Node workers as their cluster primary besides
// routing connections: it relays @socket.io/cluster-adapter's messages between the workers
// (the adapter's setupPrimary()), and it knows how many WebSockets each Node worker holds.
// Real socket.io, @socket.io/cluster-adapter, @socket.io/sticky and socket.io-client from the
// fixtures' lockfile (testdata/socketio: cluster-app.js, cluster-clients.js, clients.js).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// clusterResult is the JSON line cluster-clients.js prints.
type clusterResult struct {
	Clients   int             `json:"clients"`
	Connected int             `json:"connected"`
	PerWorker map[string]int  `json:"perWorker"`
	Errors    []string        `json:"errors"`
	Workers   []clusterWorker `json:"workers"`
	Room      struct {
		Worker     string   `json:"worker"`
		From       []string `json:"from"`
		Leaked     int      `json:"leaked"`
		FetchCount int      `json:"fetchCount"`
	} `json:"room"`
	SocketsJoin struct {
		FetchCount int `json:"fetchCount"`
		FetchTries int `json:"fetchTries"`
		Received   int `json:"received"`
	} `json:"socketsJoin"`

	raw string
}

// clusterWorker is what cluster-clients.js saw of the operations started on one worker.
type clusterWorker struct {
	Worker             string  `json:"worker"`
	PID                int     `json:"pid"`
	EmitReceived       int     `json:"emitReceived"`
	FetchCount         int     `json:"fetchCount"`
	SSEResponses       int     `json:"sseResponses"`
	SSEError           *string `json:"sseError"`
	SSEFrom            []int   `json:"sseFrom"`
	BinaryReceived     int     `json:"binaryReceived"`
	BinaryIntact       int     `json:"binaryIntact"`
	BinaryIntactRemote int     `json:"binaryIntactRemote"`
	RemoteClients      int     `json:"remoteClients"`
	AckCount           int     `json:"ackCount"`
	AckError           *string `json:"ackError"`
}

// runClusterClients runs cluster-clients.js against the daemon (bounded) and parses its line.
func runClusterClients(t *testing.T, d *daemon, workers, clients int, extra ...string) clusterResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := append([]string{"cluster-clients.js", "--url", "http://" + d.addr, "--workers", fmt.Sprint(workers),
		"--clients", fmt.Sprint(clients), "--route-header", "X-Route", "--timeout-ms", "120000"}, extra...)
	cmd := exec.CommandContext(ctx, "node", args...)
	cmd.Dir = nodeFixtures(t)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var res clusterResult
	line := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(line, '\n'); i >= 0 {
		line = line[i+1:]
	}
	if jerr := json.Unmarshal([]byte(line), &res); jerr != nil {
		t.Fatalf("cluster-clients.js printed no JSON result (exit: %v)\nstdout:\n%s\nstderr:\n%s\nstickyd:\n%s", err, stdout.String(), stderr.String(), d.logs.String())
	}
	res.raw = line
	if err != nil {
		t.Errorf("cluster-clients.js: %v\nstderr:\n%s", err, stderr.String())
	}
	return res
}

// checkCluster fails unless every cross-worker operation reached every client and worker.
func checkCluster(t *testing.T, res clusterResult, workers, clients int) {
	t.Helper()
	if len(res.Errors) > 0 || res.Connected != clients {
		t.Errorf("connected %d of %d, errors %q", res.Connected, clients, res.Errors)
	}
	if len(res.Workers) != workers {
		t.Fatalf("checked %d workers, want %d: %s", len(res.Workers), workers, res.raw)
	}
	for _, w := range res.Workers {
		if w.EmitReceived != clients {
			t.Errorf("worker %s: io.emit reached %d of %d clients", w.Worker, w.EmitReceived, clients)
		}
		if w.FetchCount != clients {
			t.Errorf("worker %s: fetchSockets() counted %d, want %d", w.Worker, w.FetchCount, clients)
		}
		if w.SSEResponses != workers-1 || w.SSEError != nil {
			t.Errorf("worker %s: serverSideEmit with ack got %d answers (from pids %v), want %d; error %v",
				w.Worker, w.SSEResponses, w.SSEFrom, workers-1, ptrString(w.SSEError))
		}
		if w.AckCount != clients || w.AckError != nil {
			t.Errorf("worker %s: a broadcast with acks got %d of %d answers; error %v", w.Worker, w.AckCount, clients, ptrString(w.AckError))
		}
		if w.BinaryIntact != clients {
			t.Errorf("worker %s: a Buffer broadcast arrived intact at %d of %d clients (%d of %d on other workers)",
				w.Worker, w.BinaryIntact, clients, w.BinaryIntactRemote, w.RemoteClients)
		}
	}
	if len(res.Room.From) != workers-1 || res.Room.Leaked != 0 || res.Room.FetchCount != 1 {
		t.Errorf("room joined on worker %s: broadcasts from workers %v reached the member (want %d workers), %d reached non-members, fetchSockets of the room %d (want 1)",
			res.Room.Worker, res.Room.From, workers-1, res.Room.Leaked, res.Room.FetchCount)
	}
	if res.SocketsJoin.FetchCount != clients || res.SocketsJoin.Received != clients {
		t.Errorf("socketsJoin from one worker: fetchSockets of the room %d, room broadcast from another reached %d; want %d",
			res.SocketsJoin.FetchCount, res.SocketsJoin.Received, clients)
	}
	if t.Failed() {
		t.Logf("cluster-clients.js: %s", res.raw)
	}
}

func ptrString(p *string) string {
	if p == nil {
		return "none"
	}
	return *p
}

// TestClusterAdapterAcrossWorkers: 4 Node workers of the socket.io cluster recipe
// (io.adapter(createAdapter()) from @socket.io/cluster-adapter) under stickyd, 200 clients:
// io.emit from every worker reaches all 200, fetchSockets from every worker counts 200,
// serverSideEmit with ack gets 3 answers, a broadcast with acks gets 200 answers, a room
// joined on one worker gets broadcasts from the others, socketsJoin crosses workers, a Buffer
// survives the JSON channel. A worker restarted through the admin API takes part again at
// once (the others were told its adapter closed).
func TestClusterAdapterAcrossWorkers(t *testing.T) {
	dir := nodeFixtures(t)
	// -key header:X-Route lets cluster-clients.js reach every worker with plain HTTP.
	d := startDaemon(t, dir, "run", "-workers", "4", "-key", "sid,header:X-Route", "-shutdown-timeout", "2s",
		"--", "node", "cluster-app.js")
	before := sioWaitWorkers(t, d, 4, 60*time.Second)

	res := runClusterClients(t, d, 4, 200)
	checkCluster(t, res, 4, 200)
	mf := sioScrape(t, d)
	relayed := sioSum(mf, "stickyd_cluster_messages_total", map[string]string{"result": "relayed"})
	dropped := sioSum(mf, "stickyd_cluster_messages_total", map[string]string{"result": "dropped"})
	if relayed == 0 || dropped != 0 {
		t.Errorf("stickyd_cluster_messages_total: relayed %v, dropped %v; want some relayed, none dropped", relayed, dropped)
	}
	if t.Failed() {
		return
	}

	// Restart worker 1; the relay must carry the new worker's adapter at once.
	old, _ := sioWorkerBySlot(before, 1)
	req, _ := http.NewRequest("POST", "http://"+d.metrics+"/admin/restart/1", nil)
	req.Header.Set("X-Stickyd-Admin", "1")
	resp, err := (&http.Client{Timeout: 90 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /admin/restart/1: %d", resp.StatusCode)
	}
	after := sioWaitWorkers(t, d, 4, 60*time.Second)
	nw, _ := sioWorkerBySlot(after, 1)
	if nw.PID == old.PID {
		t.Fatalf("worker 1 still has pid %d after the restart", old.PID)
	}
	res = runClusterClients(t, d, 4, 200)
	checkCluster(t, res, 4, 200)
	for _, w := range res.Workers {
		if w.PID != nw.PID && !slices.Contains(w.SSEFrom, nw.PID) {
			t.Errorf("worker %s: serverSideEmit answers from %v, not from the restarted worker (pid %d)", w.Worker, w.SSEFrom, nw.PID)
		}
	}
	if !slices.ContainsFunc(res.Workers, func(w clusterWorker) bool {
		return w.PID == nw.PID
	}) {
		t.Errorf("the restarted worker (pid %d) was not among the checked workers: %s", nw.PID, res.raw)
	}
}

// TestClusterAdapterStickyStyle: the same recipe with @socket.io/sticky's setupWorker(io)
// instead of listen().
func TestClusterAdapterStickyStyle(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemonEnv(t, dir, []string{"STYLE=sticky"}, "run", "-workers", "3", "-key", "sid,header:X-Route",
		"-shutdown-timeout", "2s", "--", "node", "cluster-app.js")
	sioWaitWorkers(t, d, 3, 60*time.Second)
	checkCluster(t, runClusterClients(t, d, 3, 60), 3, 60)
}

// startDaemonEnv is startDaemon with extra environment for stickyd (and so its workers).
func startDaemonEnv(t *testing.T, dir string, env []string, args ...string) *daemon {
	t.Helper()
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	return startDaemon(t, dir, args...)
}

// adminWebSockets is /admin/workers with the WebSocket counts.
func adminWebSockets(t *testing.T, d *daemon) (perSlot map[int]int64, total int64) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + d.metrics + "/admin/workers")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Workers []struct {
			Slot       int   `json:"slot"`
			WebSockets int64 `json:"websockets"`
		} `json:"workers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	perSlot = map[int]int64{}
	for _, w := range out.Workers {
		perSlot[w.Slot] = w.WebSockets
		total += w.WebSockets
	}
	return perSlot, total
}

// waitWebSockets waits until the admin API and stickyd_websockets both count want in all.
func waitWebSockets(t *testing.T, d *daemon, want int64, timeout time.Duration) map[int]int64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		per, total := adminWebSockets(t, d)
		gauge := sioSum(sioScrape(t, d), "stickyd_websockets", nil)
		if total == want && gauge == float64(want) {
			return per
		}
		if time.Now().After(deadline) {
			t.Fatalf("WebSockets: /admin/workers %v (total %d), stickyd_websockets %v; want %d", per, total, gauge, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestNodeWorkerWebSocketsCounted: with N socket.io clients connected over WebSocket to Node
// workers, /admin/workers and stickyd_websockets count N (per worker as the clients say), and
// 0 once they closed — for listen() apps and for @socket.io/sticky setupWorker apps whose
// sessions start with polling and upgrade.
func TestNodeWorkerWebSocketsCounted(t *testing.T) {
	dir := nodeFixtures(t)
	for _, tc := range []struct{ name, script, transports string }{
		{"listen", "server-listen.js", "websocket"},
		{"sticky-upgrade", "server-sticky.js", "polling,websocket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 24
			d := startDaemon(t, dir, "run", "-workers", "2", "--", "node", tc.script)
			sioWaitWorkers(t, d, 2, 60*time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			args := sioClientArgs(d, "--clients", fmt.Sprint(n), "--transports", tc.transports, "--hold-ms", "8000", "--timeout-ms", "60000")
			if strings.Contains(tc.transports, "polling") {
				args = append(args, "--expect-upgrade")
			}
			run := startClients(t, ctx, args...)
			sioWaitEvent(t, run, "holding", time.Minute)
			per := waitWebSockets(t, d, n, 7*time.Second)
			res, err := run.Wait()
			if err != nil {
				t.Fatal(err)
			}
			if !res.AllOK() {
				t.Fatalf("clients: %s", res.Raw)
			}
			for slot, got := range per {
				if want := int64(res.PerWorker[fmt.Sprint(slot)]); got != want {
					t.Errorf("worker %d: %d WebSockets counted, its clients say %d", slot, got, want)
				}
			}
			waitWebSockets(t, d, 0, 10*time.Second)
		})
	}
}

// TestNodeWorkerDrainWaitsForWebSockets: restarting a Node worker drains it first, and the
// drain now waits for its WebSockets. Clients that go straight to WebSocket leave no session
// in the edge's table (their handshake travels inside the handed-off socket), so before the
// preload counted them a restart stopped the worker at once, under its clients.
func TestNodeWorkerDrainWaitsForWebSockets(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "2", "-shutdown-timeout", "60s", "--", "node", "server-listen.js")
	sioWaitWorkers(t, d, 2, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const n = 16
	run := startClients(t, ctx, sioClientArgs(d, "--clients", fmt.Sprint(n), "--transports", "websocket", "--hold-ms", "4000", "--timeout-ms", "60000")...)
	sioWaitEvent(t, run, "holding", time.Minute)
	per := waitWebSockets(t, d, n, 3*time.Second)
	slot := 0
	if per[1] > per[0] {
		slot = 1
	}
	if per[slot] == 0 {
		t.Fatalf("no WebSockets on any worker: %v", per)
	}
	restarted := make(chan time.Time, 1)
	go func() {
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://%s/admin/restart/%d", d.metrics, slot), nil)
		req.Header.Set("X-Stickyd-Admin", "1")
		if resp, err := (&http.Client{Timeout: 90 * time.Second}).Do(req); err == nil {
			resp.Body.Close()
		}
		restarted <- time.Now()
	}()
	res, err := run.Wait()
	closed := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	if !res.AllOK() {
		t.Fatalf("the restart of worker %d (%d WebSockets) cut its clients off: %s", slot, per[slot], res.Raw)
	}
	select {
	case at := <-restarted:
		if at.Before(closed.Add(-time.Second)) {
			t.Errorf("the restart ended %v before the clients closed", closed.Sub(at))
		}
	case <-time.After(40 * time.Second):
		t.Fatal("the restart did not end once the WebSockets were gone (it waits for the drain grace, 60 s)")
	}
}
