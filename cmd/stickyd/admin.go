//go:build unix

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
)

const (
	// adminHeader must be on every state-changing admin request. A web page cannot
	// send a custom header cross-site without a CORS preflight, which this server never
	// grants, so a page an operator happens to open cannot drain or restart the edge.
	adminHeader = "X-Stickyd-Admin"
	// versionHeader is on every answer of the metrics/admin port: clients use it to tell
	// a stickyd from whatever else answers on an address (a wrong port is the usual cause).
	versionHeader = "Stickyd-Version"
)

// adminHandler serves metrics, health and the admin API.
//
// /metrics, /healthz and /readyz are open to anyone (Prometheus and the kubelet address
// them by pod IP or service name). Everything else is the admin API, guarded by
// adminGuard: loopback peers only unless remote is set, a Host that is an IP literal or
// localhost, and for state changes the X-Stickyd-Admin header and no cross-site markers.
func adminHandler(b *balancer.Balancer, sup *workers.Supervisor, g prometheus.Gatherer, remote bool, log *slog.Logger, generation int, upgradeReq chan<- struct{}) http.Handler {
	var r atomic.Bool
	r.Store(remote)
	return newAdminHandler(adminOptions{B: b, Sup: sup, Gatherer: g, Remote: &r, Log: log, Generation: generation, UpgradeReq: upgradeReq})
}

// adminOptions is what the admin port serves from. Zero fields switch their part off.
type adminOptions struct {
	B          *balancer.Balancer
	Sup        *workers.Supervisor // nil in serve mode
	Gatherer   prometheus.Gatherer
	Remote     *atomic.Bool // -admin-remote, changeable by a reload
	Log        *slog.Logger
	Generation int
	UpgradeReq chan<- struct{}
	Status     *statusBoard                              // nil: one is made
	Reload     func(ctx context.Context) (string, error) // POST /admin/reload; nil: 409
}

