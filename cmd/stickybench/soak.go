//go:build unix

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"slices"
	"syscall"
	"time"
)

// soak: hold WebSockets and a steady keep-alive HTTP stream through a stickyd edge with
// Go workers while SIGKILLing one worker at a time.

type killEvent struct {
	Slot      int       `json:"slot"`
	PID       int       `json:"pid"`
	At        time.Time `json:"at"`
	NewPID    int       `json:"new_pid"`
	RestartMs float64   `json:"restart_ms"` // kill → the slot ready again with a new pid (-1: not within the wait)
	WSOnIt    int       `json:"websockets_on_it"`
}

// killedAt returns the time pid was killed, if it was.
func killedAt(kills []killEvent, pid int) (time.Time, bool) {
	for _, k := range kills {
		if k.PID == pid {
			return k.At, true
		}
	}
	return time.Time{}, false
}

// classifyLosses: a WebSocket loss is expected when the worker that served it was
// killed no later than the loss was seen; every other loss is unexpected.
func classifyLosses(losses []lossEvent, kills []killEvent) (expected, unexpected int, samples []string) {
	for _, l := range losses {
		if at, ok := killedAt(kills, l.PID); ok && !l.At.Before(at) {
			expected++
			continue
		}
		unexpected++
		if len(samples) < 5 {
			samples = append(samples, fmt.Sprintf("pid %d: %s", l.PID, l.Err))
		}
	}
	return
}

// classifyHTTP: a failed request is caused by a kill when the last successful request
// of its stream (its keep-alive connection, its source address: so its worker) was
// answered by a pid that was killed no later than the failure. The longest such
// failure's distance to its kill is the failure window. Every other failure — on a
// stream whose worker was not killed, or before any kill — is not caused by a kill.
func classifyHTTP(fails []httpFailure, kills []killEvent) (byKill, other int, window time.Duration, samples []string) {
	for _, f := range fails {
		if at, ok := killedAt(kills, f.LastPID); ok && !f.At.Before(at) {
			byKill++
			window = max(window, f.At.Sub(at))
			continue
		}
		other++
		if len(samples) < 5 {
			samples = append(samples, fmt.Sprintf("stream %d (last pid %d): %s", f.Stream, f.LastPID, f.Err))
		}
	}
	return
}

type soakResult struct {
	Mode             string         `json:"mode"`
	URL              string         `json:"url"`
	Admin            string         `json:"admin"`
	Workers          int            `json:"workers"`
	N                int            `json:"n"`
	Seconds          float64        `json:"seconds"`
	PingEvery        string         `json:"ping_every"`
	KillEvery        string         `json:"kill_every"`
	Kills            []killEvent    `json:"kills"`
	WSByPIDAtStart   map[int]int    `json:"websockets_by_pid_at_start"`
	WSEchoes         int64          `json:"ws_echoes"`
	WSLostOnKilled   int            `json:"ws_lost_on_killed_workers"`
	WSLostOnOthers   int            `json:"ws_lost_on_other_workers"`
	WSLostSample     []string       `json:"ws_lost_sample,omitempty"`
	WSReconnected    int64          `json:"ws_reconnected"`
	WSAliveAtEnd     int64          `json:"ws_alive_at_end"`
	WSEcho           latency        `json:"ws_echo_latency"`
	HTTPRequests     int64          `json:"http_requests"`
	HTTPOK           int64          `json:"http_ok"`
	HTTPFailedByKill int            `json:"http_failed_by_kill"`
	HTTPFailedOther  int            `json:"http_failed_not_by_kill"`
	HTTPFailSample   []string       `json:"http_fail_sample,omitempty"`
	HTTPFailWindowMs float64        `json:"http_fail_window_ms"`
	HTTPConnections  int64          `json:"http_connections"`
	HTTPLatency      latency        `json:"http_latency"`
	RestartsOK       bool           `json:"restarts_ok"`
	EdgePIDs         [2]int         `json:"edge_pid_before_after"`
	WorkersAfter     []adminWorker  `json:"workers_after"`
	Pass             bool           `json:"pass"`
	Extra            map[string]any `json:"extra,omitempty"`
}

