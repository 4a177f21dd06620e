package metrics

import (
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape serves Handler(g) on a real loopback server, GETs /metrics and
// parses the text exposition format.
func scrape(t *testing.T, g prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(Handler(g))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET /metrics: %s: %s", resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("Content-Type = %q, want text/plain", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse exposition: %v", err)
	}
	return mfs
}

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, lp := range m.GetLabel() {
		out[lp.GetName()] = lp.GetValue()
	}
	return out
}

func labelKey(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k + "=" + l[k])
	}
	return b.String()
}

// values maps the label set of each series of family name to its value
// (counter or gauge).
func values(t *testing.T, mfs map[string]*dto.MetricFamily, name string, typ dto.MetricType) map[string]float64 {
	t.Helper()
	mf, ok := mfs[name]
	if !ok {
		t.Fatalf("family %s missing from scrape", name)
	}
	if mf.GetType() != typ {
		t.Fatalf("%s: type %v, want %v", name, mf.GetType(), typ)
	}
	out := map[string]float64{}
	for _, m := range mf.GetMetric() {
		k := labelKey(labelsOf(m))
		if _, dup := out[k]; dup {
			t.Fatalf("%s: duplicate series {%s}", name, k)
		}
		switch typ {
		case dto.MetricType_COUNTER:
			out[k] = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			out[k] = m.GetGauge().GetValue()
		}
	}
	return out
}

func assertSeries(t *testing.T, name string, got, want map[string]float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d series %v, want %d %v", name, len(got), got, len(want), want)
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("%s{%s} missing (have %v)", name, k, got)
			continue
		}
		if g != w {
			t.Errorf("%s{%s} = %v, want %v", name, k, g, w)
		}
	}
}

func TestScrapeExactValues(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, false)
	if err != nil {
		t.Fatal(err)
	}
	m.ConnectionsAccepted.WithLabelValues(AcceptHandedOff).Add(3)
	m.ConnectionsAccepted.WithLabelValues(AcceptProxied).Inc()
	m.Rejections.WithLabelValues(RejectSmuggling).Add(2)
	m.Handoffs.WithLabelValues(WorkerLabel(0), HandoffOK).Add(5)
	m.Handoffs.WithLabelValues(WorkerLabel(1), HandoffTimeout).Inc()
	m.HandoffDuration.Observe(20e-6)
	m.HandoffDuration.Observe(0.5)
	m.HandoffDuration.Observe(3) // above the last bucket: only +Inf
	m.RequestsProxied.WithLabelValues(WorkerLabel(2), StatusClass(200)).Add(7)
	m.RequestsProxied.WithLabelValues(WorkerLabel(2), StatusClass(404)).Inc()
	m.Sessions.WithLabelValues(WorkerLabel(0)).Set(10)
	m.Sessions.WithLabelValues(WorkerLabel(3)).Set(4)
	m.WebSockets.WithLabelValues(WorkerLabel(3)).Set(2)
	m.Workers.WithLabelValues(WorkerReady).Set(3)
	m.Workers.WithLabelValues(WorkerStarting).Set(1)
	m.WorkerRestarts.WithLabelValues(WorkerLabel(1)).Inc()
	m.SessionTableSize.Set(14)
	m.SessionEvictions.WithLabelValues(EvictWorkerGone).Add(6)
	m.UnknownSessions.Inc()

	mfs := scrape(t, reg)
	C, G := dto.MetricType_COUNTER, dto.MetricType_GAUGE

	assertSeries(t, NameConnectionsAccepted, values(t, mfs, NameConnectionsAccepted, C), map[string]float64{
		"result=handed_off": 3, "result=proxied": 1, "result=rejected": 0, "result=tunneled": 0,
	})
	wantRej := map[string]float64{}
	for _, r := range rejectReasons {
		wantRej["reason="+r] = 0
	}
	wantRej["reason=smuggling"] = 2
	if len(wantRej) != 19 {
		t.Fatalf("rejection reasons: %d, want 19", len(wantRej))
	}
	assertSeries(t, NameRejections, values(t, mfs, NameRejections, C), wantRej)
	assertSeries(t, NameHandoffs, values(t, mfs, NameHandoffs, C), map[string]float64{
		"result=ok,worker=0": 5, "result=timeout,worker=1": 1,
	})
	assertSeries(t, NameRequestsProxied, values(t, mfs, NameRequestsProxied, C), map[string]float64{
		"code=2xx,worker=2": 7, "code=4xx,worker=2": 1,
	})
	assertSeries(t, NameSessions, values(t, mfs, NameSessions, G), map[string]float64{
		"worker=0": 10, "worker=3": 4,
	})
	assertSeries(t, NameWebSockets, values(t, mfs, NameWebSockets, G), map[string]float64{
		"worker=3": 2,
	})
	assertSeries(t, NameWorkers, values(t, mfs, NameWorkers, G), map[string]float64{
		"state=starting": 1, "state=ready": 3, "state=draining": 0, "state=failed": 0,
	})
	assertSeries(t, NameWorkerRestarts, values(t, mfs, NameWorkerRestarts, C), map[string]float64{
		"worker=1": 1,
	})
	assertSeries(t, NameSessionTableSize, values(t, mfs, NameSessionTableSize, G), map[string]float64{"": 14})
	assertSeries(t, NameSessionEvictions, values(t, mfs, NameSessionEvictions, C), map[string]float64{
		"reason=expired": 0, "reason=capacity": 0, "reason=worker_gone": 6,
	})
	assertSeries(t, NameUnknownSessions, values(t, mfs, NameUnknownSessions, C), map[string]float64{"": 1})

	// Histogram: count, sum and cumulative buckets as parsed from text.
	mf := mfs[NameHandoffDuration]
	if mf == nil || mf.GetType() != dto.MetricType_HISTOGRAM || len(mf.GetMetric()) != 1 {
		t.Fatalf("%s: %v", NameHandoffDuration, mf)
	}
	h := mf.GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 3 {
		t.Errorf("histogram count = %d, want 3", h.GetSampleCount())
	}
	if s := h.GetSampleSum(); s < 3.50001 || s > 3.50003 {
		t.Errorf("histogram sum = %v, want 3.50002", s)
	}
	bs := h.GetBucket()
	// The text format carries the +Inf bucket explicitly.
	if len(bs) != len(HandoffBuckets)+1 {
		t.Fatalf("histogram has %d buckets, want %d + Inf", len(bs), len(HandoffBuckets))
	}
	if inf := bs[len(bs)-1]; !math.IsInf(inf.GetUpperBound(), 1) || inf.GetCumulativeCount() != 3 {
		t.Errorf("last bucket le=%g count %d, want +Inf 3", inf.GetUpperBound(), inf.GetCumulativeCount())
	}
	bs = bs[:len(bs)-1]
	for i, b := range bs {
		ub := b.GetUpperBound()
		var want uint64
		if ub >= 20e-6 {
			want++
		}
		if ub >= 0.5 {
			want++
		}
		if ub != HandoffBuckets[i] {
			t.Errorf("bucket %d: le=%g, want %g", i, ub, HandoffBuckets[i])
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("bucket le=%g: %d, want %d", ub, b.GetCumulativeCount(), want)
		}
		if i > 0 && ub <= bs[i-1].GetUpperBound() {
			t.Errorf("buckets not increasing at %d", i)
		}
	}
}