func newAdminHandler(o adminOptions) http.Handler {
	b, sup, g, log, generation, upgradeReq := o.B, o.Sup, o.Gatherer, o.Log, o.Generation, o.UpgradeReq
	if o.Remote == nil {
		o.Remote = new(atomic.Bool)
	}
	if o.Status == nil {
		o.Status = newStatusBoard(b, sup, g, generation)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics.Handler(g))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !b.Ready() {
			http.Error(w, "not ready: no worker takes new sessions, or the edge is draining or shutting down", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	rs := &restarts{b: b, sup: sup, log: log, inFlight: map[int]bool{}}
	admin := http.NewServeMux()
	admin.HandleFunc("GET /admin/workers", func(w http.ResponseWriter, r *http.Request) {
		type info struct {
			Slot       int    `json:"slot"`
			Pool       string `json:"pool"`
			PID        int    `json:"pid"`
			State      string `json:"state"`
			Sessions   int    `json:"sessions"`
			WebSockets int64  `json:"websockets"`
			InFlight   int    `json:"in_flight"`
		}
		out := []info{}
		for _, wk := range b.Workers() {
			out = append(out, info{wk.Slot, poolLabel(wk.PoolName), wk.PID, wk.State().String(), b.Sessions().Count(wk.Slot), wk.WebSockets(), wk.InFlight()})
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"stickyd": true, "workers": out, "pools": poolStats(b, sup), "sessions": b.Sessions().Len(), "ready": b.Ready(),
			"generation": generation, "version": buildVersion().Version, "pid": os.Getpid()})
	})
	admin.HandleFunc("POST /admin/upgrade", func(w http.ResponseWriter, r *http.Request) {
		select {
		case upgradeReq <- struct{}{}:
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, "upgrading\n")
		default:
			http.Error(w, "an upgrade is already pending", http.StatusConflict)
		}
	})
	admin.HandleFunc("POST /admin/drain", func(w http.ResponseWriter, r *http.Request) {
		b.SetDraining(true)
		log.Info("edge draining: /readyz now fails; existing sessions keep being served")
		io.WriteString(w, "draining\n")
	})
	admin.HandleFunc("POST /admin/undrain", func(w http.ResponseWriter, r *http.Request) {
		// The undo of every drain: the edge's and each worker's. A worker that an admin
		// restart is draining stays as it is: it is about to be replaced.
		b.SetDraining(false)
		var undrained, busy []int
		for _, wk := range b.Workers() {
			if wk.State() != workers.StateDraining {
				continue
			}
			if rs.busy(wk.Slot) {
				busy = append(busy, wk.Slot)
				continue
			}
			if b.Undrain(wk.Slot) {
				undrained = append(undrained, wk.Slot)
			}
		}
		log.Info("edge undrained", "workers", undrained, "restarting", busy)
		io.WriteString(w, "ready")
		if len(undrained) > 0 {
			fmt.Fprintf(w, "; workers back in routing: %s", slotList(undrained))
		}
		if len(busy) > 0 {
			fmt.Fprintf(w, "; workers being restarted, left draining: %s", slotList(busy))
		}
		io.WriteString(w, "\n")
	})
	admin.HandleFunc("POST /admin/drain/{slot}", func(w http.ResponseWriter, r *http.Request) {
		slot, ok := slotOf(w, r)
		if !ok {
			return
		}
		if !b.Drain(slot) {
			http.Error(w, fmt.Sprintf("no worker in slot %d: see GET /admin/workers", slot), http.StatusNotFound)
			return
		}
		log.Info("worker draining by admin request", "worker", slot)
		fmt.Fprintf(w, "worker %d draining\n", slot)
	})
	admin.HandleFunc("POST /admin/undrain/{slot}", func(w http.ResponseWriter, r *http.Request) {
		slot, ok := slotOf(w, r)
		if !ok {
			return
		}
		if rs.busy(slot) {
			http.Error(w, fmt.Sprintf("worker %d is being restarted; it takes new sessions once its replacement is ready", slot), http.StatusConflict)
			return
		}
		if !b.Undrain(slot) {
			http.Error(w, fmt.Sprintf("no worker in slot %d: see GET /admin/workers", slot), http.StatusNotFound)
			return
		}
		log.Info("worker undrained by admin request", "worker", slot)
		fmt.Fprintf(w, "worker %d ready\n", slot)
	})
	admin.HandleFunc("POST /admin/restart", func(w http.ResponseWriter, r *http.Request) {
		if sup == nil {
			http.Error(w, "workers are not spawned by this edge (serve mode): restart them where they run", http.StatusConflict)
			return
		}
		rs.serve(w, r, -1)
	})
	admin.HandleFunc("POST /admin/restart/{slot}", func(w http.ResponseWriter, r *http.Request) {
		slot, ok := slotOf(w, r)
		if !ok {
			return
		}
		if sup == nil {
			http.Error(w, "workers are not spawned by this edge (serve mode): restart them where they run", http.StatusConflict)
			return
		}
		rs.serve(w, r, slot)
	})
	// The status page and its data: read-only, but behind the same guard as the rest of
	// the admin API (it lists pids and load, and a rebound page must not read it).
	admin.HandleFunc("GET /{$}", servePage)
	admin.HandleFunc("GET /status.js", servePage)
	admin.HandleFunc("GET /status.css", servePage)
	admin.HandleFunc("GET /admin/status", o.Status.serveStatus)
	admin.HandleFunc("POST /admin/reload", func(w http.ResponseWriter, r *http.Request) {
		if o.Reload == nil {
			http.Error(w, "this edge has nothing to reload (started without -config, or an admin handler without an edge)", http.StatusConflict)
			return
		}
		out, err := o.Reload(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		io.WriteString(w, out)
	})
	// Profiles of the live edge (issue 17): on this mux, never on http.DefaultServeMux,
	// so they get the admin guard. A CPU profile or trace holds its request for ?seconds.
	admin.HandleFunc("GET /debug/pprof/", pprof.Index)
	admin.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	admin.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	admin.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	admin.HandleFunc("POST /debug/pprof/symbol", pprof.Symbol)
	admin.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.Handle("/", adminGuard(admin, o.Remote))
	return identify(mux)
}

// identify stamps every answer, refusals included, with the version header.
func identify(h http.Handler) http.Handler {
	v := buildVersion().Version
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(versionHeader, v)
		h.ServeHTTP(w, r)
	})
}

