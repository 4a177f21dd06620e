package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/metrics"
)

// adminHandler serves metrics, health and the admin API. /admin/ answers loopback
// clients only unless remote is set: it can drain and restart workers.
func adminHandler(b *balancer.Balancer, sup *balancer.Supervisor, g prometheus.Gatherer, remote bool, log *slog.Logger, generation int, upgradeReq chan<- struct{}) http.Handler {
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
	admin := http.NewServeMux()
	admin.HandleFunc("GET /admin/workers", func(w http.ResponseWriter, r *http.Request) {
		type info struct {
			Slot       int    `json:"slot"`
			PID        int    `json:"pid"`
			State      string `json:"state"`
			Sessions   int    `json:"sessions"`
			WebSockets int64  `json:"websockets"`
		}
		out := []info{}
		for _, wk := range b.Workers() {
			out = append(out, info{wk.Slot, wk.PID, wk.State().String(), b.Sessions().Count(wk.Slot), wk.WebSockets()})
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"workers": out, "sessions": b.Sessions().Len(), "ready": b.Ready(),
			"generation": generation, "version": version, "pid": os.Getpid()})
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
		b.SetDraining(false)
		io.WriteString(w, "ready\n")
	})
	admin.HandleFunc("POST /admin/drain/{slot}", func(w http.ResponseWriter, r *http.Request) {
		slot, err := strconv.Atoi(r.PathValue("slot"))
		if err != nil || !b.Drain(slot) {
			http.Error(w, "no worker in that slot", http.StatusNotFound)
			return
		}
		io.WriteString(w, "draining\n")
	})
	admin.HandleFunc("POST /admin/restart", func(w http.ResponseWriter, r *http.Request) {
		if sup == nil {
			http.Error(w, "workers are not spawned by this edge (serve mode): restart them where they run", http.StatusConflict)
			return
		}
		if err := sup.RollingRestart(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		io.WriteString(w, "restarted\n")
	})
	admin.HandleFunc("POST /admin/restart/{slot}", func(w http.ResponseWriter, r *http.Request) {
		slot, err := strconv.Atoi(r.PathValue("slot"))
		if err != nil {
			http.Error(w, "slot must be a number", http.StatusBadRequest)
			return
		}
		if sup == nil {
			http.Error(w, "workers are not spawned by this edge (serve mode)", http.StatusConflict)
			return
		}
		if err := sup.Restart(r.Context(), slot); err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		io.WriteString(w, "restarted\n")
	})
	mux.HandleFunc("/admin/", func(w http.ResponseWriter, r *http.Request) {
		if !remote && !isLoopback(r.RemoteAddr) {
			http.Error(w, "admin API is for loopback clients (start with -admin-remote to change that)", http.StatusForbidden)
			return
		}
		admin.ServeHTTP(w, r)
	})
	return mux
}

func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
