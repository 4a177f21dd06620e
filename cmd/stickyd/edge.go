//go:build unix

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/handover"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
)

// edgeFlags are the flags of `stickyd demo` and `stickyd run`.
type edgeFlags struct {
	listen, metricsAddr, key, trusted  string
	config                             string
	logFormat, logLevel                string
	control, allowUIDs                 string
	adminRemote                        bool
	workers, appPort, maxHead          int
	maxConns, maxPerIP                 int
	maxBody                            int64
	node                               bool
	shutdownTimeout, headTimeout       time.Duration
	spawnTimeout, sessionTTL, idleTime time.Duration
	responseTimeout                    time.Duration
	engineIOPath                       string
	maxSessions, maxAffinity           int
	epsilon                            float64
	nodeID, affinityCookie, sidHeader  string     // affinity hints for a balancer in front of several hosts
	pools                              poolList   // -pool (pools.go)
	proxy                              proxyFlags // stickyd proxy only (proxymode.go)
	tls                                tlsFlags   // TLS at the edge (tlsedge.go)
}

func (f *edgeFlags) register(fs *flag.FlagSet, mode string) {
	defWorkers := 0
	if mode == "demo" {
		defWorkers = 4
	}
	fs.StringVar(&f.listen, "listen", ":8080", "client address: host:port (a host name binds every address it resolves to), :port binds IPv4 and IPv6")
	fs.StringVar(&f.metricsAddr, "metrics", defaultAdmin, "address of /metrics, /healthz, /readyz, the status page and /admin/ (empty: off); loopback unless you give another, e.g. :8071 for Prometheus in another container")
	fs.StringVar(&f.config, "config", "", "YAML file of settings, keys named as these flags (listen: \":8080\"); a flag or STICKYD_* variable given wins over it")
	fs.IntVar(&f.workers, "workers", defWorkers, "number of workers (0: one per CPU)")
	fs.StringVar(&f.key, "key", "sid", "identity sources in order: sid, cookie:NAME, header:NAME, xff, ip (a connection without one goes to the least-loaded worker; ip pins by client address, which behind a NAT piles everyone on one worker)")
	fs.StringVar(&f.trusted, "trusted-proxies", "", "CIDRs whose X-Forwarded-For/Forwarded is believed, e.g. 10.0.0.0/8,::1")
	fs.Float64Var(&f.epsilon, "balance-factor", 0.25, "bounded load: no worker gets more than (1+ε)× the mean of active sessions")
	fs.DurationVar(&f.sessionTTL, "session-ttl", 45*time.Second, "forget a session idle this long; without this flag it rises to the app's own pingInterval + pingTimeout, read from its handshake answers")
	fs.DurationVar(&f.responseTimeout, "response-timeout", 60*time.Second, "a worker must start its answer (and send each further piece of it) within this; longer than the app's longest long-poll (engine.io pingInterval)")
	fs.StringVar(&f.engineIOPath, "engineio-path", "/socket.io/", "path prefix of engine.io requests (socket.io's path option): only there a sid routes and handshakes are learned")
	fs.IntVar(&f.maxSessions, "max-sessions", 1_000_000, "learned sessions (sids, session cookies) kept at once; the least recently used go first")
	fs.IntVar(&f.maxAffinity, "max-affinity-entries", 100_000, "other pinned keys (client addresses, header values) kept at once, in a budget of their own so they cannot evict sessions")
	fs.DurationVar(&f.headTimeout, "head-timeout", 10*time.Second, "time a client gets to send its request head")
	fs.IntVar(&f.maxHead, "max-head-bytes", 16<<10, "request head size limit")
	fs.DurationVar(&f.idleTime, "idle-timeout", 60*time.Second, "keep-alive idle time of proxied client connections")
	fs.IntVar(&f.maxConns, "max-conns", 100_000, "client connections held at once; beyond it new ones get 503 and are closed")
	fs.IntVar(&f.maxPerIP, "max-conns-per-ip", 0, "client connections per IP address (429 beyond it); 0: no limit")
	fs.Int64Var(&f.maxBody, "max-body-bytes", 100<<20, "request body limit for proxied requests (413)")
	fs.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 30*time.Second, "grace period on SIGTERM for requests in flight and workers")
	fs.DurationVar(&f.spawnTimeout, "spawn-timeout", 30*time.Second, "a worker must be ready within this")
	fs.BoolVar(&f.node, "node", false, "speak Node's IPC protocol to the workers (implied when CMD is node)")
	fs.IntVar(&f.appPort, "app-port", 0, "Node apps with several servers: the port whose server gets the edge's traffic (0: the first to listen)")
	if mode == "proxy" {
		f.proxy.register(fs)
		fs.Var(&f.pools, "pool", "a named pool of backends: NAME:path=/prefix/ (or host=NAME, header=Name[:value]; first match wins),backend=HOST:PORT (repeat), "+
			"with concurrency=N requests per backend and a queue=1000,queue-timeout=30s (then 503 + Retry-After); repeatable")
	} else if mode != "serve" {
		fs.Var(&f.pools, "pool", "a named pool: NAME:path=/prefix/ (or host=NAME, header=Name[:value]; first match wins), sized min=0,max=N,idle=30s, "+
			"with concurrency=N requests per worker and a queue=1000,queue-timeout=30s (then 503 + Retry-After); cmd=… runs another command; repeatable")
	}
	f.tls.register(fs)
	if mode == "serve" {
		fs.StringVar(&f.control, "control", "/run/stickyd/ctl.sock", "control socket Go workers connect to (created 0600 in a 0700 directory)")
		fs.StringVar(&f.allowUIDs, "allow-uid", "", "peer uids allowed on the control socket besides stickyd's own, e.g. 1000,1001")
	}
	fs.BoolVar(&f.adminRemote, "admin-remote", false, "serve /admin/ to non-loopback clients too (it can drain and restart workers)")
	fs.StringVar(&f.nodeID, "node-id", balancer.DefaultNodeID(), "this host's name in the affinity cookie (a balancer's server key)")
	fs.StringVar(&f.affinityCookie, "affinity-cookie", "", "on an engine.io handshake answer, set this cookie to -node-id (cookie affinity in a balancer in front); empty: off")
	fs.StringVar(&f.sidHeader, "sid-header", "", "on an engine.io handshake answer, add this header carrying the sid (HAProxy: stick store-response res.hdr(NAME)); empty: off")
	fs.StringVar(&f.logFormat, "log-format", "text", "text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
}

