//go:build unix

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// upgrade-drill: hold WebSockets, a keep-alive HTTP stream and a connect probe through a
// stickyd edge while it upgrades itself (POST /admin/upgrade) several times.

type upgradeEvent struct {
	FromGeneration int     `json:"from_generation"`
	ToGeneration   int     `json:"to_generation"`
	Ms             float64 `json:"ms"` // POST → the admin API shows the new generation
	ProbeMaxMs     float64 `json:"probe_max_ms"`
	NotAcceptingMs float64 `json:"not_accepting_ms"` // probe max in the window − baseline probe p50
	from, to       time.Time
}

type drillResult struct {
	Mode             string         `json:"mode"`
	URL              string         `json:"url"`
	Admin            string         `json:"admin"`
	Workers          int            `json:"workers"`
	N                int            `json:"n"`
	Held             int            `json:"held"`
	NofileSoft       uint64         `json:"nofile_soft"`
	NofileHard       uint64         `json:"nofile_hard"`
	Upgrades         []upgradeEvent `json:"upgrades"`
	Seconds          float64        `json:"seconds"`
	WSDropped        int            `json:"ws_dropped"`
	WSDropSample     []string       `json:"ws_drop_sample,omitempty"`
	WSAliveAtEnd     int64          `json:"ws_alive_at_end"`
	WSEchoes         int64          `json:"ws_echoes"`
	HTTPRequests     int64          `json:"http_requests"`
	HTTPOK           int64          `json:"http_ok"`
	HTTPFailed       int            `json:"http_failed"`
	HTTPFailSample   []string       `json:"http_fail_sample,omitempty"`
	HTTPConnections  int64          `json:"http_connections"`
	HTTPStreams      int            `json:"http_streams"`
	HTTPLatency      latency        `json:"http_latency"`
	ProbeCount       int            `json:"probe_count"`
	ProbeFailed      int            `json:"probe_failed"`
	ProbeBaseline    latency        `json:"probe_baseline"`
	NotAcceptingMs   float64        `json:"not_accepting_ms_max"`
	EdgePIDBefore    int            `json:"edge_pid_before"`
	EdgePIDAfter     int            `json:"edge_pid_after"`
	WorkerPIDsBefore []int          `json:"worker_pids_before"`
	WorkerPIDsAfter  []int          `json:"worker_pids_after"`
	Pass             bool           `json:"pass"`
}

