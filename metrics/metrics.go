// Package metrics defines stickyd's Prometheus collectors.
//
// Nothing is registered globally: New builds every collector and registers it
// on the prometheus.Registerer it is handed (or on none, for tests). Label
// values are low-cardinality by construction: workers are labelled by slot
// number (WorkerLabel), HTTP statuses by class (StatusClass), and no client
// identity (address, sid, cookie) ever becomes a label.
package metrics

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every metric family name of the package.
const Namespace = "stickyd"

// Metric family names, as exposed on /metrics.
const (
	NameConnectionsAccepted = "stickyd_connections_accepted_total"
	NameRejections          = "stickyd_rejections_total"
	NameHandoffs            = "stickyd_handoffs_total"
	NameHandoffDuration     = "stickyd_handoff_duration_seconds"
	NameRequestsProxied     = "stickyd_requests_proxied_total"
	NameSessions            = "stickyd_sessions"
	NameWebSockets          = "stickyd_websockets"
	NameWorkers             = "stickyd_workers"
	NameWorkerRestarts      = "stickyd_worker_restarts_total"
	NameSessionTableSize    = "stickyd_session_table_entries"
	NameSessionEvictions    = "stickyd_session_evictions_total"
	NameUnknownSessions     = "stickyd_unknown_sessions_total"
	NameWorkerProtocolErrs  = "stickyd_worker_protocol_errors_total"
	NameClusterMessages     = "stickyd_cluster_messages_total"
	NameTLSCertExpiry       = "stickyd_tls_cert_expiry_seconds"
	NamePoolWorkers         = "stickyd_pool_workers"
	NamePoolInFlight        = "stickyd_pool_requests_in_flight"
	NamePoolQueueLength     = "stickyd_pool_queue_length"
	NamePoolQueueWait       = "stickyd_pool_queue_wait_seconds"
	NamePoolSpawns          = "stickyd_pool_spawns_total"
	NamePoolRetirements     = "stickyd_pool_retirements_total"
)

// DefaultPool is the pool label value of the workers no -pool rule names.
const DefaultPool = "default"

// Values of the result label of stickyd_connections_accepted_total.
const (
	AcceptHandedOff = "handed_off"
	AcceptProxied   = "proxied"
	AcceptRejected  = "rejected"
	AcceptTunneled  = "tunneled"
)

// Values of the reason label of stickyd_rejections_total.
const (
	RejectHeadTimeout  = "head_timeout"
	RejectHeadTooLarge = "head_too_large"
	RejectBadRequest   = "bad_request"
	RejectSmuggling    = "smuggling"
	RejectTLS          = "tls"
	RejectVersion      = "version"
	RejectNoWorker     = "no_worker"
	RejectOverload     = "overload"
	RejectClientClosed = "client_closed"
	RejectMaxConns     = "max_connections"
	RejectPerIP        = "per_ip_limit"
	RejectBodyTooLarge = "body_too_large"
	RejectBodyTimeout  = "body_timeout"
	RejectClientGone   = "client_gone"      // the client left while its request was proxied
	RejectWorkerFailed = "worker_failed"    // 502: the worker failed to answer
	RejectWorkerSlow   = "response_timeout" // 504: no response head within the response timeout
	RejectTLSHandshake = "tls_handshake"    // a TLS client that did not finish its handshake in time or sent garbage
	RejectQueueFull    = "queue_full"       // 503: a pool's queue of waiting requests was full
	RejectQueueTimeout = "queue_timeout"    // 503: a request waited for a pool's worker longer than its queue timeout
)

// Values of the reason label of stickyd_worker_protocol_errors_total.
const (
	ProtoUnsolicited = "unsolicited" // bytes after the end of a response, or while idle
	ProtoMalformed   = "malformed"   // a response head or body the edge could not parse
)

// Values of the result label of stickyd_handoffs_total.
const (
	HandoffOK      = "ok"
	HandoffError   = "error"
	HandoffRetried = "retried"
	HandoffTimeout = "timeout"
)

