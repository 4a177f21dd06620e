//go:build unix

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// statusPageView is one phase line of status-page.js: the page as Chromium displays it.
type statusPageView struct {
	Phase       string `json:"phase"`
	Updates     int    `json:"updates"`
	State       string `json:"state"`
	Ready       string `json:"ready"`
	Version     string `json:"version"`
	Generation  int    `json:"generation"`
	PID         int    `json:"pid"`
	Uptime      string `json:"uptime"`
	Sessions    int    `json:"sessions"`
	Connections int    `json:"connections"`
	Handoffs    int    `json:"handoffs"`
	Requests    int    `json:"requests"`
	HandoffsMax string `json:"handoffsMax"`
	RequestsMax string `json:"requestsMax"`
	ChartPoints struct {
		Handoffs, Requests, Sessions []int
	} `json:"chartPoints"`
	Workers []struct {
		Pool                                                string
		Slot, PID, Sessions, WebSockets, Handoffs, Requests int
		State, Uptime                                       string
		Restarts                                            int
	} `json:"workers"`
	Navigations   int      `json:"navigations"`
	Marker        bool     `json:"marker"`
	PhoneOverflow int      `json:"phoneOverflow"`
	Errors        []string `json:"errors"`
}

// TestStatusPageInChromium opens the admin port's status page in headless Chromium: what
// it displays matches /admin/workers, it updates in place (no reload) when WebSockets and
// requests arrive, its charts draw, it fits a phone screen, and it loads nothing from
// elsewhere. Screenshots go to a temporary directory (logged, not kept in the tree).
func TestStatusPageInChromium(t *testing.T) {
	dir := nodeFixtures(t)
	chromium := chromiumPath(t)
	// Session ids only: by client address every test connection (all from 127.0.0.1)
	// would go to one worker.
	d := startDaemon(t, "", "demo", "-workers", "3", "-key", "sid")
	shots := os.Getenv("STICKYD_SCREENSHOTS") // set to keep the screenshots somewhere
	if shots == "" {
		shots = t.TempDir()
	}
	desktop, phone := filepath.Join(shots, "status-page.png"), filepath.Join(shots, "status-page-phone.png")
	const sockets = 9
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "status-page.js", "--url", "http://"+d.metrics+"/",
		"--screenshot", desktop, "--phone-screenshot", phone, "--wait-websockets", "9", "--timeout-ms", "45000")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CHROMIUM="+chromium)
	cmd.WaitDelay = 5 * time.Second
	stdout, _ := cmd.StdoutPipe()
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	lines := bufio.NewScanner(stdout)
	next := func(phase string) statusPageView {
		t.Helper()
		if !lines.Scan() {
			t.Fatalf("status-page.js ended before %q: %v\n%s", phase, lines.Err(), stderr.String())
		}
		var v statusPageView
		if err := json.Unmarshal(lines.Bytes(), &v); err != nil {
			t.Fatalf("status-page.js: %q: %v", lines.Text(), err)
		}
		if v.Phase != phase {
			t.Fatalf("status-page.js: phase %q (%s), want %q\n%s", v.Phase, lines.Text(), phase, stderr.String())
		}
		return v
	}

	first := next("initial")
	ws := d.workers(t)
	if len(first.Workers) != len(ws) || first.PID != d.cmd.Process.Pid || first.Generation != 0 || first.Ready != "ready" || first.Uptime == "–" {
		t.Fatalf("page shows %+v; /admin/workers %+v, edge pid %d", first, ws, d.cmd.Process.Pid)
	}
	for i, w := range ws {
		p := first.Workers[i]
		if p.Slot != w.Slot || p.PID != w.PID || p.State != w.State || p.Sessions != w.Sessions || p.Pool != "default" || p.Uptime == "–" {
			t.Errorf("page row %+v, /admin/workers %+v", p, w)
		}
	}

	// Load: WebSockets (handoffs) that stay open, and proxied requests.
	var conns []*websocket.Conn
	for range sockets {
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
	const requests = 25
	for range requests {
		resp, err := http.Get("http://" + d.addr + "/whoami")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}

	loaded := next("loaded")
	per, total := adminWebSockets(t, d)
	if total != sockets {
		t.Fatalf("/admin/workers counts %d WebSockets, want %d", total, sockets)
	}
	var pageWS, pageHandoffs, pageRequests int
	for _, p := range loaded.Workers {
		pageWS += p.WebSockets
		pageHandoffs += p.Handoffs
		pageRequests += p.Requests
		if int64(p.WebSockets) != per[p.Slot] {
			t.Errorf("worker %d: page shows %d WebSockets, /admin/workers %d", p.Slot, p.WebSockets, per[p.Slot])
		}
	}
	if pageWS != sockets || loaded.Handoffs-first.Handoffs < sockets || pageHandoffs != loaded.Handoffs ||
		loaded.Requests-first.Requests < requests || pageRequests != loaded.Requests || loaded.Connections < sockets+1 {
		t.Errorf("after %d WebSockets and %d requests the page shows: %d WebSockets, handoffs %d → %d (rows %d), requests %d → %d (rows %d), %d connections",
			sockets, requests, pageWS, first.Handoffs, loaded.Handoffs, pageHandoffs, first.Requests, loaded.Requests, pageRequests, loaded.Connections)
	}
	if !loaded.Marker || loaded.Navigations != 1 || loaded.Updates <= first.Updates {
		t.Errorf("the page reloaded instead of updating in place: %+v", loaded)
	}
	if loaded.HandoffsMax == "max 0.00" || loaded.RequestsMax == "max 0.00" || len(loaded.ChartPoints.Handoffs) != 1 || loaded.ChartPoints.Handoffs[0] < 2 ||
		len(loaded.ChartPoints.Sessions) != 3 {
		t.Errorf("charts: handoffs %q %v, requests %q %v, sessions %v", loaded.HandoffsMax, loaded.ChartPoints.Handoffs, loaded.RequestsMax, loaded.ChartPoints.Requests, loaded.ChartPoints.Sessions)
	}

	done := next("done")
	if len(done.Errors) > 0 {
		t.Errorf("page errors: %v", done.Errors)
	}
	if done.PhoneOverflow != 0 {
		t.Errorf("on a 390-pixel phone the page is %d pixels wider than the screen", done.PhoneOverflow)
	}
	for _, p := range []string{desktop, phone} {
		if st, err := os.Stat(p); err != nil || st.Size() < 10_000 {
			t.Errorf("screenshot %s: %v", p, err)
		}
	}
	t.Logf("screenshots: %s %s", desktop, phone)
	if strings.Contains(stderr.String(), "Error") {
		t.Logf("status-page.js stderr:\n%s", stderr.String())
	}
}