// applyEnv fills flags not given on the command line from STICKYD_* variables.
func applyEnv(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		env := "STICKYD_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q (for -%s): %v", env, v, f.Name, err))
			}
		}
	})
	return errors.Join(errs...)
}

// edgeSettings are the settings of one edge run, parsed and checked: flags, then STICKYD_*
// variables, then the -config file.
type edgeSettings struct {
	mode      string
	args      []string
	fs        *flag.FlagSet
	f         edgeFlags
	command   []string // the worker command (demo: this binary's demo worker)
	allowUIDs []int
	log       *slog.Logger
	logLevel  *slog.LevelVar
	cfg       balancer.Config // without Metrics
}

// parseEdgeSettings reads and checks an edge's settings; an error names the setting and the fix.
func parseEdgeSettings(mode string, args []string, stderr io.Writer) (*edgeSettings, error) {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f edgeFlags
	f.register(fs, mode)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := applySources(fs); err != nil { // STICKYD_* variables, then the -config file
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	fixedTTL := false // -session-ttl given (flag, variable or file): the edge does not learn the app's
	fs.Visit(func(fl *flag.Flag) { fixedTTL = fixedTTL || fl.Name == "session-ttl" })
	command := fs.Args()
	switch mode {
	case "demo":
		if len(command) > 0 {
			return nil, fmt.Errorf("%w: demo takes no command (use `stickyd run -- CMD`)", errUsage)
		}
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find own executable for the demo workers: %w", err)
		}
		command = []string{self, "demo-worker"}
	case "run":
		if len(command) == 0 {
			return nil, fmt.Errorf("%w: no worker command: stickyd run [flags] -- CMD ARGS... (e.g. -- node server.js)", errUsage)
		}
		if err := workers.CheckWorkerCommand(command); err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
	case "proxy":
		if len(command) > 0 {
			return nil, fmt.Errorf("%w: proxy takes no command: its backends listen on their own addresses (-backend ADDR)", errUsage)
		}
	case "serve":
		if len(command) > 0 {
			return nil, fmt.Errorf("%w: serve takes no command: workers connect to -control (use `stickyd run -- CMD` to spawn them)", errUsage)
		}
	}
	if err := checkPools(mode, f.pools); err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	var allowUIDs []int
	for _, u := range strings.Split(f.allowUIDs, ",") {
		if u = strings.TrimSpace(u); u == "" {
			continue
		}
		n, err := strconv.Atoi(u)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%w: -allow-uid %q: want numeric uids separated by commas", errUsage, f.allowUIDs)
		}
		allowUIDs = append(allowUIDs, n)
	}
	log, logLevel, err := newLevelLogger(stderr, f.logFormat, f.logLevel)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	sources, err := sticky.ParseSources(f.key)
	if err != nil {
		return nil, fmt.Errorf("-key: %w", err)
	}
	trusted, err := sticky.ParsePrefixes(f.trusted)
	if err != nil {
		return nil, fmt.Errorf("-trusted-proxies: %w", err)
	}
	if err := (&balancer.Config{NodeID: f.nodeID, AffinityCookie: f.affinityCookie, SIDHeader: f.sidHeader}).CheckAffinity(); err != nil {
		return nil, fmt.Errorf("%w: -node-id/-affinity-cookie/-sid-header: %v", errUsage, err)
	}
	return &edgeSettings{mode: mode, args: args, fs: fs, f: f, command: command, allowUIDs: allowUIDs, log: log, logLevel: logLevel,
		cfg: balancer.Config{
			Rules:           sticky.Rules{Sources: sources, TrustedProxies: trusted},
			Balance:         sticky.Balance{Epsilon: f.epsilon},
			SessionTTL:      f.sessionTTL,
			MaxHeadBytes:    f.maxHead,
			HeadTimeout:     f.headTimeout,
			IdleTimeout:     f.idleTime,
			MaxConns:        f.maxConns,
			MaxConnsPerIP:   f.maxPerIP,
			MaxBodyBytes:    f.maxBody,
			ResponseTimeout: f.responseTimeout,
			FixedSessionTTL: fixedTTL,
			EngineIOPath:    f.engineIOPath,
			MaxSessions:     f.maxSessions,
			MaxAffinity:     f.maxAffinity,
			NodeID:          f.nodeID,
			AffinityCookie:  f.affinityCookie,
			SIDHeader:       f.sidHeader,
			Logger:          log,
		}}, nil
}