// Values of the state label of stickyd_workers.
const (
	WorkerStarting = "starting"
	WorkerReady    = "ready"
	WorkerDraining = "draining"
	WorkerFailed   = "failed"
)

// Values of the reason label of stickyd_session_evictions_total.
const (
	EvictExpired    = "expired"
	EvictCapacity   = "capacity"
	EvictWorkerGone = "worker_gone"
)

// Values of the result label of stickyd_cluster_messages_total.
const (
	ClusterRelayed = "relayed"
	ClusterDropped = "dropped"
)

// The closed label sets. Series for these values are created at zero by New,
// so that rate() and alerts such as stickyd_workers{state="ready"} == 0 see
// them before the first event.
var (
	acceptResults   = []string{AcceptHandedOff, AcceptProxied, AcceptRejected, AcceptTunneled}
	rejectReasons   = []string{RejectHeadTimeout, RejectHeadTooLarge, RejectBadRequest, RejectSmuggling, RejectTLS, RejectVersion, RejectNoWorker, RejectOverload, RejectClientClosed, RejectMaxConns, RejectPerIP, RejectBodyTooLarge, RejectBodyTimeout, RejectClientGone, RejectWorkerFailed, RejectWorkerSlow, RejectTLSHandshake, RejectQueueFull, RejectQueueTimeout}
	protoReasons    = []string{ProtoUnsolicited, ProtoMalformed}
	handoffResults  = []string{HandoffOK, HandoffError, HandoffRetried, HandoffTimeout}
	workerStates    = []string{WorkerStarting, WorkerReady, WorkerDraining, WorkerFailed}
	evictionReasons = []string{EvictExpired, EvictCapacity, EvictWorkerGone}
	clusterResults  = []string{ClusterRelayed, ClusterDropped}
	// A pool's workers are starting, ready or draining; a failed slot shows in
	// stickyd_workers{state="failed"}.
	poolWorkerStates = []string{WorkerStarting, WorkerReady, WorkerDraining}
)

// PoolWorkerStates lists the state label values of stickyd_pool_workers.
func PoolWorkerStates() []string { return slices.Clone(poolWorkerStates) }

// PoolWaitBuckets are the upper bounds of stickyd_pool_queue_wait_seconds: from 1 ms to
// about 2 minutes (a queue timeout is 30 s by default).
var PoolWaitBuckets = prometheus.ExponentialBucketsRange(1e-3, 120, 12)

// HandoffBuckets are the upper bounds of stickyd_handoff_duration_seconds:
// 16 exponential buckets from 10µs to 1s (factor ≈ 2.15).
var HandoffBuckets = prometheus.ExponentialBucketsRange(10e-6, 1, 16)

