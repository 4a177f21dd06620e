//go:build unix

package main

// pools: the seed's scenario of issue 15 against a real edge it starts — 2 socket.io
// workers in the default pool, 100 socket.io clients echoing, then 20 simultaneous
// 5-second /reports/ requests that a reports pool (min=0, max=8, concurrency=1) takes on
// workers it starts for them and stops when they are idle — and the growth and shrink
// timeline of the pool, every 250 ms.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// poolsAdmin is /admin/workers with the pools list.
type poolsAdmin struct {
	Workers []struct {
		Slot     int    `json:"slot"`
		Pool     string `json:"pool"`
		PID      int    `json:"pid"`
		State    string `json:"state"`
		Sessions int    `json:"sessions"`
	} `json:"workers"`
	Pools []struct {
		Name     string `json:"name"`
		Workers  int    `json:"workers"`
		Ready    int    `json:"ready"`
		InFlight int    `json:"in_flight"`
		Waiting  int    `json:"waiting"`
		Min      int    `json:"min"`
		Max      int    `json:"max"`
	} `json:"pools"`
}

func getPoolsAdmin(ctx context.Context, base string) (*poolsAdmin, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/admin/workers", nil)
	if err != nil {
		return nil, err
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /admin/workers: %s", resp.Status)
	}
	var a poolsAdmin
	return &a, json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&a)
}

// poolStarting reads stickyd_pool_workers{pool=name,state="starting"} from /metrics: the
// admin view lists only workers in routing.
func poolStarting(ctx context.Context, base, name string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "stickyd_pool_workers{") && strings.Contains(line, `pool="`+name+`"`) &&
			strings.Contains(line, `state="starting"`) {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			return int(v), err
		}
	}
	return 0, sc.Err()
}

// poolsSample is one timeline row.
type poolsSample struct {
	T        float64 `json:"t"`
	Phase    string  `json:"phase"`
	Starting int     `json:"starting"`
	Ready    int     `json:"ready"`
	InFlight int     `json:"in_flight"`
	Queue    int     `json:"queue"`
	Done     int64   `json:"done"`
}

// poolsEcho is a phase of pools-clients.js.
type poolsEcho struct {
	Phase       string         `json:"phase"`
	Echoes      int            `json:"echoes"`
	Failed      int            `json:"failed"`
	P50         float64        `json:"p50"`
	P99         float64        `json:"p99"`
	Max         float64        `json:"max"`
	Disconnects int            `json:"disconnects"`
	Errors      map[string]int `json:"errors"`
	// Windows are the echoes sent in each second of the phase.
	Windows []struct {
		S      int     `json:"s"`
		Echoes int     `json:"echoes"`
		P50    float64 `json:"p50"`
		P99    float64 `json:"p99"`
	} `json:"windows"`
}

type poolsResult struct {
	Mode            string        `json:"mode"`
	Pool            string        `json:"pool"`
	Workers         int           `json:"workers"`
	Clients         int           `json:"clients"`
	Reports         int           `json:"reports"`
	ReportMs        int           `json:"report_ms"`
	ReportsOK       int           `json:"reports_ok"`
	ReportsOverlap  int           `json:"reports_overlapping"` // answers whose worker had another report in progress
	ReportPIDs      int           `json:"report_pids"`
	AllDoneS        float64       `json:"all_done_s"`
	FirstReadyS     float64       `json:"first_ready_s"`
	FourthReadyS    float64       `json:"fourth_ready_s"`
	PeakReadyS      float64       `json:"peak_ready_s"`
	Peak            int           `json:"peak"`
	Min             int           `json:"min"`
	Max             int           `json:"max"`
	BackToMinS      float64       `json:"back_to_min_s"` // back to the pool's min (0 by default) workers; -1: not within the wait
	EchoA           poolsEcho     `json:"echo_a"`
	EchoB           poolsEcho     `json:"echo_b"`
	P99Ratio        float64       `json:"p99_ratio"`
	SessionsKept    bool          `json:"sessions_kept"`
	CPUA            poolsCPU      `json:"cpu_a"`
	CPUB            poolsCPU      `json:"cpu_b"`
	Timeline        []poolsSample `json:"timeline"`
	WithinIssueGoal bool          `json:"within_issue_goal"` // all done ≤ 15 s and p99 ratio ≤ 2
	Pass            bool          `json:"pass"`
}

