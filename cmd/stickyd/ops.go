//go:build unix

package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
)

// readyStatus is the STATUS= line systemd shows (systemctl status) while the edge serves.
func readyStatus(b *balancer.Balancer, lns []net.Listener, generation int) string {
	addrs := make([]string, len(lns))
	for i, ln := range lns {
		addrs[i] = ln.Addr().String()
	}
	ready := 0
	ws := b.Workers()
	for _, w := range ws {
		if w.State() == workers.StateReady {
			ready++
		}
	}
	return fmt.Sprintf("STATUS=serving on %s: %d of %d workers ready, %d sessions, generation %d",
		strings.Join(addrs, " "), ready, len(ws), b.Sessions().Len(), generation)
}

// notifyReady tells systemd the edge serves (also after an edge upgrade: the new image
// runs in the same pid) and starts the watchdog pings, if asked for, until ctx ends.
func notifyReady(ctx context.Context, log *slog.Logger, b *balancer.Balancer, lns []net.Listener, generation int) {
	notify(log, "READY=1", "MAINPID="+strconv.Itoa(os.Getpid()), readyStatus(b, lns, generation))
	go watchdog(ctx, log)
}

// handleSIGHUP makes SIGHUP what `systemctl reload` means for stickyd: re-read the
// settings (as POST /admin/reload: -config file, environment, flags) and, when the edge
// spawned its workers, restart them one at a time, each drained first — what SIGHUP
// always did. systemd hears RELOADING=1 at the start and READY=1 once both are done. A
// SIGHUP during a rolling restart reloads the settings and joins the running restart. It
// returns the function that stops listening.
func handleSIGHUP(ctx context.Context, log *slog.Logger, rl *reloader, sup *workers.Supervisor, status func() string) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	restarting := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-hup:
			case <-ctx.Done():
				return
			}
			notify(log, "RELOADING=1", monotonicUsec(), "STATUS=reloading: settings, then a rolling restart of the workers")
			if out, err := rl.reload(ctx); err != nil {
				log.Error("SIGHUP: settings not reloaded", "err", err)
			} else {
				log.Info("SIGHUP: " + strings.ReplaceAll(strings.TrimSpace(out), "\n", "; "))
			}
			if sup == nil {
				notify(log, "READY=1", status())
				continue
			}
			select {
			case restarting <- struct{}{}:
			default:
				log.Info("SIGHUP: a rolling restart is already running")
				continue
			}
			log.Info("SIGHUP: rolling restart of the workers")
			go func() {
				defer func() { <-restarting }()
				if err := sup.RollingRestart(ctx); err != nil {
					log.Warn("rolling restart", "err", err)
				} else {
					log.Info("rolling restart done")
				}
				notify(log, "READY=1", status())
			}()
		}
	}()
	return func() { signal.Stop(hup) }
}

// workerOutputLog is where worker output goes as records: with -log-format json every line
// a worker prints becomes a record of the edge's log (worker, pid, stream, msg), so the
// edge's stderr stays one JSON object per line; with text, nil: raw "[worker N] " lines.
func workerOutputLog(log *slog.Logger, format string) *slog.Logger {
	if strings.EqualFold(format, "json") {
		return log
	}
	return nil
}