// Metrics holds every collector of the edge. All fields are non-nil after New.
type Metrics struct {
	ConnectionsAccepted *prometheus.CounterVec   // stickyd_connections_accepted_total{result}
	Rejections          *prometheus.CounterVec   // stickyd_rejections_total{reason}
	Handoffs            *prometheus.CounterVec   // stickyd_handoffs_total{worker,result}
	HandoffDuration     prometheus.Histogram     // stickyd_handoff_duration_seconds
	RequestsProxied     *prometheus.CounterVec   // stickyd_requests_proxied_total{worker,code}
	Sessions            *prometheus.GaugeVec     // stickyd_sessions{worker}
	WebSockets          *prometheus.GaugeVec     // stickyd_websockets{worker}
	Workers             *prometheus.GaugeVec     // stickyd_workers{state}
	WorkerRestarts      *prometheus.CounterVec   // stickyd_worker_restarts_total{worker}
	SessionTableSize    prometheus.Gauge         // stickyd_session_table_entries
	SessionEvictions    *prometheus.CounterVec   // stickyd_session_evictions_total{reason}
	UnknownSessions     prometheus.Counter       // stickyd_unknown_sessions_total
	WorkerProtocolErrs  *prometheus.CounterVec   // stickyd_worker_protocol_errors_total{worker,reason}
	ClusterMessages     *prometheus.CounterVec   // stickyd_cluster_messages_total{result}
	TLSCertExpiry       *prometheus.GaugeVec     // stickyd_tls_cert_expiry_seconds{name}
	PoolWorkers         *prometheus.GaugeVec     // stickyd_pool_workers{pool,state}
	PoolInFlight        *prometheus.GaugeVec     // stickyd_pool_requests_in_flight{pool}
	PoolQueueLength     *prometheus.GaugeVec     // stickyd_pool_queue_length{pool}
	PoolQueueWait       *prometheus.HistogramVec // stickyd_pool_queue_wait_seconds{pool}
	PoolSpawns          *prometheus.CounterVec   // stickyd_pool_spawns_total{pool}
	PoolRetirements     *prometheus.CounterVec   // stickyd_pool_retirements_total{pool}
	collectors          []prometheus.Collector   // in registration order
	perWorker           []*prometheus.MetricVec  // vecs with a worker label, for DeleteWorker
}

