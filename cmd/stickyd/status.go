//go:build unix

package main

import (
	"context"
	"embed"
	"encoding/json"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
)

// The status page: status.html with its script and style, no external asset, so it works
// on a host without internet access and under a strict Content-Security-Policy.
//
//go:embed status.html status.js status.css
var statusFiles embed.FS

const (
	statusEvery   = 2 * time.Second // sampling interval of the charts
	statusHistory = 150             // samples kept: 5 minutes at statusEvery
)

// statusSample is one point of the charts: counters as read, rates derived on output.
type statusSample struct {
	at       time.Time
	handoffs float64 // stickyd_handoffs_total{result="ok"}, all workers
	requests float64 // stickyd_requests_proxied_total, all workers
	conns    float64 // stickyd_connections_accepted_total, all results
	sessions map[int]int
}

// statusBoard serves GET /admin/status (JSON) and the page at /. It keeps the last few
// minutes of samples so a page opened now shows history; sampling runs in run (started
// with the edge) and also on demand, so an admin handler without run still charts
// while someone watches.
type statusBoard struct {
	b          *balancer.Balancer
	sup        *workers.Supervisor
	g          prometheus.Gatherer
	generation int

	mu      sync.Mutex
	samples []statusSample // oldest first, at most statusHistory
}

func newStatusBoard(b *balancer.Balancer, sup *workers.Supervisor, g prometheus.Gatherer, generation int) *statusBoard {
	return &statusBoard{b: b, sup: sup, g: g, generation: generation}
}

