//go:build unix

package workers

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// MaxBackends bounds the backends of one edge: routing marks the workers it already tried
// in a 64-bit set.
const MaxBackends = 64

// Backends owns the worker slots of `stickyd proxy`: servers that listen on their own
// addresses, each one a worker whose channel dials it. It puts a backend into routing
// when a probe succeeds and takes it out (forgetting only its sessions) when it fails or
// leaves DNS. The zero value with Edge and Addrs set is usable.
type Backends struct {
	Edge Edge
	// Addrs are the -backend values: host:port, unix:/path, or dns:NAME:PORT (every A
	// and AAAA record of NAME is a backend, re-resolved every ResolveInterval).
	Addrs []string

	// HealthPath, if set, turns on active checks: GET HealthPath every HealthInterval,
	// a 2xx or 3xx answer passes. Without it a probe is a connect.
	HealthPath     string
	HealthInterval time.Duration // 0: 2 s
	HealthTimeout  time.Duration // one probe's bound; 0: min(HealthInterval, 2 s)
	Rise           int           // passes that put a failed backend back; 0: 2 (1 without HealthPath)
	Fall           int           // failed active checks in a row that take a backend out; 0: 3
	// Idle retires idle keep-alive connections to a backend; it must stay below the
	// backends' own keep-alive timeout (Node: 5 s). 0: the edge's WorkerIdle.
	Idle            time.Duration
	ResolveInterval time.Duration // 0: 5 s
	// Lookup resolves a dns: backend's name; nil: net.DefaultResolver.
	Lookup func(ctx context.Context, host string) ([]netip.Addr, error)
	Logger *slog.Logger
	// Pool names the -pool these backends serve ("" for the default pool), and FirstSlot
	// their first worker slot (the pools of an edge share one slot space).
	Pool      string
	FirstSlot int

	mu       sync.Mutex
	ctx      context.Context
	log      *slog.Logger
	slots    [MaxBackends]*backend
	dnsErr   map[string]string // last lookup error per dns: spec (logged once)
	settled  chan struct{}
	pending  int // backends whose first probe has not finished
	routable int
	wg       sync.WaitGroup
}

// backend is one address in one slot.
type backend struct {
	slot             int
	network, address string
	from             string // the -backend value it came from
	kick             chan struct{}
	stop             context.CancelFunc

	// Guarded by Backends.mu.
	w  *Worker // in routing; nil while out
	ch *BackendChannel
}

// BackendSpec is a parsed -backend value.
type BackendSpec struct {
	Network, Address string // for host:port and unix:/path
	DNSName, DNSPort string // for dns:NAME:PORT
}

// ParseBackend parses one -backend value.
func ParseBackend(s string) (BackendSpec, error) {
	if rest, ok := strings.CutPrefix(strings.TrimSpace(s), "dns:"); ok {
		host, port, err := net.SplitHostPort(rest)
		if err != nil || host == "" || port == "" {
			return BackendSpec{}, fmt.Errorf("%w %q: want dns:NAME:PORT, e.g. dns:app.default.svc.cluster.local:3000", ErrBadBackend, s)
		}
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			return BackendSpec{}, fmt.Errorf("%w %q: port %q is not a number", ErrBadBackend, s, port)
		}
		return BackendSpec{DNSName: host, DNSPort: port}, nil
	}
	n, a, err := ParseBackendAddr(s)
	if err != nil {
		return BackendSpec{}, err
	}
	return BackendSpec{Network: n, Address: a}, nil
}