// New creates all collectors and registers them on reg. With reg nil the
// collectors are created but not registered (usable in tests). With
// withRuntime true it also registers the Go runtime and process collectors.
//
// Registration is all or nothing: if any collector cannot be registered (for
// example because New already ran on the same registry) the ones registered
// so far are unregistered again and the error is returned.
func New(reg prometheus.Registerer, withRuntime bool) (*Metrics, error) {
	m := &Metrics{
		ConnectionsAccepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameConnectionsAccepted,
			Help: "Client connections accepted by the edge, by what became of them (handed_off, proxied, rejected, tunneled).",
		}, []string{"result"}),
		Rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameRejections,
			Help: "Client connections or requests rejected by the edge, by reason.",
		}, []string{"reason"}),
		Handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameHandoffs,
			Help: "File-descriptor handoffs of client connections to workers, by worker slot and result (ok, error, retried, timeout).",
		}, []string{"worker", "result"}),
		HandoffDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    NameHandoffDuration,
			Help:    "Time from the start of a handoff to the worker's acknowledgement, in seconds.",
			Buckets: HandoffBuckets,
		}),
		RequestsProxied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameRequestsProxied,
			Help: "HTTP requests proxied per request to workers, by worker slot and response status class (1xx..5xx).",
		}, []string{"worker", "code"}),
		Sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameSessions,
			Help: "Learned session-table entries owned by each worker slot.",
		}, []string{"worker"}),
		WebSockets: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameWebSockets,
			Help: "Handed-off WebSockets that each worker slot reports as open.",
		}, []string{"worker"}),
		Workers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameWorkers,
			Help: "Workers by state (starting, ready, draining, failed).",
		}, []string{"state"}),
		WorkerRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameWorkerRestarts,
			Help: "Restarts of supervised workers, by worker slot.",
		}, []string{"worker"}),
		SessionTableSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NameSessionTableSize,
			Help: "Entries in the learned session table (sid to worker).",
		}),
		SessionEvictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameSessionEvictions,
			Help: "Session-table entries removed, by reason (expired, capacity, worker_gone).",
		}, []string{"reason"}),
		UnknownSessions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: NameUnknownSessions,
			Help: "Requests for a session id the edge does not know, answered 400 Session ID unknown.",
		}),
		WorkerProtocolErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameWorkerProtocolErrs,
			Help: "Connections to a worker closed because it broke HTTP/1.1 framing, by worker slot and reason (unsolicited: bytes after a response or while idle; malformed).",
		}, []string{"worker", "reason"}),
		ClusterMessages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameClusterMessages,
			Help: "@socket.io/cluster-adapter messages relayed between Node workers, one per message and receiving worker: relayed, or dropped (the receiver's queue was full, it went away, or a response's requester is unknown).",
		}, []string{"result"}),
		TLSCertExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameTLSCertExpiry,
			Help: "When each TLS certificate the edge serves expires, as a Unix time in seconds, by name (its first DNS name, or its file); refreshed on every reload.",
		}, []string{"name"}),
		PoolWorkers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NamePoolWorkers,
			Help: "Workers of each pool (-pool; the rest are pool=\"default\") by state (starting, ready, draining).",
		}, []string{"pool", "state"}),
		PoolInFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NamePoolInFlight,
			Help: "Proxied requests in flight to each pool's workers (WebSockets are sessions, not requests in flight).",
		}, []string{"pool"}),
		PoolQueueLength: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NamePoolQueueLength,
			Help: "Requests waiting for a worker of each pool: every worker is at the pool's concurrency, or the pool has no worker yet.",
		}, []string{"pool"}),
		PoolQueueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    NamePoolQueueWait,
			Help:    "Time requests waited in a pool's queue before a worker took them, in seconds.",
			Buckets: PoolWaitBuckets,
		}, []string{"pool"}),
		PoolSpawns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NamePoolSpawns,
			Help: "Workers a pool started on demand (its queue had waiting requests).",
		}, []string{"pool"}),
		PoolRetirements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NamePoolRetirements,
			Help: "Workers a pool stopped after they were idle for the pool's idle time.",
		}, []string{"pool"}),
	}
	for _, v := range acceptResults {
		m.ConnectionsAccepted.WithLabelValues(v)
	}
	for _, v := range rejectReasons {
		m.Rejections.WithLabelValues(v)
	}
	for _, v := range workerStates {
		m.Workers.WithLabelValues(v)
	}
	for _, v := range evictionReasons {
		m.SessionEvictions.WithLabelValues(v)
	}
	for _, v := range clusterResults {
		m.ClusterMessages.WithLabelValues(v)
	}
	m.collectors = []prometheus.Collector{
		m.ConnectionsAccepted, m.Rejections, m.Handoffs, m.HandoffDuration,
		m.RequestsProxied, m.Sessions, m.WebSockets, m.Workers,
		m.WorkerRestarts, m.SessionTableSize, m.SessionEvictions, m.UnknownSessions,
		m.WorkerProtocolErrs, m.ClusterMessages, m.TLSCertExpiry,
		m.PoolWorkers, m.PoolInFlight, m.PoolQueueLength, m.PoolQueueWait, m.PoolSpawns, m.PoolRetirements,
	}
	m.perWorker = []*prometheus.MetricVec{
		m.Handoffs.MetricVec, m.RequestsProxied.MetricVec, m.Sessions.MetricVec,
		m.WebSockets.MetricVec, m.WorkerRestarts.MetricVec, m.WorkerProtocolErrs.MetricVec,
	}
	if withRuntime {
		m.collectors = append(m.collectors,
			collectors.NewGoCollector(),
			collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		)
	}
	if reg == nil {
		return m, nil
	}
	for i, c := range m.collectors {
		if err := reg.Register(c); err != nil {
			for _, done := range m.collectors[:i] {
				reg.Unregister(done)
			}
			return nil, fmt.Errorf("metrics: register collector %d of %d: %w", i+1, len(m.collectors), err)
		}
	}
	return m, nil
}

// IsAlreadyRegistered reports whether err (from New) means the collectors
// were already registered on that registry.
func IsAlreadyRegistered(err error) bool {
	var are prometheus.AlreadyRegisteredError
	return errors.As(err, &are)
}

// DeleteWorker removes every series labelled with the worker slot, for a
// slot that is retired for good. A slot that is reused (restart) keeps its
// series; counters must not be reset behind Prometheus's back.
func (m *Metrics) DeleteWorker(slot int) {
	l := prometheus.Labels{"worker": WorkerLabel(slot)}
	for _, v := range m.perWorker {
		v.DeletePartialMatch(l)
	}
}