func runSoak(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	var e edgeFlags
	e.register(fs, 4)
	n := fs.Int("n", 5000, "WebSockets to hold")
	d := fs.Duration("d", 60*time.Second, "soak duration (after the WebSockets are open)")
	killEvery := fs.Duration("kill-every", 15*time.Second, "SIGKILL one worker (slots in turn) this often")
	ping := fs.Duration("ping-every", 5*time.Second, "each WebSocket echoes one message this often")
	streams := fs.Int("http-streams", 8, "keep-alive HTTP request streams (GET /whoami), one source address each")
	pause := fs.Duration("http-pause", 5*time.Millisecond, "pause between two requests of a stream")
	sources := fs.Int("sources", 8, "client source addresses 127.0.0.1..N")
	timeout := fs.Duration("timeout", 10*time.Second, "per-operation timeout")
	quiet := fs.Bool("q", false, "no progress lines on stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *n < 1 || *d <= 0 || *d > time.Hour || *killEvery <= 0 || *ping <= 0 || *streams < 0 || *streams > 1000 || *sources < 1 || *sources > 254 {
		return errors.New("bounded runs only: -n >= 1, -d up to 1h, -kill-every and -ping-every > 0, -http-streams 0..1000, -sources 1..254")
	}
	soft, hard := nofile()
	if uint64(*n+*streams+200) > soft {
		return fmt.Errorf("-n %d does not fit this process's open-file limit (soft %d, hard %d) with %d streams and 200 spare fds", *n, soft, hard, *streams)
	}
	wsURL, admin, stopEdge, err := e.start(ctx, "soak")
	if err != nil {
		return err
	}
	defer stopEdge()
	u, _ := url.Parse(wsURL)
	before, err := getAdmin(ctx, admin)
	if err != nil {
		return err
	}
	cm := common{sources: *sources, timeout: *timeout}
	fleet := &wsFleet{url: wsURL, dialer: newWSDialer(&cm), interval: *ping, timeout: *timeout, reconnect: true}
	fleet.dialer.NetDialContext = sourceDialer(*sources, *timeout)
	if err := fleet.open(ctx, *n, 64, *quiet, "soak"); err != nil {
		fleet.close()
		return err
	}
	defer fleet.close()
	res := &soakResult{Mode: "soak", URL: wsURL, Admin: admin, Workers: e.workers, N: *n, PingEvery: ping.String(),
		KillEvery: killEvery.String(), WSByPIDAtStart: fleet.byPID(), Kills: []killEvent{}}
	hs := &httpStreams{addr: u.Host, host: u.Host, path: "/whoami", streams: *streams, sources: *sources, pause: *pause, timeout: *timeout}

	rctx, cancel := context.WithTimeout(ctx, *d)
	defer cancel()
	start := time.Now()
	wsWG := fleet.run(rctx)
	httpWG := hs.run(rctx)
	stop := progress(*quiet, "soak", func() string {
		fleet.mu.Lock()
		lost := len(fleet.losses)
		fleet.mu.Unlock()
		hs.mu.Lock()
		hf := len(hs.failures)
		hs.mu.Unlock()
		return fmt.Sprintf("ws echoes=%d lost=%d reconnected=%d | http ok=%d failed=%d | kills=%d",
			fleet.echoes.Load(), lost, fleet.reconnects.Load(), hs.ok.Load(), hf, len(res.Kills))
	})
	res.RestartsOK = true
	tick := time.NewTicker(*killEvery)
	slot := 0
loop:
	for {
		select {
		case <-rctx.Done():
			break loop
		case <-tick.C:
		}
		if time.Until(start.Add(*d)) < 2*time.Second {
			break // no kill whose restart would not be seen
		}
		st, err := getAdmin(ctx, admin)
		if err != nil {
			stop()
			return err
		}
		w, ok := st.slot(slot % e.workers)
		slot++
		if !ok || w.State != "ready" {
			res.RestartsOK = false
			continue
		}
		ws := fleet.byPID()[w.PID]
		k := killEvent{Slot: w.Slot, PID: w.PID, At: time.Now(), RestartMs: -1, WSOnIt: ws}
		res.Kills = append(res.Kills, k) // before the signal: every loss it causes finds it
		if err := syscall.Kill(w.PID, syscall.SIGKILL); err != nil {
			stop()
			return fmt.Errorf("kill worker slot %d pid %d: %w", w.Slot, w.PID, err)
		}
		fmt.Fprintf(stderr, "stickybench soak: %5.1fs SIGKILL worker slot %d pid %d (%d WebSockets)\n", time.Since(start).Seconds(), w.Slot, w.PID, ws)
		back, err := waitAdmin(ctx, admin, 30*time.Second, func(s *adminState) bool {
			nw, ok := s.slot(w.Slot)
			return ok && nw.PID != w.PID && nw.State == "ready"
		})
		kk := &res.Kills[len(res.Kills)-1]
		if err != nil {
			res.RestartsOK = false
			continue
		}
		nw, _ := back.slot(w.Slot)
		kk.NewPID, kk.RestartMs = nw.PID, round1(float64(time.Since(kk.At))/1e6)
		fmt.Fprintf(stderr, "stickybench soak: slot %d back as pid %d after %.0f ms\n", w.Slot, nw.PID, kk.RestartMs)
	}
	tick.Stop()
	wsWG.Wait()
	httpWG.Wait()
	stop()
	if err := ctx.Err(); err != nil {
		return err
	}
	res.Seconds = round3(time.Since(start).Seconds())
	alive, dead := fleet.verify()
	res.WSAliveAtEnd = alive
	losses := slices.Clone(fleet.losses)
	for _, pid := range dead { // not yet noticed by a ping: seen now
		losses = append(losses, lossEvent{PID: pid, At: time.Now(), Err: "final echo failed"})
	}
	res.WSLostOnKilled, res.WSLostOnOthers, res.WSLostSample = classifyLosses(losses, res.Kills)
	res.WSReconnected = fleet.reconnects.Load()
	res.WSEchoes = fleet.echoes.Load()
	fleet.rec.mu.Lock()
	slices.Sort(fleet.rec.all)
	res.WSEcho = summarize(fleet.rec.all)
	fleet.rec.mu.Unlock()
	res.HTTPRequests, res.HTTPOK, res.HTTPConnections = hs.requests.Load(), hs.ok.Load(), hs.conns.Load()
	var win time.Duration
	res.HTTPFailedByKill, res.HTTPFailedOther, win, res.HTTPFailSample = classifyHTTP(hs.failures, res.Kills)
	res.HTTPFailWindowMs = round1(float64(win) / 1e6)
	res.HTTPLatency = hs.rec.summary()
	after, err := getAdmin(ctx, admin)
	if err != nil {
		return err
	}
	res.EdgePIDs = [2]int{before.PID, after.PID}
	res.WorkersAfter = after.Workers
	for _, k := range res.Kills {
		res.RestartsOK = res.RestartsOK && k.NewPID > 0 && k.NewPID != k.PID
	}
	res.RestartsOK = res.RestartsOK && after.allReady(e.workers) && len(res.Kills) > 0
	res.Pass = res.WSLostOnOthers == 0 && res.HTTPFailedOther == 0 && res.RestartsOK && before.PID == after.PID
	if err := emit(out, res); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "\nsoak summary: %d WebSockets, %d workers, %.0f s, %d kills (every %s)\n", *n, e.workers, res.Seconds, len(res.Kills), killEvery)
	for _, k := range res.Kills {
		fmt.Fprintf(stderr, "  slot %d: pid %d (%d WebSockets) SIGKILLed → new pid %d, ready after %.0f ms\n", k.Slot, k.PID, k.WSOnIt, k.NewPID, k.RestartMs)
	}
	fmt.Fprintf(stderr, "  WebSockets lost on killed workers: %d (expected; %d reconnected)\n", res.WSLostOnKilled, res.WSReconnected)
	fmt.Fprintf(stderr, "  WebSockets lost on other workers:  %d (must be 0)\n", res.WSLostOnOthers)
	fmt.Fprintf(stderr, "  WebSockets answering at the end:   %d; echoes during the soak %d (p99 %.1f ms)\n", res.WSAliveAtEnd, res.WSEchoes, res.WSEcho.P99ms)
	fmt.Fprintf(stderr, "  HTTP: %d requests, %d ok; failed by a kill %d (within %.0f ms of it), failed otherwise %d (must be 0); %d TCP connections; p99 %.1f ms\n",
		res.HTTPRequests, res.HTTPOK, res.HTTPFailedByKill, res.HTTPFailWindowMs, res.HTTPFailedOther, res.HTTPConnections, res.HTTPLatency.P99ms)
	fmt.Fprintf(stderr, "  restarts: every killed slot back with a new pid: %v; edge pid %d → %d\n", res.RestartsOK, before.PID, after.PID)
	fmt.Fprintf(stderr, "  PASS: %v\n", res.Pass)
	if !res.Pass {
		return errors.New("soak failed (see the summary)")
	}
	return nil
}
