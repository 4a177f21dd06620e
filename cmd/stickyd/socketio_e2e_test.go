//go:build unix

package main

// End-to-end tests of `stickyd run` with real Node socket.io workers and real
// socket.io-client clients (testdata/socketio, driven by clients.js): both
// worker styles under load, a worker killed mid-run, the two-server app, a
// worker that never listens, metrics that count exactly what the traffic did,
// and shutdown with connected clients.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// sioClientArgs are the common clients.js arguments: generous timeouts, the
// machine is small and shared.
func sioClientArgs(d *daemon, extra ...string) []string {
	return append([]string{"--url", "http://" + d.addr, "--timeout-ms", "120000"}, extra...)
}

// sioWaitEvent waits for the clients.js progress event named ev.
func sioWaitEvent(t *testing.T, run *clientsRun, ev string, timeout time.Duration) clientsEvent {
	t.Helper()
	to := time.After(timeout)
	for {
		select {
		case e, ok := <-run.Events:
			if !ok {
				res, err := run.Wait()
				t.Fatalf("clients.js ended before the %q event: %v\n%s\nstderr:\n%s", ev, err, res.Raw, res.Stderr)
			}
			if e.Event == ev {
				return e
			}
		case <-to:
			t.Fatalf("no %q event from clients.js within %v; stderr:\n%s", ev, timeout, run.stderr.String())
		}
	}
}

// sioWorkerBySlot returns the admin view of slot.
func sioWorkerBySlot(ws []adminWorker, slot int) (adminWorker, bool) {
	for _, w := range ws {
		if w.Slot == slot {
			return w, true
		}
	}
	return adminWorker{}, false
}