// Names lists every metric family name the package exports, sorted. The
// Go and process collectors (withRuntime) are not included.
func Names() []string {
	return []string{
		NameClusterMessages,
		NameConnectionsAccepted,
		NameHandoffDuration,
		NameHandoffs,
		NamePoolQueueLength,
		NamePoolQueueWait,
		NamePoolInFlight,
		NamePoolRetirements,
		NamePoolSpawns,
		NamePoolWorkers,
		NameRejections,
		NameRequestsProxied,
		NameSessionEvictions,
		NameSessionTableSize,
		NameSessions,
		NameTLSCertExpiry,
		NameUnknownSessions,
		NameWebSockets,
		NameWorkerProtocolErrs,
		NameWorkerRestarts,
		NameWorkers,
	}
}

// Labels describes the label names of every family of Names(). Each label
// name maps to the closed set of values the package uses for it, or to nil
// where the set is open (worker slots). Deploy files (alerts, dashboards)
// are checked against it.
func Labels() map[string]map[string][]string {
	worker := []string(nil)
	return map[string]map[string][]string{
		NameConnectionsAccepted: {"result": slices.Clone(acceptResults)},
		NameRejections:          {"reason": slices.Clone(rejectReasons)},
		NameHandoffs:            {"worker": worker, "result": slices.Clone(handoffResults)},
		NameHandoffDuration:     {},
		NameRequestsProxied:     {"worker": worker, "code": slices.Clone(statusClassValues)},
		NameSessions:            {"worker": worker},
		NameWebSockets:          {"worker": worker},
		NameWorkers:             {"state": slices.Clone(workerStates)},
		NameWorkerRestarts:      {"worker": worker},
		NameSessionTableSize:    {},
		NameSessionEvictions:    {"reason": slices.Clone(evictionReasons)},
		NameUnknownSessions:     {},
		NameWorkerProtocolErrs:  {"worker": worker, "reason": slices.Clone(protoReasons)},
		NameClusterMessages:     {"result": slices.Clone(clusterResults)},
		NameTLSCertExpiry:       {"name": nil},
		NamePoolWorkers:         {"pool": nil, "state": slices.Clone(poolWorkerStates)},
		NamePoolInFlight:        {"pool": nil},
		NamePoolQueueLength:     {"pool": nil},
		NamePoolQueueWait:       {"pool": nil},
		NamePoolSpawns:          {"pool": nil},
		NamePoolRetirements:     {"pool": nil},
	}
}

const maxCachedWorker = 255

var workerLabels = func() (s [maxCachedWorker + 1]string) {
	for i := range s {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

// WorkerLabel formats a worker slot as a label value ("0", "1", ...). Slots
// 0..255 come from a table and do not allocate.
func WorkerLabel(slot int) string {
	if slot >= 0 && slot <= maxCachedWorker {
		return workerLabels[slot]
	}
	return strconv.Itoa(slot)
}

var (
	statusClasses     = [...]string{"1xx", "2xx", "3xx", "4xx", "5xx"}
	statusClassValues = append(statusClasses[:], "other")
)

// StatusClass returns the class of an HTTP status code ("1xx".."5xx"), or
// "other" for a code outside 100..599. It does not allocate.
func StatusClass(code int) string {
	if code < 100 || code > 599 {
		return "other"
	}
	return statusClasses[code/100-1]
}

// Handler serves the metrics of g in the Prometheus exposition format
// (text by default, negotiated by Accept). A failing collector does not
// fail the scrape: the other metrics are still served. g nil serves nothing.
func Handler(g prometheus.Gatherer) http.Handler {
	if g == nil {
		g = prometheus.Gatherers{}
	}
	// ErrorLog stays a nil interface: a typed nil *log.Logger stored in it
	// would make promhttp call Println on nil.
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
	})
}