func TestHandoffBuckets(t *testing.T) {
	first, last := HandoffBuckets[0], HandoffBuckets[len(HandoffBuckets)-1]
	if first < 9.999e-6 || first > 10.001e-6 {
		t.Errorf("first bucket %g, want 10µs", first)
	}
	if last < 0.9999 || last > 1.0001 {
		t.Errorf("last bucket %g, want 1s", last)
	}
	for i := 1; i < len(HandoffBuckets); i++ {
		r := HandoffBuckets[i] / HandoffBuckets[i-1]
		r0 := HandoffBuckets[1] / HandoffBuckets[0]
		if r/r0 < 0.999 || r/r0 > 1.001 {
			t.Errorf("bucket %d: factor %g, want %g (exponential)", i, r, r0)
		}
	}
}

func TestDoubleRegistrationIsError(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(reg, true); err != nil {
		t.Fatal(err)
	}
	before, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var m2 *Metrics
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("second New panicked: %v", r)
			}
		}()
		m2, err = New(reg, true)
	}()
	if err == nil {
		t.Fatal("second New on the same registry: no error")
	}
	if m2 != nil {
		t.Error("second New returned non-nil Metrics with an error")
	}
	if !IsAlreadyRegistered(err) {
		t.Errorf("error %v is not an AlreadyRegisteredError", err)
	}
	after, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Errorf("families after failed New: %d, before: %d", len(after), len(before))
	}
}