// poolsClients drives pools-clients.js: one command line in, one JSON line out.
type poolsClients struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

func (p *poolsClients) read(what string, timeout time.Duration) (map[string]json.RawMessage, []byte, error) {
	select {
	case line, ok := <-p.lines:
		if !ok {
			return nil, nil, fmt.Errorf("pools-clients.js ended before answering %s", what)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			return nil, nil, fmt.Errorf("pools-clients.js %s: %q: %v", what, line, err)
		}
		if string(m["event"]) == `"error"` {
			return nil, nil, fmt.Errorf("pools-clients.js %s: %s", what, m["error"])
		}
		return m, []byte(line), nil
	case <-time.After(timeout):
		return nil, nil, fmt.Errorf("pools-clients.js did not answer %s within %s", what, timeout)
	}
}

func (p *poolsClients) do(cmd string, timeout time.Duration, v any) error {
	if _, err := io.WriteString(p.in, cmd+"\n"); err != nil {
		return fmt.Errorf("pools-clients.js %s: %w", cmd, err)
	}
	_, line, err := p.read(cmd, timeout)
	if err != nil || v == nil {
		return err
	}
	return json.Unmarshal(line, v)
}

func (p *poolsClients) stop() {
	p.in.Close() // the clients disconnect and the script exits
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

func runPools(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("pools", flag.ContinueOnError)
	stickyd := fs.String("stickyd", "/tmp/stickyd", "stickyd binary (go build -o /tmp/stickyd ./cmd/stickyd)")
	node := fs.String("node", "node", "node binary")
	appDir := fs.String("app-dir", "cmd/stickyd/testdata/socketio", "the socket.io fixtures (pools-app.js, pools-clients.js, node_modules installed)")
	workers := fs.Int("workers", 2, "socket.io workers in the default pool")
	spec := fs.String("pool", "reports:path=/reports/,min=0,max=8,concurrency=1,idle=5s", "the -pool given to stickyd; the reports go to its path")
	clients := fs.Int("clients", 100, "socket.io clients echoing (one echo in flight each, then -interval)")
	interval := fs.Duration("interval", 100*time.Millisecond, "pause between two echoes of a client")
	reports := fs.Int("reports", 20, "simultaneous slow requests")
	reportMs := fs.Int("report-ms", 5000, "how long the app takes to answer a report, in ms (REPORT_MS)")
	phase := fs.Duration("phase", 8*time.Second, "phase A: echo without the reports load for this long")
	every := fs.Duration("every", 250*time.Millisecond, "timeline interval")
	wait := fs.Duration("shrink-wait", 2*time.Minute, "after the reports: wait at most this long for the pool to be back at min")
	quiet := fs.Bool("q", false, "no timeline on stderr as it happens (it is printed on stdout at the end either way)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *workers < 1 || *workers > 64 || *clients < 1 || *clients > 5000 || *reports < 1 || *reports > 1000 ||
		*reportMs < 0 || *reportMs > 600000 || *phase <= 0 || *phase > 10*time.Minute || *every < 10*time.Millisecond ||
		*interval < 0 || *wait <= 0 || *wait > 30*time.Minute {
		return errors.New("bounded runs only: -workers 1..64, -clients 1..5000, -reports 1..1000, -report-ms 0..600000, -phase up to 10m, -every ≥ 10ms, -shrink-wait up to 30m")
	}
	poolName, rest, ok := strings.Cut(*spec, ":")
	path := ""
	for item := range strings.SplitSeq(rest, ",") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(item), "path="); ok {
			path = v
		}
	}
	if !ok || poolName == "" || !strings.HasPrefix(path, "/") {
		return fmt.Errorf("-pool %q: want NAME:path=/prefix/,… (the reports are sent to the path)", *spec)
	}
	if !isExec(*stickyd) {
		return fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", *stickyd, *stickyd)
	}
	dir, err := filepath.Abs(*appDir)
	if err != nil {
		return err
	}
	for _, f := range []string{"pools-app.js", "pools-clients.js", "node_modules/socket.io-client"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return fmt.Errorf("-app-dir %s: no %s (run npm ci there): %v", dir, f, err)
		}
	}

	// The edge.
	p, err := freeListenPort()
	if err != nil {
		return err
	}
	mp, err := freeListenPort()
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	admin := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(mp))
	edge := exec.Command(*stickyd, "run", "-listen", addr, "-workers", strconv.Itoa(*workers),
		"-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn", "-shutdown-timeout", "5s",
		"-pool", *spec, "--", *node, "pools-app.js")
	edge.Dir = dir
	edge.Env = append(os.Environ(), "REPORT_MS="+strconv.Itoa(*reportMs))
	edge.Stdout, edge.Stderr = os.Stderr, os.Stderr
	edge.SysProcAttr = childAttr()
	if err := edge.Start(); err != nil {
		return err
	}
	t := &target{name: "stickyd", procs: []*exec.Cmd{edge}}
	defer t.stop()
	// Ready: the default pool's workers, and the named pool's min (its pools entry exists).
	if err := waitPoolsReady(ctx, admin, poolName, *workers, time.Minute); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "stickybench pools: started %s run -listen %s -workers %d -pool '%s' -- node pools-app.js (edge pid %d)\n",
		*stickyd, addr, *workers, *spec, edge.Process.Pid)

	// The socket.io clients.
	pc := &poolsClients{lines: make(chan string, 16)}
	pc.cmd = exec.Command(*node, "pools-clients.js", "--url", "http://"+addr, "--clients", strconv.Itoa(*clients),
		"--interval-ms", strconv.FormatInt(interval.Milliseconds(), 10))
	pc.cmd.Dir = dir
	pc.cmd.Stderr = os.Stderr
	pc.cmd.SysProcAttr = childAttr()
	if pc.in, err = pc.cmd.StdinPipe(); err != nil {
		return err
	}
	so, err := pc.cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := pc.cmd.Start(); err != nil {
		return err
	}
	defer pc.stop()
	go func() {
		defer close(pc.lines)
		sc := bufio.NewScanner(so)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			pc.lines <- sc.Text()
		}
	}()
	_, line, err := pc.read("connect", 3*time.Minute)
	if err != nil {
		return err
	}
	var conn struct{ Connected, Upgraded int }
	json.Unmarshal(line, &conn)
	fmt.Fprintf(stderr, "stickybench pools: %s\n", line)
	if conn.Connected != *clients {
		return fmt.Errorf("only %d of %d socket.io clients connected: %s", conn.Connected, *clients, line)
	}

	var defPIDs []int
	if a, err := getPoolsAdmin(ctx, admin); err == nil {
		for _, w := range a.Workers {
			if w.Pool == "default" {
				defPIDs = append(defPIDs, w.PID)
			}
		}
	}
	snap := func() cpuSnap { return takeCPUSnap(edge.Process.Pid, defPIDs, pc.cmd.Process.Pid) }

	res := &poolsResult{Mode: "pools", Pool: *spec, Workers: *workers, Clients: *clients, Reports: *reports, ReportMs: *reportMs, BackToMinS: -1}

	// Phase A: echoes alone, a fixed measurement window.
	if err := pc.do("start A", 30*time.Second, nil); err != nil {
		return err
	}
	a0 := snap()
	sleepCtx(ctx, *phase)
	a1 := snap()
	if err := pc.do("stop", time.Minute, &res.EchoA); err != nil {
		return err
	}
	res.CPUA = cpuBetween(a0, a1, 0)
	if err := ctx.Err(); err != nil {
		return err
	}
	fmt.Fprintf(out, "phase A (%d clients echoing, no reports): echo p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d echoes, %d failed, %d disconnects; p99 per second %s\n  %s\n",
		*clients, res.EchoA.P50, res.EchoA.P99, res.EchoA.Max, res.EchoA.Echoes, res.EchoA.Failed, res.EchoA.Disconnects, res.EchoA.perSecondP99(), res.CPUA)

	// Phase B: the same echoes while the reports run; the timeline from the moment they are sent.
	if err := pc.do("start B", 30*time.Second, nil); err != nil {
		return err
	}
	var (
		done     atomic.Int64
		phaseB   atomic.Bool
		mu       sync.Mutex
		answers  []struct{ status, concurrent, pid int }
		allDone  time.Duration
		sampling = make(chan struct{})
		sampled  = make(chan struct{})
		zeroAt   = make(chan time.Duration, 1)
		repTicks = map[int]int64{} // reports worker pid → its CPU ticks, last seen during phase B
	)
	phaseB.Store(true)
	b0 := snap()
	start := time.Now()
	header := fmt.Sprintf("%7s  %-5s  %8s  %5s  %9s  %5s  %4s", "t(s)", "phase", "starting", "ready", "in_flight", "queue", "done")
	const echoCol = "  echo p50/p99 ms (that second)"
	if !*quiet {
		fmt.Fprintln(stderr, header)
	}
	go func() {
		defer close(sampled)
		tick := time.NewTicker(*every)
		defer tick.Stop()
		grew, poolMin := false, 0
		for {
			s := poolsSample{T: time.Since(start).Seconds(), Phase: "B", Done: done.Load()}
			if !phaseB.Load() {
				s.Phase = "after"
			}
			a, aerr := getPoolsAdmin(ctx, admin)
			st, serr := poolStarting(ctx, admin, poolName)
			if aerr == nil && serr == nil {
				for _, pl := range a.Pools {
					if pl.Name == poolName {
						s.Ready, s.InFlight, s.Queue = pl.Ready, pl.InFlight, pl.Waiting
						res.Min, res.Max, poolMin = pl.Min, pl.Max, pl.Min
					}
				}
				s.Starting = st
				mu.Lock()
				if phaseB.Load() {
					for _, w := range a.Workers {
						if w.Pool == poolName && w.PID > 0 {
							repTicks[w.PID] = max(repTicks[w.PID], procCPUTicks(w.PID))
						}
					}
				}
				res.Timeline = append(res.Timeline, s)
				if s.Ready > res.Peak {
					res.Peak, res.PeakReadyS = s.Ready, s.T
				}
				if s.Ready >= 1 && res.FirstReadyS == 0 {
					res.FirstReadyS = s.T
				}
				if s.Ready >= 4 && res.FourthReadyS == 0 {
					res.FourthReadyS = s.T
				}
				mu.Unlock()
				if !*quiet {
					fmt.Fprintf(stderr, "%7.2f  %-5s  %8d  %5d  %9d  %5d  %4d\n", s.T, s.Phase, s.Starting, s.Ready, s.InFlight, s.Queue, s.Done)
				}
				grew = grew || s.Ready > poolMin || s.Starting > 0
				if grew && s.Ready <= poolMin && s.Starting == 0 && s.Done == int64(*reports) {
					zeroAt <- time.Since(start)
					return
				}
			}
			select {
			case <-sampling:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	hc := &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	var wg sync.WaitGroup
	for i := range *reports {
		wg.Go(func() {
			var a struct{ status, concurrent, pid int }
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path+"bench-"+strconv.Itoa(i), nil)
			resp, err := hc.Do(req)
			if err == nil {
				var body struct {
					PID        int `json:"pid"`
					Concurrent int `json:"concurrent"`
				}
				a.status = resp.StatusCode
				if json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&body) == nil {
					a.pid, a.concurrent = body.PID, body.Concurrent
				}
				resp.Body.Close()
			}
			done.Add(1)
			mu.Lock()
			answers = append(answers, a)
			mu.Unlock()
		})
	}
	wg.Wait()
	allDone = time.Since(start)
	b1 := snap()
	mu.Lock()
	phaseB.Store(false)
	var rt int64
	for _, t := range repTicks {
		rt += t
	}
	mu.Unlock()
	res.CPUB = cpuBetween(b0, b1, rt)
	if err := pc.do("stop", time.Minute, &res.EchoB); err != nil {
		return err
	}
	res.AllDoneS = allDone.Seconds()
	select {
	case d := <-zeroAt:
		res.BackToMinS = d.Seconds()
	case <-time.After(*wait):
	case <-ctx.Done():
	}
	close(sampling)
	<-sampled

	var check struct {
		Connected, WorkerChanged, Disconnects int
		PerWorker                             map[string]int
	}
	if err := pc.do("check", 2*time.Minute, &check); err != nil {
		return err
	}
	res.SessionsKept = check.Connected == *clients && check.WorkerChanged == 0 && check.Disconnects == 0
	for k := range check.PerWorker {
		if n, err := strconv.Atoi(k); err != nil || n >= *workers {
			res.SessionsKept = false // a session outside the default pool
		}
	}
	pids := map[int]bool{}
	for _, a := range answers {
		if a.status == http.StatusOK {
			res.ReportsOK++
			pids[a.pid] = true
		}
		if a.concurrent != 0 {
			res.ReportsOverlap++
		}
	}
	res.ReportPIDs = len(pids)
	if res.EchoA.P99 > 0 {
		res.P99Ratio = res.EchoB.P99 / res.EchoA.P99
	}
	res.WithinIssueGoal = res.AllDoneS <= 15 && res.P99Ratio <= 2
	res.Pass = res.ReportsOK == *reports && res.ReportsOverlap == 0 && res.Peak == res.Max && res.BackToMinS >= 0 &&
		res.SessionsKept && res.EchoA.Failed == 0 && res.EchoB.Failed == 0 && res.EchoA.Disconnects == 0 && res.EchoB.Disconnects == 0

	fmt.Fprintf(out, "phase B (%d clients echoing, %d reports of %d ms): echo p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d echoes, %d failed, %d disconnects\n  %s\n",
		*clients, *reports, *reportMs, res.EchoB.P50, res.EchoB.P99, res.EchoB.Max, res.EchoB.Echoes, res.EchoB.Failed, res.EchoB.Disconnects, res.CPUB)
	fmt.Fprintf(out, "timeline of pool %s (t from the moment the %d reports were sent):\n%s%s\n", poolName, *reports, header, echoCol)
	lastSec := -1
	for _, s := range res.Timeline {
		echo := ""
		// The echo figures of second k of phase B, on the first row of that second.
		if sec := int(s.T); s.Phase == "B" && sec != lastSec && sec < len(res.EchoB.Windows) {
			lastSec = sec
			w := res.EchoB.Windows[sec]
			echo = fmt.Sprintf("  %5.1f / %5.1f  (%d echoes)", w.P50, w.P99, w.Echoes)
		}
		fmt.Fprintf(out, "%7.2f  %-5s  %8d  %5d  %9d  %5d  %4d%s\n", s.T, s.Phase, s.Starting, s.Ready, s.InFlight, s.Queue, s.Done, echo)
	}
	back := "not within " + wait.String()
	if res.BackToMinS >= 0 {
		back = fmt.Sprintf("t=%.1f s", res.BackToMinS)
	}
	fmt.Fprintf(out, "summary: all %d done in %.1f s (%d answered 200, from %d pids, %d overlapping on a worker); pool peak %d of max %d "+
		"(first ready %.1f s, 4th %.1f s, peak %.1f s); back to min=%d at %s; echo p99 A %.1f ms, B %.1f ms, ratio %.2f; sessions kept %v; pass %v\n",
		*reports, res.AllDoneS, res.ReportsOK, res.ReportPIDs, res.ReportsOverlap, res.Peak, res.Max,
		res.FirstReadyS, res.FourthReadyS, res.PeakReadyS, res.Min, back, res.EchoA.P99, res.EchoB.P99, res.P99Ratio, res.SessionsKept, res.Pass)
	return emit(out, res)
}