// run samples every statusEvery until ctx ends.
func (s *statusBoard) run(ctx context.Context) {
	t := time.NewTicker(statusEvery)
	defer t.Stop()
	for {
		s.sample(time.Now(), false)
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// gather reads the registry into families by name.
func (s *statusBoard) gather() map[string]*dto.MetricFamily {
	out := map[string]*dto.MetricFamily{}
	if s.g == nil {
		return out
	}
	mfs, _ := s.g.Gather() // a partial result is still worth showing
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// sample records a point unless one was taken less than a second ago (on-demand calls
// from several open pages must not crowd the history).
func (s *statusBoard) sample(now time.Time, onDemand bool) map[string]*dto.MetricFamily {
	mfs := s.gather()
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := len(s.samples); n > 0 && onDemand && now.Sub(s.samples[n-1].at) < time.Second {
		return mfs
	}
	sm := statusSample{
		at:       now,
		handoffs: sumMetric(mfs[metrics.NameHandoffs], map[string]string{"result": metrics.HandoffOK}),
		requests: sumMetric(mfs[metrics.NameRequestsProxied], nil),
		conns:    sumMetric(mfs[metrics.NameConnectionsAccepted], nil),
		sessions: map[int]int{},
	}
	for _, w := range s.b.Workers() {
		sm.sessions[w.Slot] = s.b.Sessions().Count(w.Slot)
	}
	s.samples = append(s.samples, sm)
	if len(s.samples) > statusHistory {
		s.samples = append(s.samples[:0], s.samples[len(s.samples)-statusHistory:]...)
	}
	return mfs
}

// sumMetric adds the values of a counter or gauge family's series whose labels match.
func sumMetric(mf *dto.MetricFamily, match map[string]string) float64 {
	if mf == nil {
		return 0
	}
	var sum float64
	for _, m := range mf.GetMetric() {
		if !labelsMatch(m, match) {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		}
	}
	return sum
}

func labelsMatch(m *dto.Metric, match map[string]string) bool {
	for k, v := range match {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == k && lp.GetValue() == v {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// byLabel sums a family's series by the value of one label.
func byLabel(mf *dto.MetricFamily, label string, match map[string]string) map[string]float64 {
	out := map[string]float64{}
	if mf == nil {
		return out
	}
	for _, m := range mf.GetMetric() {
		if !labelsMatch(m, match) {
			continue
		}
		for _, lp := range m.GetLabel() {
			if lp.GetName() == label {
				out[lp.GetValue()] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
	}
	return out
}

// statusWorker is one row of the page's worker table.
type statusWorker struct {
	Pool       string   `json:"pool"` // "default" unless a -pool names it
	Slot       int      `json:"slot"`
	PID        int      `json:"pid"`
	State      string   `json:"state"`
	Sessions   int      `json:"sessions"`
	WebSockets int64    `json:"websockets"`
	Handoffs   float64  `json:"handoffs"`
	Requests   float64  `json:"requests"`
	Restarts   float64  `json:"restarts"`
	InFlight   int      `json:"in_flight"`      // proxied requests not answered yet
	Uptime     *float64 `json:"uptime_seconds"` // null when the process is not visible (another pid namespace)
}

type statusEdge struct {
	Version     string             `json:"version"`
	Commit      string             `json:"commit"`
	Generation  int                `json:"generation"`
	PID         int                `json:"pid"`
	Uptime      *float64           `json:"uptime_seconds"` // of the process: edge upgrades keep the pid
	Ready       bool               `json:"ready"`
	Sessions    int                `json:"sessions"`
	OpenFDs     float64            `json:"open_fds"`
	Connections map[string]float64 `json:"connections"` // accepted, by result
	Rejections  map[string]float64 `json:"rejections"`  // by reason, those seen
	Handoffs    float64            `json:"handoffs"`
	Requests    float64            `json:"requests"`
}

type statusSeries struct {
	T        []int64            `json:"t"` // unix milliseconds
	Handoffs []float64          `json:"handoffs_per_second"`
	Requests []float64          `json:"requests_per_second"`
	Conns    []float64          `json:"connections_per_second"`
	Sessions map[string][]int64 `json:"sessions"` // by slot; -1 where the slot had no worker
}

type statusDoc struct {
	Stickyd  bool           `json:"stickyd"`
	Now      int64          `json:"now"`
	Interval float64        `json:"interval_seconds"`
	Edge     statusEdge     `json:"edge"`
	Workers  []statusWorker `json:"workers"`
	History  statusSeries   `json:"history"`
}

func (s *statusBoard) doc(now time.Time) statusDoc {
	mfs := s.sample(now, true)
	v := buildVersion()
	d := statusDoc{Stickyd: true, Now: now.UnixMilli(), Interval: statusEvery.Seconds(), Workers: []statusWorker{}}
	d.Edge = statusEdge{
		Version: v.Version, Commit: v.Commit, Generation: s.generation, PID: os.Getpid(),
		Uptime: procUptime(os.Getpid()), Ready: s.b.Ready(), Sessions: s.b.Sessions().Len(),
		OpenFDs:     sumMetric(mfs["process_open_fds"], nil),
		Connections: byLabel(mfs[metrics.NameConnectionsAccepted], "result", nil),
		Rejections:  map[string]float64{},
		Handoffs:    sumMetric(mfs[metrics.NameHandoffs], map[string]string{"result": metrics.HandoffOK}),
		Requests:    sumMetric(mfs[metrics.NameRequestsProxied], nil),
	}
	for reason, n := range byLabel(mfs[metrics.NameRejections], "reason", nil) {
		if n > 0 {
			d.Edge.Rejections[reason] = n
		}
	}
	handoffs := byLabel(mfs[metrics.NameHandoffs], "worker", map[string]string{"result": metrics.HandoffOK})
	requests := byLabel(mfs[metrics.NameRequestsProxied], "worker", nil)
	restarts := byLabel(mfs[metrics.NameWorkerRestarts], "worker", nil)
	for _, w := range s.b.Workers() {
		l := metrics.WorkerLabel(w.Slot)
		d.Workers = append(d.Workers, statusWorker{
			Pool: poolLabel(w.PoolName), Slot: w.Slot, PID: w.PID, State: w.State().String(),
			Sessions: s.b.Sessions().Count(w.Slot), WebSockets: w.WebSockets(),
			Handoffs: handoffs[l], Requests: requests[l], Restarts: restarts[l], InFlight: w.InFlight(), Uptime: procUptime(w.PID),
		})
	}
	sort.Slice(d.Workers, func(i, j int) bool { return d.Workers[i].Slot < d.Workers[j].Slot })

	s.mu.Lock()
	defer s.mu.Unlock()
	h := statusSeries{Sessions: map[string][]int64{}}
	slots := map[int]bool{}
	for _, sm := range s.samples {
		for slot := range sm.sessions {
			slots[slot] = true
		}
	}
	for i := 1; i < len(s.samples); i++ {
		a, b := s.samples[i-1], s.samples[i]
		dt := b.at.Sub(a.at).Seconds()
		if dt <= 0 {
			continue
		}
		rate := func(x, y float64) float64 { return max(0, y-x) / dt } // a reset counts as 0
		h.T = append(h.T, b.at.UnixMilli())
		h.Handoffs = append(h.Handoffs, rate(a.handoffs, b.handoffs))
		h.Requests = append(h.Requests, rate(a.requests, b.requests))
		h.Conns = append(h.Conns, rate(a.conns, b.conns))
		for slot := range slots {
			n, ok := b.sessions[slot]
			v := int64(n)
			if !ok {
				v = -1
			}
			k := strconv.Itoa(slot)
			h.Sessions[k] = append(h.Sessions[k], v)
		}
	}
	d.History = h
	return d
}

// procUptime is how long process pid has run, from /proc (nil if it is not visible).
func procUptime(pid int) *float64 {
	if pid <= 0 {
		return nil
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	// Field 22 is starttime in clock ticks after boot; fields after the ")" that ends
	// the command name (which may contain spaces) start at field 3.
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		return nil
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 20 {
		return nil
	}
	ticks, err := strconv.ParseFloat(f[19], 64)
	if err != nil {
		return nil
	}
	up, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return nil
	}
	sysUp, err := strconv.ParseFloat(strings.Fields(string(up))[0], 64)
	if err != nil {
		return nil
	}
	const clkTck = 100 // USER_HZ: 100 on every Linux architecture Go supports
	u := max(0, sysUp-ticks/clkTck)
	return &u
}

// serveStatus answers GET /admin/status.
func (s *statusBoard) serveStatus(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(s.doc(time.Now()))
}

// statusCSP allows the page its own script, style and /admin/status, nothing else, and
// no framing (the admin origin must not be drawn inside another site's page).
const statusCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

// servePage answers GET / and the page's two assets.
func servePage(w http.ResponseWriter, r *http.Request) {
	name, ctype := "status.html", "text/html; charset=utf-8"
	switch r.URL.Path {
	case "/status.js":
		name, ctype = "status.js", "text/javascript; charset=utf-8"
	case "/status.css":
		name, ctype = "status.css", "text/css; charset=utf-8"
	}
	b, err := statusFiles.ReadFile(name)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", ctype)
	h.Set("Content-Security-Policy", statusCSP)
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-cache")
	w.Write(b)
}