// runEdge runs `stickyd demo|run|serve|proxy`: parse the settings, set the edge up (its
// listeners — new, inherited from a previous image or from systemd —, the workers, the
// admin API), serve until ctx ends, then shut down (shutdownEdge).
func runEdge(ctx context.Context, mode string, args []string, stderr io.Writer) error {
	es, err := parseEdgeSettings(mode, args, stderr)
	if err != nil {
		return err
	}
	fs, f, command, allowUIDs, log, logLevel := es.fs, &es.f, es.command, es.allowUIDs, es.log, es.logLevel
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg, true)
	if err != nil {
		return err
	}
	cfg := es.cfg
	cfg.Metrics = m
	poolRules, poolSups := buildPools(f.pools, f.workers, m)
	cfg.Pools = poolRules
	b := balancer.New(cfg)
	prev, err := handover.Load()
	if err != nil {
		return err
	}
	act, err := takeActivated() // systemd socket activation
	if err != nil {
		return err
	}
	var lns []net.Listener
	var metricsLn net.Listener
	generation := 0
	if prev != nil {
		// This image replaced a running edge: its sockets, workers and sessions are ours.
		generation = prev.Generation
		for _, fd := range prev.Listeners {
			ln, err := handover.Listener(fd)
			if err != nil {
				return fmt.Errorf("edge upgrade: inherited listener: %w", err)
			}
			lns = append(lns, ln)
		}
		if prev.Metrics >= 0 {
			if metricsLn, err = handover.Listener(prev.Metrics); err != nil {
				return fmt.Errorf("edge upgrade: inherited metrics listener: %w", err)
			}
		}
		b.Sessions().Restore(prev.Sessions, time.Now())
		b.Affinity().Restore(prev.Affinity, time.Now())
		log.Info("edge upgraded: serving with the previous edge's sockets, workers and sessions",
			"generation", generation, "version", version, "workers", len(prev.Supervisor.Workers),
			"connections", len(prev.Conns), "sessions", len(prev.Sessions))
	} else if f.listen != "" || f.tls.listen == "" {
		if lns, err = listenClient(ctx, act, f.listen); err != nil {
			return fmt.Errorf("-listen: %w", err)
		}
	}
	edgeTLS, err := f.tls.setup(ctx, m, log)
	if err == nil {
		lns, err = edgeTLS.listeners(ctx, lns, prev, f.tls.listen)
	}
	if err != nil {
		closeAll(lns)
		return err
	}
	if f.tls.redirectHTTPS {
		b.SetRedirectHTTPS(tlsPort(lns))
	}
	if metricsLn == nil {
		if metricsLn, err = listenAdmin(act, f.metricsAddr); err != nil {
			closeAll(lns)
			return err
		}
	}

	var sup *workers.Supervisor
	supCtx, stopWorkers := context.WithCancel(context.Background())
	defer stopWorkers()
	supDone := make(chan error, 1)
	var cs *workers.ControlServer
	var ctl *net.UnixListener
	if mode == "serve" {
		if prev != nil && prev.Control >= 0 {
			ln, err := handover.Listener(prev.Control)
			if err != nil {
				return fmt.Errorf("edge upgrade: inherited control socket: %w", err)
			}
			ctl = ln.(*net.UnixListener)
		} else if ctl, err = workers.ListenControl(f.control); err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			return fmt.Errorf("-control: %w", err)
		}
		cs = &workers.ControlServer{Edge: b, AllowUIDs: allowUIDs, Logger: log}
		if prev != nil {
			cs.Adopt(prev.Supervisor.Workers)
		}
		go cs.Serve(ctl)
		go func() { <-supCtx.Done(); ctl.Close(); supDone <- nil }()
		log.Info("control socket listening", "path", f.control)
	} else if mode == "proxy" {
		bs, err := startProxy(supCtx, b, &f.proxy, f.pools, f.spawnTimeout, log)
		if err != nil {
			closeAll(lns)
			return err
		}
		go func() {
			<-supCtx.Done()
			for _, s := range bs {
				s.Wait()
			}
			supDone <- nil
		}()
	} else {
		sup = &workers.Supervisor{
			Edge:         b,
			Command:      command,
			Workers:      f.workers,
			Node:         f.node,
			AppPort:      f.appPort,
			SpawnTimeout: f.spawnTimeout,
			GracePeriod:  f.shutdownTimeout,
			DrainGrace:   f.shutdownTimeout,
			Logger:       log,
			OutputLog:    workerOutputLog(log, f.logFormat),
		}
		for _, ps := range poolSups {
			if ps.Command == nil {
				ps.Command, ps.Node = command, f.node
			}
			ps.Edge, ps.AppPort, ps.SpawnTimeout, ps.GracePeriod, ps.DrainGrace = b, f.appPort, f.spawnTimeout, f.shutdownTimeout, f.shutdownTimeout
			ps.Logger, ps.OutputLog = log, sup.OutputLog
		}
		sup.Pools = poolSups
		if prev != nil {
			sup.Adopt(prev.Supervisor)
		}
		go func() { supDone <- sup.Run(supCtx) }()
	}
	up := &handover.Upgrader{Edge: b, Supervisor: sup, Control: cs, ControlLn: ctl, Metrics: metricsLn,
		Generation: generation, Grace: f.shutdownTimeout, Logger: log}
	upgradeReq := make(chan struct{}, 1)
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)
	go func() {
		for {
			select {
			case <-usr2:
			case <-upgradeReq:
			case <-supCtx.Done():
				return
			}
			log.Info("edge upgrade requested")
			notify(log, "RELOADING=1", monotonicUsec(), "STATUS=edge upgrade: replacing the binary in place")
			err := preflightSettings() // the new image re-reads -config and the environment
			if err == nil {
				err = up.Upgrade()
			}
			if err != nil {
				log.Error("edge upgrade failed; this edge keeps serving", "err", err)
				notify(log, "READY=1", "STATUS=edge upgrade failed, this image keeps serving: "+err.Error())
			}
		}
	}()

	remote := new(atomic.Bool) // -admin-remote: a reload may change it
	remote.Store(f.adminRemote)
	rl := newReloader(mode, args, fs, log, logLevel, remote)
	if edgeTLS != nil {
		rl.certs = edgeTLS.certs
	}
	board := newStatusBoard(b, sup, reg, generation)
	go board.run(supCtx)
	var adminSrv *http.Server
	if metricsLn != nil {
		adminSrv = &http.Server{Handler: workerHealth(newAdminHandler(adminOptions{B: b, Sup: sup, Gatherer: reg, Remote: remote, Log: log,
			Generation: generation, UpgradeReq: upgradeReq, Status: board, Reload: rl.reload}), b, sup), ReadHeaderTimeout: 5 * time.Second}
		go adminSrv.Serve(metricsLn)
		log.Info("metrics listening", "addr", metricsLn.Addr().String())
	}

	if sup != nil {
		// Clients that connect before the workers are ready wait in the listen backlog; the
		// edge accepts once every worker was ready or gave up (it cannot start), or after the
		// spawn timeout.
		for _, ln := range lns {
			log.Info("edge bound; clients wait in the listen backlog until the workers are ready", "addr", ln.Addr().String())
		}
		select {
		case <-sup.Settled():
		case <-ctx.Done():
		case <-time.After(f.spawnTimeout):
			log.Warn("not every worker is ready; serving with those that are")
		}
		if ok, reason := sup.Health(); !ok {
			log.Error("serving without workers: " + reason)
		}
	}
	defer handleSIGHUP(supCtx, log, rl, sup, func() string { return readyStatus(b, lns, generation) })()
	var serveWG sync.WaitGroup
	for _, ln := range lns {
		serveWG.Add(1)
		go func() {
			defer serveWG.Done()
			if err := b.Serve(ln); err != nil && !errors.Is(err, balancer.ErrClosed) && !errors.Is(err, balancer.ErrFrozen) {
				log.Error("serve", "addr", ln.Addr().String(), "err", err)
			}
		}()
		log.Info("edge listening", "addr", ln.Addr().String(), "mode", mode)
	}
	if prev != nil {
		b.Adopt(prev.Conns, prev.Exchanges)
	}
	notifyReady(supCtx, log, b, lns, generation)

	<-ctx.Done()
	shutdownEdge(log, b, sup, &serveWG, supDone, stopWorkers, adminSrv, f.shutdownTimeout)
	return nil
}

