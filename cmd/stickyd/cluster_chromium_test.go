//go:build unix

package main

// The cluster-adapter relay seen from a real browser: tabs of one headless Chromium open a
// page served by the cluster recipe app (testdata/socketio cluster-page-app.js, driven by
// cluster-page.js), with the socket.io client script the app serves itself.

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clusterPageResult is the JSON line cluster-page.js prints.
type clusterPageResult struct {
	Tabs       int      `json:"tabs"`
	Connected  int      `json:"connected"`
	TabWorkers []string `json:"tabWorkers"`
	Workers    []struct {
		Worker       string  `json:"worker"`
		PID          int     `json:"pid"`
		EmitReceived int     `json:"emitReceived"`
		FetchCount   *int    `json:"fetchCount"`
		AckCount     *int    `json:"ackCount"`
		AckError     *string `json:"ackError"`
	} `json:"workers"`
	Room struct {
		Worker     *string  `json:"worker"`
		From       []string `json:"from"`
		Leaked     int      `json:"leaked"`
		FetchCount *int     `json:"fetchCount"`
	} `json:"room"`
	Errors []string `json:"errors"`

	raw string
}

func runClusterPage(t *testing.T, d *daemon, workers, tabs int) clusterPageResult {
	t.Helper()
	dir := nodeFixtures(t)
	chromium := chromiumPath(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "cluster-page.js", "--url", "http://"+d.addr, "--workers", strconv.Itoa(workers),
		"--tabs", strconv.Itoa(tabs), "--route-header", "X-Route", "--timeout-ms", "60000")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CHROMIUM="+chromium)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	line := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(line, '\n'); i >= 0 {
		line = line[i+1:]
	}
	var res clusterPageResult
	if jerr := json.Unmarshal([]byte(line), &res); jerr != nil {
		t.Fatalf("cluster-page.js printed no JSON result (exit: %v)\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	res.raw = line
	if err != nil || len(res.Errors) > 0 {
		t.Errorf("cluster-page.js: %v, errors %q\nstderr:\n%s", err, res.Errors, stderr.String())
	}
	return res
}

func intOr(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}

// checkClusterPage fails unless every worker's broadcast reached every tab, every worker
// counted every tab, every tab acked every worker's broadcast, and the room joined in tab 0
// got the room broadcasts of all other workers and no other tab did.
func checkClusterPage(t *testing.T, res clusterPageResult, workers, tabs int) {
	t.Helper()
	if res.Connected != tabs {
		t.Errorf("%d of %d tabs connected over WebSocket", res.Connected, tabs)
	}
	spread := map[string]bool{}
	for _, w := range res.TabWorkers {
		spread[w] = true
	}
	if len(spread) < 2 {
		t.Errorf("the tabs' sessions are on workers %v: nothing crossed workers", res.TabWorkers)
	}
	if len(res.Workers) != workers {
		t.Fatalf("checked %d workers, want %d: %s", len(res.Workers), workers, res.raw)
	}
	for _, w := range res.Workers {
		if w.EmitReceived != tabs {
			t.Errorf("worker %s: io.emit reached %d of %d tabs", w.Worker, w.EmitReceived, tabs)
		}
		if n := intOr(w.FetchCount, -1); n != tabs {
			t.Errorf("worker %s: fetchSockets() counted %d, want %d", w.Worker, n, tabs)
		}
		if n := intOr(w.AckCount, -1); n != tabs || w.AckError != nil {
			t.Errorf("worker %s: a broadcast with acks got %d of %d answers; error %v", w.Worker, n, tabs, ptrString(w.AckError))
		}
	}
	if len(res.Room.From) != workers-1 || res.Room.Leaked != 0 || intOr(res.Room.FetchCount, -1) != 1 {
		t.Errorf("room joined in tab 0 (worker %s): broadcasts from workers %v reached it (want %d workers), %d reached other tabs, fetchSockets of the room %d (want 1)",
			ptrString(res.Room.Worker), res.Room.From, workers-1, res.Room.Leaked, intOr(res.Room.FetchCount, -1))
	}
	if t.Failed() {
		t.Logf("cluster-page.js: %s", res.raw)
	}
}

// TestClusterAdapterInChromium: 4 Node workers of the socket.io cluster recipe under stickyd;
// 6 tabs of one Chromium (one keep-alive pool) load the app's page and connect, long-polling
// first, then WebSocket. A broadcast from each worker reaches every tab, fetchSockets from
// each counts 6, a broadcast with acks gets 6 answers, and a room joined in one tab gets the
// room broadcasts sent from every other worker and no other tab does. After a worker is
// restarted through the admin API, a fresh browser sees the same, the new worker included.
func TestClusterAdapterInChromium(t *testing.T) {
	const workers, tabs = 4, 6
	dir := nodeFixtures(t)
	chromiumPath(t)
	d := startDaemon(t, dir, "run", "-workers", strconv.Itoa(workers), "-key", "sid,header:X-Route", "-shutdown-timeout", "2s",
		"--", "node", "cluster-page-app.js")
	before := sioWaitWorkers(t, d, workers, 60*time.Second)
	checkClusterPage(t, runClusterPage(t, d, workers, tabs), workers, tabs)
	if t.Failed() {
		return
	}

	old, _ := sioWorkerBySlot(before, 2)
	req, _ := http.NewRequest("POST", "http://"+d.metrics+"/admin/restart/2", nil)
	req.Header.Set("X-Stickyd-Admin", "1")
	resp, err := (&http.Client{Timeout: 90 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /admin/restart/2: %d", resp.StatusCode)
	}
	after := sioWaitWorkers(t, d, workers, 60*time.Second)
	nw, _ := sioWorkerBySlot(after, 2)
	if nw.PID == old.PID {
		t.Fatalf("worker 2 still has pid %d after the restart", old.PID)
	}
	res := runClusterPage(t, d, workers, tabs)
	checkClusterPage(t, res, workers, tabs)
	found := false
	for _, w := range res.Workers {
		found = found || w.PID == nw.PID
	}
	if !found {
		t.Errorf("the restarted worker (pid %d) was not among the checked workers: %s", nw.PID, res.raw)
	}
}