func runUpgradeDrill(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("upgrade-drill", flag.ContinueOnError)
	var e edgeFlags
	e.register(fs, 2)
	n := fs.Int("n", 10000, "WebSockets to hold (this process needs one fd each; the edge none; the workers one each)")
	upgrades := fs.Int("upgrades", 2, "edge upgrades, one after the other")
	gap := fs.Duration("gap", 3*time.Second, "steady traffic before, between and after the upgrades")
	ping := fs.Duration("ping-every", 10*time.Second, "each WebSocket echoes one message this often during the drill (0: only the final check)")
	streams := fs.Int("http-streams", 8, "keep-alive HTTP request streams (GET /whoami), one source address each")
	pause := fs.Duration("http-pause", 5*time.Millisecond, "pause between two requests of a stream")
	probeEvery := fs.Duration("probe-every", 5*time.Millisecond, "open a new connection (GET /whoami, Connection: close) this often")
	sources := fs.Int("sources", 8, "client source addresses 127.0.0.1..N")
	timeout := fs.Duration("timeout", 15*time.Second, "per-operation timeout")
	quiet := fs.Bool("q", false, "no progress lines on stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *n < 1 || *upgrades < 1 || *upgrades > 10 || *gap < 0 || *gap > 10*time.Minute || *streams < 0 || *streams > 1000 ||
		*probeEvery < time.Millisecond || *sources < 1 || *sources > 254 || *ping < 0 {
		return errors.New("bounded runs only: -n >= 1, -upgrades 1..10, -gap up to 10m, -http-streams 0..1000, -probe-every >= 1ms, -sources 1..254")
	}
	soft, hard := nofile()
	fmt.Fprintf(stderr, "stickybench upgrade-drill: nofile soft=%d hard=%d\n", soft, hard)
	const reserve = 300 // streams, probes in flight, admin, runtime
	if uint64(*n+*streams+reserve) > soft {
		return fmt.Errorf("-n %d does not fit this process's open-file limit: soft=%d hard=%d, and %d fds are kept for streams, probes and the runtime; lower -n (or raise the limit)", *n, soft, hard, *streams+reserve)
	}
	wsURL, admin, stopEdge, err := e.start(ctx, "upgrade-drill")
	if err != nil {
		return err
	}
	defer stopEdge()
	u, _ := url.Parse(wsURL)
	before, err := getAdmin(ctx, admin)
	if err != nil {
		return err
	}
	for _, w := range before.Workers {
		if lim, err := procNofile(w.PID); err == nil && lim > 0 && int64(*n/max(1, len(before.Workers))+100) > lim {
			fmt.Fprintf(stderr, "stickybench upgrade-drill: warning: worker pid %d has nofile %d, below its share of %d WebSockets\n", w.PID, lim, *n)
		}
	}
	cm := common{sources: *sources, timeout: *timeout}
	interval := *ping
	if interval == 0 {
		interval = 24 * time.Hour
	}
	fleet := &wsFleet{url: wsURL, dialer: newWSDialer(&cm), interval: interval, timeout: *timeout}
	if err := fleet.open(ctx, *n, 64, *quiet, "upgrade-drill"); err != nil {
		fleet.close()
		return err
	}
	defer fleet.close()
	res := &drillResult{Mode: "upgrade-drill", URL: wsURL, Admin: admin, Workers: len(before.Workers), N: *n, Held: *n,
		NofileSoft: soft, NofileHard: hard, HTTPStreams: *streams, EdgePIDBefore: before.PID, WorkerPIDsBefore: before.workerPIDs()}
	hs := &httpStreams{addr: u.Host, host: u.Host, path: "/whoami", streams: *streams, sources: *sources, pause: *pause, timeout: *timeout}

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	wsWG := fleet.run(rctx)
	httpWG := hs.run(rctx)
	probes := connectProbe(rctx, u.Host, u.Host, "/whoami", *probeEvery, *timeout)
	stop := progress(*quiet, "upgrade-drill", func() string {
		hs.mu.Lock()
		hf := len(hs.failures)
		hs.mu.Unlock()
		return fmt.Sprintf("ws echoes=%d | http ok=%d failed=%d conns=%d | upgrades=%d", fleet.echoes.Load(), hs.ok.Load(), hf, hs.conns.Load(), len(res.Upgrades))
	})
	fail := func(err error) error {
		stop()
		cancel()
		wsWG.Wait()
		httpWG.Wait()
		probes()
		return err
	}
	sleepCtx(ctx, *gap)
	for range *upgrades {
		g0, err := getAdmin(ctx, admin)
		if err != nil {
			return fail(err)
		}
		ev := upgradeEvent{FromGeneration: g0.Generation, from: time.Now()}
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, admin+"/admin/upgrade", nil)
		req.Header.Set("X-Stickyd-Admin", "1")
		resp, err := adminClient.Do(req)
		if err != nil {
			return fail(fmt.Errorf("POST /admin/upgrade: %w", err))
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fail(fmt.Errorf("POST /admin/upgrade: %s %q", resp.Status, body))
		}
		g1, err := waitAdmin(ctx, admin, 2*time.Minute, func(s *adminState) bool { return s.Generation > g0.Generation })
		if err != nil {
			return fail(err)
		}
		ev.to = time.Now()
		ev.ToGeneration = g1.Generation
		ev.Ms = round1(float64(ev.to.Sub(ev.from)) / 1e6)
		res.Upgrades = append(res.Upgrades, ev)
		fmt.Fprintf(stderr, "stickybench upgrade-drill: %5.1fs edge generation %d → %d in %.0f ms (edge pid %d)\n",
			time.Since(start).Seconds(), g0.Generation, g1.Generation, ev.Ms, g1.PID)
		sleepCtx(ctx, *gap)
	}
	cancel()
	wsWG.Wait()
	httpWG.Wait()
	samples := probes()
	stop()
	if err := ctx.Err(); err != nil {
		return err
	}
	res.Seconds = round3(time.Since(start).Seconds())
	alive, dead := fleet.verify()
	res.WSAliveAtEnd = alive
	res.WSEchoes = fleet.echoes.Load()
	for _, l := range fleet.losses {
		res.WSDropped++
		if len(res.WSDropSample) < 5 {
			res.WSDropSample = append(res.WSDropSample, fmt.Sprintf("pid %d at %s: %s", l.PID, l.At.Sub(start).Round(time.Millisecond), l.Err))
		}
	}
	res.WSDropped += len(dead)
	res.HTTPRequests, res.HTTPOK, res.HTTPConnections = hs.requests.Load(), hs.ok.Load(), hs.conns.Load()
	res.HTTPFailed = len(hs.failures)
	for _, f := range hs.failures {
		if len(res.HTTPFailSample) < 5 {
			res.HTTPFailSample = append(res.HTTPFailSample, fmt.Sprintf("stream %d at %s: %s", f.Stream, f.At.Sub(start).Round(time.Millisecond), f.Err))
		}
	}
	res.HTTPLatency = hs.rec.summary()
	// A probe that started up to 1 s before the POST may be the one held by the pause.
	var wins []window
	for _, ev := range res.Upgrades {
		wins = append(wins, window{ev.from.Add(-time.Second), ev.to.Add(500 * time.Millisecond)})
	}
	base, maxIn, pf := probeStats(samples, wins)
	res.ProbeCount, res.ProbeFailed, res.ProbeBaseline = len(samples), pf, base
	for i := range res.Upgrades {
		ev := &res.Upgrades[i]
		ev.ProbeMaxMs = round1(float64(maxIn[i]) / 1e6)
		ev.NotAcceptingMs = round1(max(0, ev.ProbeMaxMs-base.P50ms))
		res.NotAcceptingMs = max(res.NotAcceptingMs, ev.NotAcceptingMs)
	}
	after, err := getAdmin(ctx, admin)
	if err != nil {
		return err
	}
	res.EdgePIDAfter, res.WorkerPIDsAfter = after.PID, after.workerPIDs()
	res.Pass = res.WSDropped == 0 && res.HTTPFailed == 0 && res.ProbeFailed == 0 && res.EdgePIDBefore == res.EdgePIDAfter &&
		slices.Equal(res.WorkerPIDsBefore, res.WorkerPIDsAfter) && len(res.Upgrades) == *upgrades
	if err := emit(out, res); err != nil {
		return err
	}
	var ups []string
	for _, ev := range res.Upgrades {
		ups = append(ups, fmt.Sprintf("gen %d→%d in %.0f ms (probe max %.1f ms)", ev.FromGeneration, ev.ToGeneration, ev.Ms, ev.ProbeMaxMs))
	}
	fmt.Fprintf(stderr, "\nupgrade-drill summary: %d WebSockets over %d workers, %d upgrades: %s\n", *n, res.Workers, len(res.Upgrades), strings.Join(ups, "; "))
	fmt.Fprintf(stderr, "  WebSockets dropped: %d (must be 0); answering after the upgrades: %d of %d\n", res.WSDropped, res.WSAliveAtEnd, *n)
	fmt.Fprintf(stderr, "  HTTP: %d requests, %d failed (must be 0), %d TCP connections for %d keep-alive streams, p99 %.1f ms\n",
		res.HTTPRequests, res.HTTPFailed, res.HTTPConnections, *streams, res.HTTPLatency.P99ms)
	fmt.Fprintf(stderr, "  edge pid %d → %d; worker pids %v → %v\n", res.EdgePIDBefore, res.EdgePIDAfter, res.WorkerPIDsBefore, res.WorkerPIDsAfter)
	fmt.Fprintf(stderr, "  new-connection probe: %d probes, %d failed; baseline p50 %.2f ms p99 %.2f ms; listener not accepting ≈ %.1f ms (max over upgrades)\n",
		res.ProbeCount, res.ProbeFailed, base.P50ms, base.P99ms, res.NotAcceptingMs)
	fmt.Fprintf(stderr, "  PASS: %v\n", res.Pass)
	if !res.Pass {
		return errors.New("upgrade drill failed (see the summary)")
	}
	return nil
}