// sioWaitWorkers waits until the admin API lists n ready workers and returns them.
func sioWaitWorkers(t *testing.T, d *daemon, n int, timeout time.Duration) []adminWorker {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ws := d.workers(t)
		ready := 0
		for _, w := range ws {
			if w.State == "ready" && w.PID > 0 {
				ready++
			}
		}
		if ready == n {
			return ws
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin API lists %+v, want %d ready workers\nlogs:\n%s", ws, n, d.logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sioCheckSpread fails unless more than one worker served clients, by clients.js's
// perWorker (the worker id each client's hello named).
func sioCheckSpread(t *testing.T, res clientsResult, workers int) {
	t.Helper()
	total := 0
	for k, n := range res.PerWorker {
		slot, err := strconv.Atoi(k)
		if err != nil || slot < 0 || slot >= workers {
			t.Errorf("perWorker has key %q: want a worker id 0..%d (STICKYD_WORKER_ID)", k, workers-1)
		}
		total += n
	}
	if len(res.PerWorker) < 2 {
		t.Errorf("perWorker %v: want more than one worker serving clients", res.PerWorker)
	}
	if total != res.Clients {
		t.Errorf("perWorker %v counts %d clients, want %d", res.PerWorker, total, res.Clients)
	}
}

func TestSocketIOWorkerStyles(t *testing.T) {
	dir := nodeFixtures(t)
	for _, style := range []struct{ name, script string }{
		{"listen", "server-listen.js"},
		{"sticky", "server-sticky.js"},
	} {
		t.Run(style.name, func(t *testing.T) {
			d := startDaemon(t, dir, "run", "-workers", "4", "--", "node", style.script)
			ws := sioWaitWorkers(t, d, 4, 60*time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()

			// 200 clients, default transports (polling, then the WebSocket upgrade).
			res := runClients(t, ctx, sioClientArgs(d, "--clients", "200", "--expect-upgrade", "--messages", "3", "--binary-bytes", "65536")...)
			checkAllClientsOK(t, res, true, true)
			if res.OK != 200 || res.Upgraded != 200 || res.BinaryOK != 200 {
				t.Fatalf("200 clients: ok %d, upgraded %d, binaryOK %d", res.OK, res.Upgraded, res.BinaryOK)
			}
			sioCheckSpread(t, res, 4)
			admin := d.workers(t)
			t.Logf("admin after 200 clients: %+v", admin)
			withSessions := 0
			for _, w := range admin {
				if w.Sessions > 0 {
					withSessions++
				}
			}
			if withSessions < 2 {
				t.Errorf("admin API: sessions on %d workers (%+v), want more than one", withSessions, admin)
			}
			// The same workers served everything: none crashed under the load.
			for _, w := range ws {
				a, ok := sioWorkerBySlot(admin, w.Slot)
				if !ok || a.PID != w.PID || a.State != "ready" {
					t.Errorf("worker slot %d: was pid %d, now %+v", w.Slot, w.PID, a)
				}
			}

			// The same with 4 shared keep-alive agents: 50 sessions per agent, so one
			// TCP connection carries polling requests of several sessions.
			res = runClients(t, ctx, sioClientArgs(d, "--clients", "200", "--shared-agents", "4", "--expect-upgrade", "--messages", "3", "--binary-bytes", "65536")...)
			checkAllClientsOK(t, res, true, true)
			if res.MaxSessionsPerTCPConnection <= 1 || !res.SharingVerified {
				t.Fatalf("shared agents: maxSessionsPerTcpConnection %d (sharingVerified %v), want > 1: %s",
					res.MaxSessionsPerTCPConnection, res.SharingVerified, res.Raw)
			}
			if res.SessionUnknown != 0 || res.OK != 200 {
				t.Fatalf("shared agents: sessionUnknown %d, ok %d", res.SessionUnknown, res.OK)
			}
			sioCheckSpread(t, res, 4)

			// 1 MiB binary payloads (socket.io attachments, over polling and WebSocket).
			res = runClients(t, ctx, sioClientArgs(d, "--clients", "20", "--expect-upgrade", "--messages", "3", "--binary-bytes", "1048576")...)
			checkAllClientsOK(t, res, true, true)
			if res.BinaryOK != 20 {
				t.Fatalf("1 MiB: binaryOK %d, want 20", res.BinaryOK)
			}
		})
	}
}

func TestSocketIOWorkerKilledMidRun(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "4", "--", "node", "server-listen.js")
	sioWaitWorkers(t, d, 4, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// Reconnect mode without --until-reconnected: clients.js runs until --timeout-ms
	// and then checks every client. (--until-reconnected K would need the number of
	// clients on the victim before the run starts.)
	const n = 80
	run := startClients(t, ctx, "--url", "http://"+d.addr, "--clients", strconv.Itoa(n), "--reconnect", "--timeout-ms", "60000")
	sioWaitEvent(t, run, "connected", 90*time.Second)
	// clients.js reports "connected" on socket.io's connect, which can come a poll
	// before the worker's hello. Let the clients settle: every client's WebSocket
	// upgrade is one handoff, and the hello precedes the upgrade's completion in
	// practice. (Not guaranteed: the accounting below allows for clients that never
	// saw the killed worker's hello.)
	settle := time.Now().Add(60 * time.Second)
	for sioSum(sioScrape(t, d), "stickyd_handoffs_total", map[string]string{"result": "ok"}) < n && time.Now().Before(settle) {
		time.Sleep(100 * time.Millisecond)
	}

	// Every client made one engine.io handshake through the edge, which learned its
	// sid: the admin API tells how many sessions each worker holds.
	ws := d.workers(t)
	total := 0
	victim := ws[0]
	for _, w := range ws {
		total += w.Sessions
		if w.Sessions > victim.Sessions {
			victim = w
		}
	}
	t.Logf("before the kill: %+v", ws)
	if total != n {
		t.Errorf("admin API: %d sessions for %d connected clients", total, n)
	}
	if victim.Sessions == 0 || victim.PID <= 0 {
		t.Fatalf("no worker to kill: %+v", ws)
	}
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill worker %d (pid %d): %v", victim.Slot, victim.PID, err)
	}
	t.Logf("killed worker %d (pid %d, %d sessions)", victim.Slot, victim.PID, victim.Sessions)

	res, err := run.Wait()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("clients.js: %s", res.Raw)
	if res.ExitCode != 0 || res.OK != n || res.Connected != n {
		t.Errorf("after the kill: exit %d, ok %d, connected %d of %d; errors %v", res.ExitCode, res.OK, res.Connected, n, res.Errors)
	}
	if len(res.PerClient) != n {
		t.Fatalf("perClient has %d entries, want %d", len(res.PerClient), n)
	}
	vkey := strconv.Itoa(victim.Slot)
	onVictim, moved, toRestarted := 0, 0, 0
	for i, c := range res.PerClient {
		if c.Before == nil {
			t.Errorf("client %d: no hello before the kill", i)
			continue
		}
		if !c.Connected {
			t.Errorf("client %d (was on worker %s): not connected at the end", i, *c.Before)
		}
		if *c.Before != vkey {
			// Its worker lived: the same session all along.
			if c.After != nil || c.Sessions != 1 {
				after := "<nil>"
				if c.After != nil {
					after = *c.After
				}
				t.Errorf("client %d on surviving worker %s changed worker: after %s, %d sessions", i, *c.Before, after, c.Sessions)
			}
			continue
		}
		onVictim++
		if c.After == nil || c.Sessions < 2 {
			t.Errorf("client %d on the killed worker %s did not reconnect (%d sessions)", i, vkey, c.Sessions)
			continue
		}
		moved++
		if *c.After == vkey {
			toRestarted++ // the slot's new worker (same STICKYD_WORKER_ID, new pid)
		}
	}
	// The admin API counted the sessions the edge learned per worker. A client whose
	// session on the victim died before its hello arrived reports its later worker as
	// "before" with one session: it is not among onVictim, and it is connected.
	if onVictim > victim.Sessions {
		t.Errorf("%d clients say hello came from worker %s, the admin API said %d sessions", onVictim, vkey, victim.Sessions)
	}
	if onVictim < victim.Sessions {
		t.Logf("%d of the killed worker's %d sessions died before their hello reached the client", victim.Sessions-onVictim, victim.Sessions)
	}
	// Every session of a surviving worker stayed where it was: at least as many
	// clients still report that worker as their only one as it held at the kill.
	for _, w := range ws {
		if w.Slot == victim.Slot {
			continue
		}
		stayed := 0
		for _, c := range res.PerClient {
			if c.Before != nil && *c.Before == strconv.Itoa(w.Slot) && c.After == nil && c.Sessions == 1 && c.Connected {
				stayed++
			}
		}
		if stayed < w.Sessions {
			t.Errorf("worker %d held %d sessions at the kill; only %d clients stayed on it", w.Slot, w.Sessions, stayed)
		}
	}
	if res.Reconnected != onVictim {
		t.Errorf("reconnected %d, want %d (the killed worker's clients)", res.Reconnected, onVictim)
	}
	t.Logf("%d clients were on the killed worker; %d reconnected (%d of them to its restarted slot)", onVictim, moved, toRestarted)

	// The slot gets a new worker process.
	deadline := time.Now().Add(60 * time.Second)
	for {
		w, ok := sioWorkerBySlot(d.workers(t), victim.Slot)
		if ok && w.PID > 0 && w.PID != victim.PID && w.State == "ready" {
			t.Logf("slot %d restarted: pid %d", victim.Slot, w.PID)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot %d not restarted within 60s: %+v\nlogs:\n%s", victim.Slot, d.workers(t), d.logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if alive(victim.PID) {
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", victim.PID)); err == nil && strings.Contains(string(cmdline), "server-listen.js") {
			t.Errorf("killed worker pid %d still exists", victim.PID)
		}
	}
	if !strings.Contains(d.logs.String(), fmt.Sprintf(`msg="worker exited; restarting" worker=%d pid=%d`, victim.Slot, victim.PID)) {
		t.Errorf("the log does not report worker %d (pid %d) exiting", victim.Slot, victim.PID)
	}
	sioWaitWorkers(t, d, 4, 60*time.Second)

	// New clients are served by the four workers.
	res = runClients(t, ctx, sioClientArgs(d, "--clients", "20", "--expect-upgrade", "--messages", "3", "--binary-bytes", "65536")...)
	checkAllClientsOK(t, res, true, true)
}

// sioFreePort returns a TCP port below the kernel's ephemeral range that is free on
// every address right now.
func sioFreePort(t testing.TB) int {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 12000 {
				lo = v
			}
		}
	}
	seed := int(time.Now().UnixNano()/1000) + os.Getpid()
	for i := range 200 {
		port := 10000 + (seed+i*7919)%(lo-10000)
		ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			continue
		}
		ln.Close()
		return port
	}
	t.Fatalf("no free port in 10000..%d", lo)
	return 0
}