// A partial failure must leave the registry as it was.
func TestRegistrationRollback(t *testing.T) {
	reg := prometheus.NewRegistry()
	// Take one collector in the middle of the list (stickyd_workers, 8th of
	// 12) with an identical one, so the first 7 are registered and must be
	// rolled back.
	other, err := New(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	squatter := other.Workers
	reg.MustRegister(squatter)
	if _, err := New(reg, false); err == nil {
		t.Fatal("New succeeded despite a conflicting collector")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != NameWorkers {
		var names []string
		for _, mf := range mfs {
			names = append(names, mf.GetName())
		}
		t.Fatalf("registry after failed New: %v, want only the squatter", names)
	}
	reg.Unregister(squatter)
	if _, err := New(reg, false); err != nil {
		t.Fatalf("New after rollback: %v", err)
	}
}

func TestNilRegistererUsable(t *testing.T) {
	m, err := New(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	m.ConnectionsAccepted.WithLabelValues(AcceptTunneled).Inc()
	m.HandoffDuration.Observe(0.001)
	m.UnknownSessions.Inc()
	// Still registrable afterwards by hand.
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.ConnectionsAccepted)
	mfs := scrape(t, reg)
	got := values(t, mfs, NameConnectionsAccepted, dto.MetricType_COUNTER)
	if got["result=tunneled"] != 1 {
		t.Fatalf("tunneled = %v", got["result=tunneled"])
	}
}

// touchAll creates at least one series in every vec so that every family
// shows up in a gather.
func touchAll(m *Metrics) {
	for _, r := range handoffResults {
		m.Handoffs.WithLabelValues(WorkerLabel(0), r).Inc()
	}
	m.RequestsProxied.WithLabelValues(WorkerLabel(0), StatusClass(101)).Inc()
	m.Sessions.WithLabelValues(WorkerLabel(0)).Set(1)
	m.WebSockets.WithLabelValues(WorkerLabel(0)).Set(1)
	m.WorkerRestarts.WithLabelValues(WorkerLabel(0)).Inc()
	m.WorkerProtocolErrs.WithLabelValues(WorkerLabel(0), ProtoUnsolicited).Inc()
	m.TLSCertExpiry.WithLabelValues("example.com").Set(1)
	m.PoolWorkers.WithLabelValues("reports", WorkerReady).Set(1)
	m.PoolInFlight.WithLabelValues("reports").Set(1)
	m.PoolQueueLength.WithLabelValues("reports").Set(1)
	m.PoolQueueWait.WithLabelValues("reports").Observe(1)
	m.PoolSpawns.WithLabelValues("reports").Inc()
	m.PoolRetirements.WithLabelValues("reports").Inc()
}

func TestNamesMatchGather(t *testing.T) {
	for _, withRuntime := range []bool{false, true} {
		reg := prometheus.NewRegistry()
		m, err := New(reg, withRuntime)
		if err != nil {
			t.Fatal(err)
		}
		touchAll(m)
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var gathered []string
		runtime := 0
		for _, mf := range mfs {
			n := mf.GetName()
			if strings.HasPrefix(n, "go_") || strings.HasPrefix(n, "process_") {
				runtime++
				continue
			}
			gathered = append(gathered, n)
		}
		sort.Strings(gathered)
		names := Names()
		if !slices.IsSorted(names) {
			t.Errorf("Names() not sorted: %v", names)
		}
		if !slices.Equal(gathered, names) {
			t.Errorf("withRuntime=%v: gathered %v\nNames() %v", withRuntime, gathered, names)
		}
		if withRuntime && runtime == 0 {
			t.Error("withRuntime: no go_/process_ families")
		}
		if !withRuntime && runtime != 0 {
			t.Errorf("withRuntime=false: %d runtime families", runtime)
		}
		for _, n := range names {
			if !strings.HasPrefix(n, Namespace+"_") {
				t.Errorf("%s lacks the %s_ prefix", n, Namespace)
			}
		}
	}
}

// Names the design document promises to other components.
func TestDesignNames(t *testing.T) {
	for _, n := range []string{
		"stickyd_connections_accepted_total", "stickyd_handoffs_total",
		"stickyd_handoff_duration_seconds", "stickyd_requests_proxied_total",
		"stickyd_sessions", "stickyd_workers", "stickyd_worker_restarts_total",
	} {
		if !slices.Contains(Names(), n) {
			t.Errorf("Names() lacks %s", n)
		}
	}
}

func TestDeleteWorker(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []int{0, 1} {
		m.Handoffs.WithLabelValues(WorkerLabel(w), HandoffOK).Inc()
		m.Sessions.WithLabelValues(WorkerLabel(w)).Set(1)
		m.WebSockets.WithLabelValues(WorkerLabel(w)).Set(1)
		m.RequestsProxied.WithLabelValues(WorkerLabel(w), "2xx").Inc()
		m.WorkerRestarts.WithLabelValues(WorkerLabel(w)).Inc()
	}
	m.DeleteWorker(1)
	mfs := scrape(t, reg)
	for _, name := range []string{NameHandoffs, NameSessions, NameWebSockets, NameRequestsProxied, NameWorkerRestarts} {
		for _, s := range mfs[name].GetMetric() {
			if labelsOf(s)["worker"] != "0" {
				t.Errorf("%s: series %v survived DeleteWorker(1)", name, labelsOf(s))
			}
		}
		if len(mfs[name].GetMetric()) != 1 {
			t.Errorf("%s: %d series, want 1", name, len(mfs[name].GetMetric()))
		}
	}
}

func TestWorkerLabel(t *testing.T) {
	for _, c := range []struct {
		slot int
		want string
	}{{0, "0"}, {1, "1"}, {9, "9"}, {10, "10"}, {255, "255"}, {256, "256"}, {-1, "-1"}} {
		if got := WorkerLabel(c.slot); got != c.want {
			t.Errorf("WorkerLabel(%d) = %q, want %q", c.slot, got, c.want)
		}
	}
	var sink string
	if n := testing.AllocsPerRun(100, func() {
		for i := 0; i <= 255; i++ {
			sink = WorkerLabel(i)
		}
	}); n != 0 {
		t.Errorf("WorkerLabel allocates %v times per 256 calls", n)
	}
	_ = sink
}

func TestStatusClass(t *testing.T) {
	for _, c := range []struct {
		code int
		want string
	}{
		{100, "1xx"}, {101, "1xx"}, {199, "1xx"}, {200, "2xx"}, {204, "2xx"}, {302, "3xx"},
		{400, "4xx"}, {404, "4xx"}, {500, "5xx"}, {599, "5xx"},
		{0, "other"}, {99, "other"}, {600, "other"}, {-200, "other"}, {1000, "other"},
	} {
		if got := StatusClass(c.code); got != c.want {
			t.Errorf("StatusClass(%d) = %q, want %q", c.code, got, c.want)
		}
	}
	var sink string
	if n := testing.AllocsPerRun(100, func() {
		for code := 0; code < 700; code++ {
			sink = StatusClass(code)
		}
	}); n != 0 {
		t.Errorf("StatusClass allocates %v times per run", n)
	}
	_ = sink
}

type failingCollector struct{ desc *prometheus.Desc }

func (f failingCollector) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }
func (f failingCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.NewInvalidMetric(f.desc, io.ErrUnexpectedEOF)
}

// A broken collector must not take the whole scrape down, nor panic for
// lack of an ErrorLog.
func TestHandlerContinuesOnError(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, false)
	if err != nil {
		t.Fatal(err)
	}
	m.UnknownSessions.Add(2)
	reg.MustRegister(failingCollector{prometheus.NewDesc("broken_metric", "x", nil, nil)})
	mfs := scrape(t, reg)
	got := values(t, mfs, NameUnknownSessions, dto.MetricType_COUNTER)
	if got[""] != 2 {
		t.Fatalf("unknown sessions = %v, want 2", got[""])
	}
}

