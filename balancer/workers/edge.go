//go:build unix

package workers

import (
	"log/slog"
	"time"

	"github.com/stickyd/stickyd/metrics"
)

// Edge is the edge as a worker's life sees it: where a ready worker enters routing and
// leaves it, and the settings and collectors workers share with it. *balancer.Balancer
// implements it; the supervisor and the control server reach the edge only through it.
type Edge interface {
	// AddWorker puts w into routing (replacing whatever held its slot).
	AddWorker(w *Worker)
	// RemoveWorker takes w out of routing at once and forgets its sessions.
	RemoveWorker(w *Worker)
	// Drain stops routing new sessions to the worker in slot.
	Drain(slot int) bool
	// Load is the number of sessions and keys pinned to slot: a draining worker is done
	// when it reaches zero.
	Load(slot int) int
	// WorkerSettings are the edge's settings that apply to its workers.
	WorkerSettings() Settings
}

// Settings are what workers take from the edge's configuration.
type Settings struct {
	HandoffTimeout time.Duration // a worker must take a connection within this
	WorkerIdle     time.Duration // idle virtual connections are retired after this
	Logger         *slog.Logger
	Metrics        *metrics.Metrics
}