// shutdownEdge stops the edge gracefully: no new connections, requests in flight finish
// within grace (their answers close their connections), then the workers stop (SIGTERM to
// their process groups, SIGKILL after the grace). A second SIGTERM/SIGINT means now.
func shutdownEdge(log *slog.Logger, b *balancer.Balancer, sup *workers.Supervisor, serveWG *sync.WaitGroup,
	supDone chan error, stopWorkers func(), adminSrv *http.Server, grace time.Duration) {
	log.Info("shutting down", "grace", grace)
	notify(log, "STOPPING=1", "STATUS=shutting down: finishing requests in flight and stopping the workers")
	// A second signal means now: the workers' process groups get SIGKILL and the edge
	// exits without waiting for requests in flight.
	now := make(chan os.Signal, 1)
	signal.Notify(now, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(now)
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	killed := make(chan struct{})
	go func() {
		select {
		case <-now:
			log.Warn("second signal: stopping now")
			close(killed)
			cancel()
			if sup != nil {
				sup.Kill()
			}
		case <-supDone:
			supDone <- nil // for the wait below
		}
	}()
	if err := b.Shutdown(sctx); err != nil {
		log.Warn("edge shutdown cut short", "err", err)
	}
	serveWG.Wait()
	stopWorkers()
	// The supervisor's own waits are bounded (SIGKILL after the grace, output not awaited
	// past it); after a second signal its processes are gone within a moment.
	select {
	case <-supDone:
	case <-killed:
		select {
		case <-supDone:
		case <-time.After(5 * time.Second):
			log.Warn("workers still being reaped after the second signal; exiting")
		}
	}
	if adminSrv != nil {
		adminSrv.Close()
	}
	log.Info("stopped")
}

// workerHealth answers /healthz and /readyz with what the supervisor knows about workers
// that cannot start: /healthz fails once no worker slot can run (every one gave up), and a
// failing /readyz says why. Everything else goes to next.
func workerHealth(next http.Handler, b *balancer.Balancer, sup *workers.Supervisor) http.Handler {
	if sup == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			switch r.URL.Path {
			case "/healthz":
				if ok, reason := sup.Health(); !ok {
					http.Error(w, "unhealthy: "+reason, http.StatusServiceUnavailable)
					return
				}
			case "/readyz":
				if _, reason := sup.Health(); reason != "" && !b.Ready() {
					http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
					return
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}