func TestSocketIOTwoServersApp(t *testing.T) {
	dir := nodeFixtures(t)
	// Ports outside the kernel's ephemeral range: a port picked by binding :0 and
	// released can be taken meanwhile as the local port of some outgoing connection on
	// this busy machine, and the workers then fail with EADDRINUSE.
	front := sioFreePort(t)
	target := sioFreePort(t)
	for target == front {
		target = sioFreePort(t)
	}
	t.Setenv("FRONT_PORT", strconv.Itoa(front))
	t.Setenv("TARGET_PORT", strconv.Itoa(target))
	d := startDaemon(t, dir, "run", "-workers", "2", "-app-port", strconv.Itoa(front), "--", "node", "two-servers.js")
	sioWaitWorkers(t, d, 2, 60*time.Second)

	get := func(url string) (int, string) {
		t.Helper()
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v\nlogs:\n%s", url, err, d.logs.String())
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: body: %v", url, err)
		}
		return resp.StatusCode, string(b)
	}
	bodyRE := regexp.MustCompile(`^target ok [01]\n$`)
	// The edge address reaches the front server (the app server chosen by -app-port),
	// which proxies to the target server in the same worker process.
	for i := range 6 {
		code, body := get(fmt.Sprintf("http://%s/edge/%d", d.addr, i))
		if code != 200 || !bodyRE.MatchString(body) {
			t.Fatalf("edge GET: %d %q, want 200 \"target ok <0|1>\"", code, body)
		}
	}
	// The target port is bound once by the edge and shared with both workers, which
	// accept on it directly.
	for i := range 6 {
		code, body := get(fmt.Sprintf("http://127.0.0.1:%d/direct/%d", target, i))
		if code != 200 || !bodyRE.MatchString(body) {
			t.Fatalf("target GET: %d %q, want 200 \"target ok <0|1>\"", code, body)
		}
	}
	// The front server is the app server: its traffic comes through the edge only, the
	// port itself is not bound by anyone.
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", front), 5*time.Second); err == nil {
		c.Close()
		t.Errorf("the front port %d accepts connections directly; the app server should get only the edge's traffic", front)
	}

	// The daemon logs once which server was chosen, and why.
	logs := d.logs.String()
	var chosen []string
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, `msg="Node app server chosen`) {
			chosen = append(chosen, line)
		}
	}
	if len(chosen) != 1 {
		t.Fatalf("want exactly one \"Node app server chosen\" log line, got %d:\n%s\nlogs:\n%s", len(chosen), strings.Join(chosen, "\n"), logs)
	}
	t.Logf("log: %s", chosen[0])
	for _, want := range []string{fmt.Sprintf(" port=%d ", front), fmt.Sprintf(`rule="-app-port %d"`, front)} {
		if !strings.Contains(chosen[0], want) {
			t.Errorf("the app-server log line lacks %q: %s", want, chosen[0])
		}
	}
}