// adminGuard lets through only requests that a local operator's tool sends, not ones a
// web page can make a browser send. Loopback alone is not enough: every browser on the
// host is a loopback client, and a page can reach 127.0.0.1 by form posts (CSRF) or
// through a DNS name it rebinds to 127.0.0.1 (then it can also read the answers).
func adminGuard(h http.Handler, remote *atomic.Bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A rebound name arrives with that name as Host; tools use the address itself.
		if !hostIsAddress(r.Host) {
			example := defaultAdmin
			if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
				example = a.String()
			}
			http.Error(w, fmt.Sprintf("refused: Host %q is neither an IP address nor localhost (DNS rebinding guard): "+
				"address the admin API by IP, e.g. http://%s%s", r.Host, example, r.URL.Path), http.StatusMisdirectedRequest)
			return
		}
		if !remote.Load() && !isLoopback(r.RemoteAddr) {
			http.Error(w, "admin API is for loopback clients (start with -admin-remote to change that)", http.StatusForbidden)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if reason := crossSite(r); reason != "" {
				http.Error(w, "refused: "+reason+": the admin API takes no requests from web pages; "+
					"use the stickyd client commands or curl -X POST -H '"+adminHeader+": 1'", http.StatusForbidden)
				return
			}
			if r.Header.Get(adminHeader) != "1" {
				http.Error(w, "refused: state-changing admin requests need the header \""+adminHeader+": 1\" "+
					"(a web page cannot send it cross-site): curl -X POST -H '"+adminHeader+": 1' URL, or use the stickyd client commands", http.StatusForbidden)
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// crossSite names why r comes from another site's page, or returns "".
func crossSite(r *http.Request) string {
	switch site := r.Header.Get("Sec-Fetch-Site"); site {
	case "cross-site", "same-site":
		return "Sec-Fetch-Site: " + site
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return ""
	}
	u, err := url.Parse(origin)
	if err != nil || u.Scheme != "http" || !strings.EqualFold(u.Host, r.Host) {
		return fmt.Sprintf("cross-origin request (Origin %s)", origin)
	}
	return ""
}

// hostIsAddress reports whether a Host header names an IP address (v4 or v6, with or
// without port) or localhost.
func hostIsAddress(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	_, err := netip.ParseAddr(host)
	return err == nil
}

func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func slotOf(w http.ResponseWriter, r *http.Request) (int, bool) {
	slot, err := strconv.Atoi(r.PathValue("slot"))
	if err != nil || slot < 0 {
		http.Error(w, fmt.Sprintf("slot %q: want a worker's slot number (see GET /admin/workers)", r.PathValue("slot")), http.StatusBadRequest)
		return 0, false
	}
	return slot, true
}

func slotList(slots []int) string {
	s := make([]string, len(slots))
	for i, n := range slots {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ", ")
}

// restarts runs admin-requested worker restarts detached from the request: a client
// that hangs up mid-drain (a timeout, ^C) must not leave the worker draining forever,
// which is what a Restart cancelled between Drain and the replacement does.
type restarts struct {
	b   *balancer.Balancer
	sup *workers.Supervisor
	log *slog.Logger

	mu       sync.Mutex
	inFlight map[int]bool // slots an admin restart holds; -1: a rolling restart
}

// busy reports whether an admin restart is draining or replacing slot.
func (rs *restarts) busy(slot int) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.inFlight[slot] || rs.inFlight[-1]
}

// bound is how long one worker's restart can legitimately take: its drain, a stop that
// may wait out the kill grace, and its replacement's start. Zero fields mean the
// supervisor's 30 s defaults.
func (rs *restarts) bound() time.Duration {
	d := func(v time.Duration) time.Duration {
		if v <= 0 {
			return 30 * time.Second
		}
		return v
	}
	return d(rs.sup.DrainGrace) + d(rs.sup.GracePeriod) + d(rs.sup.SpawnTimeout) + 10*time.Second
}

// serve restarts slot (-1: every worker, one at a time) and answers when it is done. If
// the client goes away first the restart carries on; it is logged either way.
func (rs *restarts) serve(w http.ResponseWriter, r *http.Request, slot int) {
	if _, ok := rs.sup.Pids()[slot]; slot >= 0 && !ok {
		http.Error(w, fmt.Sprintf("no worker in slot %d: see GET /admin/workers", slot), http.StatusNotFound)
		return
	}
	rs.mu.Lock()
	if rs.inFlight[slot] || rs.inFlight[-1] || (slot == -1 && len(rs.inFlight) > 0) {
		rs.mu.Unlock()
		http.Error(w, "a restart of that worker (or a rolling restart) is already running: wait for it (stickyd status)", http.StatusConflict)
		return
	}
	rs.inFlight[slot] = true
	rs.mu.Unlock()

	bound := rs.bound()
	if slot == -1 {
		bound *= time.Duration(max(len(rs.b.Workers()), rs.sup.Workers, 1))
	}
	// WithoutCancel: the request's end is not the restart's; the bound keeps a replacement
	// that never comes from pinning this goroutine for good.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), bound)
	done := make(chan error, 1)
	go func() {
		defer cancel()
		var err error
		if slot == -1 {
			err = rs.sup.RollingRestart(ctx)
		} else {
			err = rs.sup.Restart(ctx, slot)
		}
		rs.mu.Lock()
		delete(rs.inFlight, slot)
		rs.mu.Unlock()
		if err != nil {
			rs.log.Warn("admin restart failed", "worker", slotName(slot), "err", err)
		} else {
			rs.log.Info("admin restart done", "worker", slotName(slot))
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		if slot >= 0 {
			fmt.Fprintf(w, "worker %d restarted\n", slot)
			return
		}
		io.WriteString(w, "restarted\n")
	case <-r.Context().Done():
		rs.log.Info("admin restart: the client went away; the restart carries on", "worker", slotName(slot))
	}
}

func slotName(slot int) string {
	if slot < 0 {
		return "all"
	}
	return strconv.Itoa(slot)
}
