//go:build unix

package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
)

// proxyFlags are the flags of `stickyd proxy` only: the edge in front of servers that
// listen on their own addresses (another container of the pod, a systemd service, any
// language), with the same routing as the other modes.
type proxyFlags struct {
	backends        backendList
	healthPath      string
	healthInterval  time.Duration
	healthTimeout   time.Duration
	rise, fall      int
	resolveInterval time.Duration
	backendIdle     time.Duration
}

func (p *proxyFlags) register(fs *flag.FlagSet) {
	fs.Var(&p.backends, "backend", "a backend: host:port, unix:/path, or dns:NAME:PORT (every A/AAAA record, re-resolved); repeat the flag or separate with commas")
	fs.StringVar(&p.healthPath, "health-path", "", "active health checks: GET this path on every backend (2xx/3xx passes); empty: passive checks only (failed connections)")
	fs.DurationVar(&p.healthInterval, "health-interval", 2*time.Second, "time between active checks, and the longest wait between probes of a backend out of routing")
	fs.DurationVar(&p.healthTimeout, "health-timeout", 0, "bound on one check (0: the interval, at most 2s)")
	fs.IntVar(&p.rise, "health-rise", 0, "passing checks in a row that put a failed backend back (0: 2 with -health-path, else 1)")
	fs.IntVar(&p.fall, "health-fall", 3, "failing active checks in a row that take a backend out (a refused connection takes it out at once)")
	fs.DurationVar(&p.resolveInterval, "resolve-interval", 5*time.Second, "how often dns: backends are looked up again")
	fs.DurationVar(&p.backendIdle, "backend-idle", 4*time.Second, "idle keep-alive connections to a backend are closed after this; keep it below the backends' own keep-alive timeout (Node: 5s)")
}

// backendList is the repeatable -backend flag (also "a,b" from STICKYD_BACKEND or the
// config file).
type backendList []string

func (l *backendList) String() string { return strings.Join(*l, ",") }

func (l *backendList) Set(v string) error {
	for item := range strings.SplitSeq(v, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		if _, err := workers.ParseBackend(item); err != nil {
			return err
		}
		*l = append(*l, item)
	}
	return nil
}

// startProxy starts probing the backends and routes to each one as soon as it passes;
// it returns when every backend was probed once, or after wait. The backends' work
// ends with ctx; Wait on the result waits for it.
// Each -pool's backends are a set of their own, from slot 64×(its place) on.
func startProxy(ctx context.Context, b *balancer.Balancer, p *proxyFlags, pools []poolSpec, wait time.Duration, log *slog.Logger) ([]*workers.Backends, error) {
	if len(p.backends) == 0 {
		return nil, fmt.Errorf("%w: stickyd proxy needs -backend ADDR (host:port, unix:/path or dns:NAME:PORT), once per backend", errUsage)
	}
	set := func(addrs []string, pool string, first int) *workers.Backends {
		return &workers.Backends{
			Edge:            b,
			Addrs:           addrs,
			HealthPath:      p.healthPath,
			HealthInterval:  p.healthInterval,
			HealthTimeout:   p.healthTimeout,
			Rise:            p.rise,
			Fall:            p.fall,
			Idle:            p.backendIdle,
			ResolveInterval: p.resolveInterval,
			Logger:          log,
			Pool:            pool,
			FirstSlot:       first,
		}
	}
	sets := []*workers.Backends{set(p.backends, "", 0)}
	for i, ps := range pools {
		sets = append(sets, set(ps.backends, ps.name, (i+1)*workers.MaxBackends))
	}
	for _, bs := range sets {
		if err := bs.Start(ctx); err != nil {
			// The sets started so far end with ctx, which the caller cancels.
			if bs.Pool != "" {
				return nil, fmt.Errorf("-pool %s: backend=: %w", bs.Pool, err)
			}
			return nil, fmt.Errorf("-backend: %w", err)
		}
	}
	timeout := time.After(wait)
	for _, bs := range sets {
		select {
		case <-bs.Settled():
		case <-ctx.Done():
		case <-timeout:
		}
		if bs.Routable() == 0 {
			where := "-backend " + strings.Join(bs.Addrs, ",")
			if bs.Pool != "" {
				where = "pool " + bs.Pool + ": " + strings.Join(bs.Addrs, ",")
			}
			log.Error("no backend is reachable yet; clients get 503 until one is (the edge keeps probing)", "backends", where)
		}
	}
	return sets, nil
}
