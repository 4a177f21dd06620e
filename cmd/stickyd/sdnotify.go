//go:build unix

package main

import (
	"context"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sdNotify sends one sd_notify(3) message ("READY=1", "STATUS=...", lines joined by
// newlines) to the service manager's $NOTIFY_SOCKET, and does nothing without one. It
// is the whole protocol: one datagram on a unix socket, so no dependency is needed.
// NOTIFY_SOCKET stays in the environment: an edge upgrade re-executes in place (same pid)
// and the new image reports READY=1 itself.
func sdNotify(lines ...string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" || len(lines) == 0 {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:] // abstract namespace
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(strings.Join(lines, "\n")))
	return err
}

// monotonicUsec is MONOTONIC_USEC for RELOADING=1 (systemd pairs it with the READY=1 that
// ends the reload).
func monotonicUsec() string {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return "MONOTONIC_USEC=" + strconv.FormatInt(ts.Nano()/1000, 10)
}

// notify is sdNotify for the edge: a failure is logged at debug level, never fatal (the
// service manager may be gone during shutdown).
func notify(log *slog.Logger, lines ...string) {
	if err := sdNotify(lines...); err != nil {
		log.Debug("sd_notify", "err", err, "msg", strings.Join(lines, " "))
	}
}

// watchdog sends WATCHDOG=1 at half the interval systemd asked for (WatchdogSec= in the
// unit sets WATCHDOG_USEC and WATCHDOG_PID), until ctx ends. The pings come from the
// edge's own goroutine, so a wedged process (a deadlock, a stuck runtime) stops them.
func watchdog(ctx context.Context, log *slog.Logger) {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return
	}
	every := time.Duration(usec) * time.Microsecond / 2
	log.Debug("systemd watchdog on", "ping_every", every)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		notify(log, "WATCHDOG=1")
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}