func (bs *Backends) defaults() {
	if bs.HealthInterval <= 0 {
		bs.HealthInterval = 2 * time.Second
	}
	if bs.HealthTimeout <= 0 {
		bs.HealthTimeout = min(bs.HealthInterval, 2*time.Second)
	}
	if bs.Rise <= 0 {
		bs.Rise = 2
		if bs.HealthPath == "" {
			bs.Rise = 1
		}
	}
	if bs.Fall <= 0 {
		bs.Fall = 3
	}
	if bs.ResolveInterval <= 0 {
		bs.ResolveInterval = 5 * time.Second
	}
	if bs.Lookup == nil {
		bs.Lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	if bs.HealthPath != "" && !strings.HasPrefix(bs.HealthPath, "/") {
		bs.HealthPath = "/" + bs.HealthPath
	}
	if bs.Logger == nil {
		bs.Logger = slog.Default()
	}
	bs.log = bs.Logger
	if bs.Pool != "" {
		bs.log = bs.log.With("pool", bs.Pool)
	}
	bs.dnsErr = map[string]string{}
	bs.settled = make(chan struct{})
}

// Start checks the addresses, resolves dns: backends once, and starts probing every
// backend; each enters routing with its first passing probe. It returns at once; the
// work ends with ctx. Static backends take slots in the order given, then DNS records
// in sorted order, so an upgraded edge re-dials the same slots and its sessions stay
// pinned where they were.
func (bs *Backends) Start(ctx context.Context) error {
	bs.defaults()
	if len(bs.Addrs) == 0 {
		return fmt.Errorf("%w: no -backend given: stickyd proxy -backend 127.0.0.1:3000 [-backend ...]", ErrBadBackend)
	}
	if bs.HealthPath != "" && (strings.ContainsAny(bs.HealthPath, " \r\n") || len(bs.HealthPath) > 1024) {
		return fmt.Errorf("%w: -health-path %q: want a path such as /healthz (no spaces, under 1 KiB)", ErrBadBackend, bs.HealthPath)
	}
	var static []BackendSpec
	var dns []BackendSpec
	for _, a := range bs.Addrs {
		s, err := ParseBackend(a)
		if err != nil {
			return err
		}
		if s.DNSName != "" {
			dns = append(dns, s)
		} else {
			static = append(static, s)
		}
	}
	if len(static) > MaxBackends {
		return fmt.Errorf("%w: %d backends, at most %d", ErrBadBackend, len(static), MaxBackends)
	}
	bs.mu.Lock()
	bs.ctx = ctx
	bs.pending++ // Start's own, released below
	bs.mu.Unlock()
	for _, s := range static {
		bs.add(s.Network, s.Address, s.Address)
	}
	for _, s := range dns {
		bs.resolve(ctx, s)
	}
	bs.mu.Lock()
	bs.probedOnce() // Start's own count: settled cannot close before every backend was added
	bs.mu.Unlock()
	for _, s := range dns {
		bs.wg.Add(1)
		go bs.resolveLoop(ctx, s)
	}
	return nil
}

// Settled is closed once every backend known at Start was probed once (in routing or
// not).
func (bs *Backends) Settled() <-chan struct{} { return bs.settled }

// Wait waits until the probing and resolving goroutines ended (after ctx ended).
func (bs *Backends) Wait() { bs.wg.Wait() }

// Routable is the number of backends in routing.
func (bs *Backends) Routable() int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	return bs.routable
}

// probedOnce counts a backend's first probe; the last one closes settled. bs.mu held.
func (bs *Backends) probedOnce() {
	bs.pending--
	if bs.pending == 0 {
		select {
		case <-bs.settled:
		default:
			close(bs.settled)
		}
	}
}

// add gives address a slot and starts probing it. It reports false when every slot is
// taken.
func (bs *Backends) add(network, address, from string) bool {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	slot := slices.Index(bs.slots[:], nil)
	if slot < 0 {
		bs.log.Error("backend left out: every slot is taken", "backend", address, "max", MaxBackends)
		return false
	}
	ctx, cancel := context.WithCancel(bs.ctx)
	b := &backend{slot: slot, network: network, address: address, from: from, kick: make(chan struct{}, 1), stop: cancel}
	bs.slots[slot] = b
	bs.pending++
	bs.wg.Add(1)
	go bs.watch(ctx, b)
	return true
}

// remove takes the backend in slot out for good (its DNS record is gone): only its
// sessions are forgotten.
func (bs *Backends) remove(b *backend, why string) {
	b.stop()
	bs.mu.Lock()
	bs.takeOut(b, why)
	if bs.slots[b.slot] == b {
		bs.slots[b.slot] = nil
	}
	bs.mu.Unlock()
}

// takeOut removes b's worker from routing. bs.mu held.
func (bs *Backends) takeOut(b *backend, why string) {
	if b.w == nil {
		return
	}
	w := b.w
	b.w = nil
	bs.routable--
	bs.Edge.RemoveWorker(w)
	b.ch.Close()
	bs.log.Warn("backend out of routing: its sessions are forgotten and their clients reconnect to the others",
		"backend", b.address, "slot", w.Slot, "why", why)
}