// perSecondP99 lists the p99 of every second of the phase, in ms.
func (e *poolsEcho) perSecondP99() string {
	var b strings.Builder
	for i, w := range e.Windows {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%.0f", w.P99)
	}
	return "[" + b.String() + "]"
}

// poolsCPU is where CPU time went during a phase (Linux /proc; zeros elsewhere). The
// machine figure counts every process, the bench's own and everyone else's: on a shared
// machine it tells an echo spike caused by the pool from one caused by a neighbour.
type poolsCPU struct {
	Seconds        float64 `json:"seconds"`               // the phase's wall time
	MachineCores   float64 `json:"machine_busy_cores"`    // average cores busy, all processes
	Edge           float64 `json:"edge_cpu_s"`            // stickyd
	DefaultWorkers float64 `json:"default_workers_cpu_s"` // the socket.io workers
	ReportsWorkers float64 `json:"reports_workers_cpu_s"` // the pool's workers seen in the phase, since each started (its start included)
	Clients        float64 `json:"clients_cpu_s"`         // pools-clients.js
	OthersCores    float64 `json:"others_busy_cores"`     // machine minus the above, average cores
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on every Linux ABI in use.
const clockTicks = 100

// procCPUTicks is pid's user+system CPU time in clock ticks (0 if unknown).
func procCPUTicks(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces: count fields after its closing ")".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return u + st
}

// machineCPUTicks is the CPU time of all cores, busy and in all (/proc/stat's cpu line).
func machineCPUTicks() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return 0, 0
	}
	var idle int64
	for k, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if k >= 8 {
			break // guest time is already in user
		}
		total += n
		if k == 3 || k == 4 { // idle, iowait
			idle += n
		}
	}
	return total - idle, total
}