func TestSocketIONeverListensSpawnTimeout(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "1", "-spawn-timeout", "2s", "--", "node", "never-listens.js")
	deadline := time.Now().Add(60 * time.Second)
	for {
		logs := d.logs.String()
		found := ""
		for _, line := range strings.Split(logs, "\n") {
			if strings.Contains(line, "never-listens.js") && strings.Contains(line, "bin/www") && strings.Contains(line, "not ready after 2s") {
				found = line
				break
			}
		}
		if found != "" {
			t.Logf("log: %s", found)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line names the command and the bin/www hint within 60s; logs:\n%s", logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case <-d.exited:
		t.Fatalf("stickyd exited (%v); it should keep retrying the worker", d.err)
	default:
	}
	// No ready worker: /readyz says so, /healthz still answers.
	if code := sioStatus(t, "http://"+d.metrics+"/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with no ready worker: %d, want 503", code)
	}
	if code := sioStatus(t, "http://"+d.metrics+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d, want 200", code)
	}
}

func sioStatus(t *testing.T, url string) int {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// sioScrape fetches and parses the daemon's /metrics.
func sioScrape(t *testing.T, d *daemon) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + d.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return mf
}

// sioSum adds the values of the samples of family name whose labels include match.
func sioSum(mf map[string]*dto.MetricFamily, name string, match map[string]string) float64 {
	f := mf[name]
	if f == nil {
		return 0
	}
	var sum float64
	for _, m := range f.GetMetric() {
		ok := true
		for k, v := range match {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == k && lp.GetValue() == v {
					found = true
				}
			}
			ok = ok && found
		}
		if !ok {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum
}

func TestSocketIOMetricsCountTraffic(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "4", "--", "node", "server-listen.js")
	sioWaitWorkers(t, d, 4, 60*time.Second)
	if code := sioStatus(t, "http://"+d.metrics+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d, want 200", code)
	}
	if code := sioStatus(t, "http://"+d.metrics+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d, want 200", code)
	}
	mf := sioScrape(t, d)
	for _, name := range []string{"stickyd_connections_accepted_total", "stickyd_handoffs_total", "stickyd_requests_proxied_total"} {
		if v := sioSum(mf, name, nil); v != 0 {
			t.Fatalf("fresh daemon: %s = %v, want 0", name, v)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const k = 10
	res := runClients(t, ctx, sioClientArgs(d, "--clients", strconv.Itoa(k), "--transports", "websocket", "--messages", "3")...)
	checkAllClientsOK(t, res, false, false)

	mf = sioScrape(t, d)
	if v := sioSum(mf, "stickyd_connections_accepted_total", map[string]string{"result": "handed_off"}); v != k {
		t.Errorf(`stickyd_connections_accepted_total{result="handed_off"} = %v, want %d`, v, k)
	}
	if v := sioSum(mf, "stickyd_handoffs_total", map[string]string{"result": "ok"}); v != k {
		t.Errorf(`sum of stickyd_handoffs_total{result="ok"} = %v, want %d`, v, k)
	}
	if v := sioSum(mf, "stickyd_connections_accepted_total", map[string]string{"result": "proxied"}); v != 0 {
		t.Errorf(`after WebSocket-only clients: stickyd_connections_accepted_total{result="proxied"} = %v, want 0`, v)
	}
	if v := sioSum(mf, "stickyd_requests_proxied_total", nil); v != 0 {
		t.Errorf(`after WebSocket-only clients: stickyd_requests_proxied_total = %v, want 0`, v)
	}

	// 5 plain requests, each on its own connection.
	const g = 5
	for i := range g {
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get("http://" + d.addr + "/whoami")
		if err != nil {
			t.Fatalf("GET /whoami %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET /whoami %d: %d", i, resp.StatusCode)
		}
	}
	mf = sioScrape(t, d)
	if v := sioSum(mf, "stickyd_connections_accepted_total", map[string]string{"result": "proxied"}); v != g {
		t.Errorf(`stickyd_connections_accepted_total{result="proxied"} = %v, want %d`, v, g)
	}
	if v := sioSum(mf, "stickyd_requests_proxied_total", map[string]string{"code": "2xx"}); v != g {
		t.Errorf(`sum of stickyd_requests_proxied_total{code="2xx"} = %v, want %d`, v, g)
	}
	if v := sioSum(mf, "stickyd_requests_proxied_total", nil); v != g {
		t.Errorf(`sum of stickyd_requests_proxied_total = %v, want %d`, v, g)
	}
	if v := sioSum(mf, "stickyd_connections_accepted_total", map[string]string{"result": "handed_off"}); v != k {
		t.Errorf(`after the GETs: stickyd_connections_accepted_total{result="handed_off"} = %v, want still %d`, v, k)
	}
	if v := sioSum(mf, "stickyd_handoffs_total", map[string]string{"result": "ok"}); v != k {
		t.Errorf(`after the GETs: sum of stickyd_handoffs_total{result="ok"} = %v, want still %d`, v, k)
	}
	if code := sioStatus(t, "http://"+d.metrics+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after traffic: %d, want 200", code)
	}
}

func TestSocketIOShutdownWithConnectedClients(t *testing.T) {
	dir := nodeFixtures(t)
	const grace = 15 * time.Second
	d := startDaemon(t, dir, "run", "-workers", "4", "-shutdown-timeout", grace.String(), "--", "node", "server-listen.js")
	ws := sioWaitWorkers(t, d, 4, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	run := startClients(t, ctx, sioClientArgs(d, "--clients", "50", "--expect-upgrade", "--hold-ms", "600000")...)
	defer func() {
		cancel()
		run.Wait()
	}()
	sioWaitEvent(t, run, "holding", 3*time.Minute)

	start := time.Now()
	d.signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(grace + 30*time.Second):
		t.Fatalf("stickyd did not exit within %v of SIGTERM (grace %v)\nlogs:\n%s", grace+30*time.Second, grace, d.logs.String())
	}
	el := time.Since(start)
	t.Logf("stickyd exited %v after SIGTERM with 50 connected clients", el)
	if el > grace {
		t.Errorf("stickyd took %v to exit, longer than its grace period %v", el, grace)
	}
	if d.err != nil {
		t.Errorf("stickyd exit: %v, want status 0\nlogs:\n%s", d.err, d.logs.String())
	}
	for _, w := range ws {
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", w.PID)); err == nil &&
			strings.Contains(string(cmdline), "server-listen.js") {
			t.Errorf("worker %d (pid %d, %q) outlived the edge", w.Slot, w.PID, strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
}

// TestSocketIOEdgeUpgrade upgrades the edge (in place, same pid) twice while 60 socket.io
// clients of both worker styles are connected over WebSocket and keep talking: no client
// is disconnected or moved, the Node workers keep their pids, and new clients connect.
func TestSocketIOEdgeUpgrade(t *testing.T) {
	for _, app := range []string{"server-listen.js", "server-sticky.js"} {
		t.Run(app, func(t *testing.T) {
			dir := nodeFixtures(t)
			d := startDaemon(t, dir, "run", "-workers", "2", "--", "node", app)
			before := sioWaitWorkers(t, d, 2, 60*time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			run := startClients(t, ctx, sioClientArgs(d, "--clients", "60", "--expect-upgrade", "--hold-ms", "6000")...)
			sioWaitEvent(t, run, "holding", 2*time.Minute)
			for gen := 1; gen <= 2; gen++ {
				out, err := exec.Command(stickydBinary(t), "upgrade", "-url", "http://"+d.metrics).CombinedOutput()
				if err != nil || !strings.Contains(string(out), fmt.Sprintf("generation %d", gen)) {
					t.Fatalf("upgrade %d: %v %s\nlogs:\n%s", gen, err, out, d.logs.String())
				}
			}
			res, err := run.Wait()
			if err != nil {
				t.Fatal(err)
			}
			if !res.AllOK() || res.SessionUnknown != 0 || res.WorkerChanged != 0 {
				t.Fatalf("clients across two edge upgrades: %s", res.Raw)
			}
			after := d.workers(t)
			for i := range before {
				if after[i].PID != before[i].PID {
					t.Errorf("worker %d restarted across the upgrades (%d → %d)", i, before[i].PID, after[i].PID)
				}
			}
			// The upgraded edge serves new sessions too.
			res = runClients(t, ctx, sioClientArgs(d, "--clients", "20", "--expect-upgrade")...)
			if !res.AllOK() {
				t.Fatalf("new clients after the upgrades: %s", res.Raw)
			}
		})
	}
}

// TestSocketIORollingRestart restarts all 4 Node workers one at a time (drained first)
// while 200 socket.io clients are connected: every client ends connected, and the only
// thing any of them saw is the reconnect that draining its worker causes.
func TestSocketIORollingRestart(t *testing.T) {
	dir := nodeFixtures(t)
	d := startDaemon(t, dir, "run", "-workers", "4", "-shutdown-timeout", "2s", "--", "node", "server-listen.js")
	before := sioWaitWorkers(t, d, 4, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	run := startClients(t, ctx, sioClientArgs(d, "--clients", "200", "--reconnect", "--until-reconnected", "200", "--timeout-ms", "60000")...)
	sioWaitEvent(t, run, "connected", 2*time.Minute)
	if got := httpStatus(t, "POST", "http://"+d.metrics+"/admin/restart"); got != 200 {
		t.Fatalf("rolling restart: %d\nlogs:\n%s", got, d.logs.String())
	}
	after := d.workers(t)
	for i := range before {
		if after[i].PID == before[i].PID {
			t.Errorf("worker %d was not restarted", i)
		}
	}
	res, err := run.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if res.Connected != 200 || res.OK != 200 || res.SessionUnknown != 0 {
		t.Fatalf("after a rolling restart: %s", res.Raw)
	}
	for msg := range res.Errors {
		if !strings.Contains(msg, "disconnect") {
			t.Errorf("client error other than a drain reconnect: %q", msg)
		}
	}
	t.Logf("%d of 200 clients reconnected once their worker was drained", res.Reconnected)
}