// putIn puts b into routing with a fresh worker. bs.mu held.
func (bs *Backends) putIn(b *backend) {
	if b.w != nil || bs.ctx.Err() != nil {
		return
	}
	ch := NewBackendChannel(b.network, b.address, nil)
	ch.OnDialError = func(err error) { bs.dialFailed(b, ch, err) }
	idle := bs.Idle
	if idle <= 0 {
		idle = bs.Edge.WorkerSettings().WorkerIdle
	}
	b.ch = ch
	b.w = NewWorker(bs.FirstSlot+b.slot, 0, ch, idle)
	b.w.PoolName = bs.Pool
	bs.routable++
	bs.Edge.AddWorker(b.w)
	bs.log.Info("backend in routing", "backend", b.address, "slot", b.w.Slot)
}

// dialFailed is passive health: a connection the edge could not open. A refusal or an
// unreachable address means the server is gone (its sessions with it): the backend
// leaves routing at once and is probed back. A timeout only probes it now; the edge
// already gives it no new sessions for a while (Worker.MarkStuck).
func (bs *Backends) dialFailed(b *backend, ch *BackendChannel, err error) {
	if errors.Is(err, ErrBackendDown) {
		bs.mu.Lock()
		if b.ch == ch {
			bs.takeOut(b, err.Error())
		}
		bs.mu.Unlock()
	}
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// watch probes one backend for as long as it has its slot.
func (bs *Backends) watch(ctx context.Context, b *backend) {
	defer bs.wg.Done()
	passes, fails := 0, 0
	backoff := 100 * time.Millisecond
	first := true
	var seen answerCounts // the backend's proxied answers at the last look
	defer func() {
		if first { // removed or stopped before its first probe ended
			bs.mu.Lock()
			bs.probedOnce()
			bs.mu.Unlock()
		}
	}()
	for {
		ok, refused, why := bs.probe(ctx, b)
		if ctx.Err() != nil {
			return
		}
		if why == errLocal {
			// The edge's own shortage: no verdict on the backend; try again later.
			select {
			case <-ctx.Done():
				return
			case <-time.After(bs.HealthInterval):
			}
			continue
		}
		bs.mu.Lock()
		in := b.w != nil
		switch {
		case !ok && refused && in:
			// Nothing listens there any more: its sessions died with it.
			passes, fails = 0, fails+1
			bs.takeOut(b, why)
		case ok:
			passes, fails = passes+1, 0
			// The first probe at start puts a backend in at once: the edge serves as soon
			// as it can. After a failure it takes Rise passes in a row.
			if !in && (first || passes >= bs.Rise) {
				bs.putIn(b)
			}
		default:
			passes, fails = 0, fails+1
			if in && fails >= bs.Fall {
				bs.takeOut(b, why)
			} else if !in && (first || fails == 1) {
				bs.log.Warn("backend not reachable; probing it", "backend", b.address, "slot", bs.FirstSlot+b.slot, "why", why)
			}
		}
		if first {
			first = false
			bs.probedOnce()
		}
		in = b.w != nil
		w := b.w
		bs.mu.Unlock()
		if in {
			bs.checkAnswers(b, w, &seen)
		}

		// Out of routing: probe again soon, backing off to the health interval. In
		// routing: every interval with active checks; with passive checks only when a
		// connection fails.
		var wait <-chan time.Time
		switch {
		case !in:
			wait = time.After(backoff)
			backoff = min(2*backoff, bs.HealthInterval)
		default:
			// A connect every interval finds a backend that died while no client asked
			// for it (its WebSockets just end; only a new connection is refused).
			backoff = 100 * time.Millisecond
			wait = time.After(bs.HealthInterval)
		}
		select {
		case <-ctx.Done():
			return
		case <-wait:
		case <-b.kick:
		}
	}
}

// burst5xx is how many 5xx answers in one health interval, at least half of the
// backend's answers then, make an error burst.
const burst5xx = 20

// answerCounts are a backend's proxied answers so far: all of them and the 5xx ones.
type answerCounts struct{ all, failed float64 }

// checkAnswers is passive health on the answers: a burst of 5xx since the last look gives
// the backend no new sessions for a while (Worker.MarkStuck, a backoff); the sessions it
// holds stay, since the app may fail only some of its requests.
func (bs *Backends) checkAnswers(b *backend, w *Worker, seen *answerCounts) {
	m := bs.Edge.WorkerSettings().Metrics
	if m == nil {
		return
	}
	var now answerCounts
	for class := 100; class <= 500; class += 100 {
		var pm dto.Metric
		if w.Pool().Requests(m, class).Write(&pm) != nil {
			continue
		}
		v := pm.GetCounter().GetValue()
		now.all += v
		if class == 500 {
			now.failed = v
		}
	}
	all, failed := now.all-seen.all, now.failed-seen.failed
	*seen = now
	if failed >= burst5xx && 2*failed >= all {
		w.MarkStuck(bs.log, fmt.Sprintf("backend %s answered %.0f of its last %.0f requests with 5xx", b.address, failed, all))
	}
}

// errLocal is probe's why when the edge itself could not open a connection.
const errLocal = "local shortage"

// probe connects to b, and with HealthPath asks for it. It never waits longer than
// HealthTimeout. refused means nothing listens at b's address.
func (bs *Backends) probe(ctx context.Context, b *backend) (ok, refused bool, why string) {
	ctx, cancel := context.WithTimeout(ctx, bs.HealthTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, b.network, b.address)
	if err != nil {
		if LocalDialError(err) {
			bs.log.Warn("cannot probe a backend: the edge is out of descriptors or ports; raise the fd limit (LimitNOFILE)", "backend", b.address, "err", err)
			return false, false, errLocal
		}
		refused = errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
		return false, refused, "connect: " + err.Error()
	}
	defer c.Close()
	if bs.HealthPath == "" {
		return true, false, ""
	}
	ok, why = bs.check(ctx, c, b)
	return ok, false, why
}

// check asks an open connection to b for HealthPath.
func (bs *Backends) check(ctx context.Context, c net.Conn, b *backend) (bool, string) {
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	host := b.address
	if b.network == "unix" {
		host = "localhost"
	}
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: stickyd-health\r\nConnection: close\r\n\r\n", bs.HealthPath, host); err != nil {
		return false, "health check: " + err.Error()
	}
	// Only the status line is read, and at most 512 bytes of it.
	line, err := bufio.NewReaderSize(&limitedReader{c, 512}, 512).ReadSlice('\n')
	if err != nil {
		return false, "health check: no status line: " + err.Error()
	}
	f := strings.Fields(string(line))
	if len(f) < 2 || !strings.HasPrefix(f[0], "HTTP/1.") {
		return false, fmt.Sprintf("health check: not an HTTP answer: %q", strings.TrimSpace(string(line)))
	}
	code, err := strconv.Atoi(f[1])
	if err != nil || code < 200 || code >= 400 {
		return false, fmt.Sprintf("health check: GET %s answered %s", bs.HealthPath, strings.Join(f[1:], " "))
	}
	return true, ""
}