// cpuSnap is a reading of the CPU counters poolsCPU compares.
type cpuSnap struct {
	at                 time.Time
	busy, total        int64
	edge, def, clients int64
}

func takeCPUSnap(edge int, def []int, clients int) cpuSnap {
	s := cpuSnap{at: time.Now(), edge: procCPUTicks(edge), clients: procCPUTicks(clients)}
	s.busy, s.total = machineCPUTicks()
	for _, p := range def {
		s.def += procCPUTicks(p)
	}
	return s
}

// cpuBetween is the CPU spent from a to b; reports is the pool workers' ticks.
func cpuBetween(a, b cpuSnap, reports int64) poolsCPU {
	sec := func(t int64) float64 { return float64(t) / clockTicks }
	c := poolsCPU{Seconds: b.at.Sub(a.at).Seconds(), Edge: sec(b.edge - a.edge), DefaultWorkers: sec(b.def - a.def),
		Clients: sec(b.clients - a.clients), ReportsWorkers: sec(reports)}
	if c.Seconds > 0 && b.total > a.total {
		c.MachineCores = sec(b.busy-a.busy) / c.Seconds
		ours := c.Edge + c.DefaultWorkers + c.Clients + c.ReportsWorkers
		c.OthersCores = max(0, sec(b.busy-a.busy)-ours) / c.Seconds
	}
	return c
}