func TestHandlerNilGatherer(t *testing.T) {
	mfs := scrape(t, nil)
	if len(mfs) != 0 {
		t.Fatalf("nil gatherer served %d families", len(mfs))
	}
}

func TestLabelsMatchGather(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, false)
	if err != nil {
		t.Fatal(err)
	}
	labels := Labels()
	var keys []string
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if !slices.Equal(keys, Names()) {
		t.Fatalf("Labels() families %v, Names() %v", keys, Names())
	}

	// Freshly created: the closed sets are pre-initialised, exactly.
	fresh, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range fresh {
		name := mf.GetName()
		if name == NameHandoffDuration || len(labels[name]) == 0 {
			continue
		}
		if len(labels[name]) != 1 {
			t.Errorf("%s: pre-initialised but has %d labels", name, len(labels[name]))
			continue
		}
		for label, want := range labels[name] {
			var got []string
			for _, s := range mf.GetMetric() {
				got = append(got, labelsOf(s)[label])
			}
			sort.Strings(got)
			want = slices.Clone(want)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Errorf("%s{%s}: pre-initialised %v, Labels() %v", name, label, got, want)
			}
		}
	}

	touchAll(m)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		want := labels[mf.GetName()]
		for _, s := range mf.GetMetric() {
			got := labelsOf(s)
			if len(got) != len(want) {
				t.Errorf("%s: series labels %v, Labels() %v", mf.GetName(), got, want)
			}
			for k, v := range got {
				vals, ok := want[k]
				if !ok {
					t.Errorf("%s: label %s not in Labels()", mf.GetName(), k)
				} else if vals != nil && !slices.Contains(vals, v) {
					t.Errorf("%s{%s=%q}: value not in closed set %v", mf.GetName(), k, v, vals)
				}
			}
		}
	}
	// Mutating the result must not leak into the package.
	labels[NameWorkers]["state"][0] = "mutated"
	if Labels()[NameWorkers]["state"][0] == "mutated" {
		t.Error("Labels() shares its slices")
	}
}