type limitedReader struct {
	c net.Conn
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("status line over 512 bytes")
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.c.Read(p)
	l.n -= n
	return n, err
}

// resolveLoop re-resolves a dns: backend every ResolveInterval.
func (bs *Backends) resolveLoop(ctx context.Context, s BackendSpec) {
	defer bs.wg.Done()
	t := time.NewTicker(bs.ResolveInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			bs.resolve(ctx, s)
		}
	}
}

// resolve looks s up once: a new record is a new backend, a record that disappeared
// takes its backend (and only its sessions) out. A failed lookup changes nothing: a
// DNS outage must not empty the edge.
func (bs *Backends) resolve(ctx context.Context, s BackendSpec) {
	from := "dns:" + net.JoinHostPort(s.DNSName, s.DNSPort)
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	ips, err := bs.Lookup(lctx, s.DNSName)
	cancel()
	if ctx.Err() != nil {
		return
	}
	bs.mu.Lock()
	last := bs.dnsErr[from]
	if err != nil {
		bs.dnsErr[from] = err.Error()
	} else {
		delete(bs.dnsErr, from)
	}
	bs.mu.Unlock()
	if err != nil {
		if last != err.Error() {
			bs.log.Warn("backend lookup failed; keeping the backends it gave before", "backend", from, "err", err)
		}
		return
	}
	if last != "" {
		bs.log.Info("backend lookup works again", "backend", from)
	}
	want := map[string]bool{}
	var addrs []string
	for _, ip := range ips {
		a := net.JoinHostPort(ip.Unmap().String(), s.DNSPort)
		if !want[a] {
			want[a] = true
			addrs = append(addrs, a)
		}
	}
	slices.Sort(addrs)
	bs.mu.Lock()
	have := map[string]bool{}
	var gone []*backend
	for _, b := range bs.slots {
		if b == nil || b.from != from {
			continue
		}
		have[b.address] = true
		if !want[b.address] {
			gone = append(gone, b)
		}
	}
	bs.mu.Unlock()
	for _, b := range gone {
		bs.remove(b, "its DNS record is gone")
	}
	for _, a := range addrs {
		if !have[a] {
			bs.log.Info("backend found in DNS", "backend", a, "from", from)
			bs.add("tcp", a, from)
		}
	}
}