func (c poolsCPU) String() string {
	if c.MachineCores == 0 {
		return "CPU: n/a (no /proc)"
	}
	return fmt.Sprintf("CPU over %.1f s: machine %.2f cores busy of %d (every process); edge %.2f s, socket.io workers %.2f s, reports workers %.2f s, clients %.2f s; other processes %.2f cores",
		c.Seconds, c.MachineCores, runtime.NumCPU(), c.Edge, c.DefaultWorkers, c.ReportsWorkers, c.Clients, c.OthersCores)
}

// waitPoolsReady polls /admin/workers until the default pool has workers ready and the
// pool named name has its min ready.
func waitPoolsReady(ctx context.Context, admin, name string, workers int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		a, err := getPoolsAdmin(ctx, admin)
		if err == nil {
			def, named, found := 0, 0, false
			minReady := 0
			for _, p := range a.Pools {
				switch p.Name {
				case "default":
					def = p.Ready
				case name:
					named, minReady, found = p.Ready, p.Min, true
				}
			}
			if def == workers && found && named >= minReady {
				return nil
			}
			last = fmt.Sprintf("default pool %d of %d ready, pool %s listed %v with %d of min %d ready", def, workers, name, found, named, minReady)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("admin %s: the edge is not ready within %s: %s", admin, timeout, last)
}
