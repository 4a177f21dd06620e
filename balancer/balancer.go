//go:build unix

// Package balancer is the stickyd edge: it accepts client connections, peeks at the
// request head, picks the worker that owns the client's session, and either hands the
// connection's descriptor to that worker (WebSocket upgrades: the edge then leaves the
// data path) or proxies the connection's requests one by one, each to its own worker
// (plain HTTP such as engine.io long-polling, where one keep-alive connection may carry
// requests of several sessions).
package balancer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// Config is the edge's configuration. The zero value is usable: every zero field takes
// the default its comment names.
type Config struct {
	Rules   sticky.Rules   // identity sources; zero: sid, then client IP
	Balance sticky.Balance // bounded-load factor; zero: ε = 0.25

	SessionTTL time.Duration // idle expiry of learned sessions; 0: 45 s (engine.io ping interval + timeout)
	// FixedSessionTTL keeps SessionTTL as it is; otherwise it rises to the app's
	// pingInterval + pingTimeout, read from each engine.io handshake answer.
	FixedSessionTTL bool
	MaxSessions     int // bound on learned sessions (sids, session cookies); 0: 1,000,000
	// MaxAffinity bounds the other pinned keys (client addresses, header values), which
	// any client can mint; 0: 100,000. Over it the least recently used go first.
	MaxAffinity int

	MaxHeadBytes    int           // request head size cap; 0: 16 KiB
	HeadTimeout     time.Duration // time a client gets to send a request head; 0: 10 s
	MaxPendingHeads int           // connections allowed to be mid-head at once; 0: 4096
	HandoffTimeout  time.Duration // time a worker gets to take a connection; 0: 5 s
	MaxConns        int           // client connections the edge holds at once (beyond: 503 and close); 0: 100,000
	MaxConnsPerIP   int           // per client IP (beyond: 429 and close); 0: no limit
	MaxBodyBytes    int64         // request body limit for proxied requests (413); 0: 100 MiB
	BodyTimeout     time.Duration // a request body must make progress this often; 0: HeadTimeout
	IdleTimeout     time.Duration // keep-alive idle time of proxied client connections; 0: 60 s
	WorkerIdle      time.Duration // idle virtual connections to workers are retired after; 0: 4 s
	// ResponseTimeout bounds the wait for a worker's response head, and for each further
	// piece of its body; 0: 60 s. It must exceed the longest long-poll the app holds
	// (engine.io: pingInterval, 25 s by default).
	ResponseTimeout time.Duration
	// RedirectHTTPS, a port, makes plain-HTTP connections answer 308 to the same URL over
	// https on that port (the edge's TLS listener) instead of being served.
	RedirectHTTPS string
	// EngineIOPath is the path prefix of engine.io requests (socket.io's "path" option);
	// only requests under it are routed by sid or learned from; "": /socket.io/.
	EngineIOPath string
	// NoFastPath turns off the in-accept-loop handoff of complete WebSocket heads (for
	// measuring it; the general path handles everything either way).
	NoFastPath bool

	// Affinity hints for a balancer in front of several hosts (affinity.go): on an
	// engine.io handshake answer, a cookie AffinityCookie=NodeID and a header SIDHeader
	// carrying the sid. "": not sent. NodeID "": the short host name.
	NodeID, AffinityCookie, SIDHeader string

	// Pools send the requests they match to named pools of workers (pools.go); the first
	// match wins, the rest go to the default pool.
	Pools []Pool

	Metrics *metrics.Metrics // nil: unregistered collectors
	Logger  *slog.Logger     // nil: slog.Default()
}

func (c *Config) applyDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.SessionTTL, 45*time.Second)
	def(&c.HeadTimeout, 10*time.Second)
	def(&c.HandoffTimeout, 5*time.Second)
	def(&c.IdleTimeout, 60*time.Second)
	def(&c.WorkerIdle, 4*time.Second)
	def(&c.ResponseTimeout, 60*time.Second)
	if c.EngineIOPath == "" {
		c.EngineIOPath = "/socket.io/"
	}
	if !strings.HasPrefix(c.EngineIOPath, "/") {
		c.EngineIOPath = "/" + c.EngineIOPath
	}
	if !strings.HasSuffix(c.EngineIOPath, "/") {
		c.EngineIOPath += "/"
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = 1_000_000
	}
	if c.MaxAffinity <= 0 {
		c.MaxAffinity = 100_000
	}
	if c.MaxHeadBytes <= 0 {
		c.MaxHeadBytes = upgrade.DefaultMaxHeadBytes
	}
	if c.MaxPendingHeads <= 0 {
		c.MaxPendingHeads = 4096
	}
	if c.MaxConns <= 0 {
		c.MaxConns = 100_000
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 100 << 20
	}
	def(&c.BodyTimeout, c.HeadTimeout)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.affinityDefaults()
}

var (
	// ErrClosed is returned by Serve after Shutdown.
	ErrClosed = errors.New("balancer: closed")
	// ErrNoWorker means no worker is ready to take a connection.
	ErrNoWorker = errors.New("balancer: no worker ready")
)

// Balancer is the edge. Create it with New; its methods are safe for concurrent use.
type Balancer struct {
	cfg      Config
	log      *slog.Logger
	m        *metrics.Metrics
	sessions *sticky.Table // sids and session cookies
	pins     *sticky.Table // addresses and header values
	pending  chan struct{} // one token per connection in the head phase

	workers atomic.Pointer[[]*workers.Worker] // copy-on-write snapshot, indexed by nothing: search by Slot
	defPool *pool                             // the workers no Pool names
	pools   []*pool                           // Config.Pools, in order
	connID  atomic.Uint64

	mu        sync.Mutex
	closing   bool
	listeners map[net.Listener]struct{}
	rawLns    map[net.Listener]*os.File // the fast path's accept descriptors (fastpath.go)
	conns     map[*clientConn]struct{}
	perIP     map[netip.Addr]int // only with MaxConnsPerIP
	wg        sync.WaitGroup
	done      chan struct{} // closed by Shutdown

	tlsWarned atomic.Int64           // unix seconds of the last "TLS on a plain port" log line
	redirect  atomic.Pointer[string] // SetRedirectHTTPS; nil: Config.RedirectHTTPS
	warned    sync.Map               // message → *warnState (warnf)
	draining  atomic.Bool

	// Edge upgrade (handover.go).
	freezing  atomic.Bool
	frozenLns []net.Listener
	handed    []HandoverConn
	parked    []net.Conn
	handedX   []HandoverExchange
	parkedX   []parkedExchange

	idle idlePark // keep-alive connections between requests, held without a goroutine
}

// New returns an edge with no workers yet.
func New(cfg Config) *Balancer {
	cfg.applyDefaults()
	m := cfg.Metrics
	if m == nil {
		m, _ = metrics.New(nil, false)
	}
	b := &Balancer{
		cfg:       cfg,
		log:       cfg.Logger,
		m:         m,
		sessions:  &sticky.Table{TTL: cfg.SessionTTL, MaxEntries: cfg.MaxSessions},
		pins:      &sticky.Table{TTL: cfg.SessionTTL, MaxEntries: cfg.MaxAffinity},
		pending:   make(chan struct{}, cfg.MaxPendingHeads),
		listeners: map[net.Listener]struct{}{},
		rawLns:    map[net.Listener]*os.File{},
		conns:     map[*clientConn]struct{}{},
		perIP:     map[netip.Addr]int{},
		done:      make(chan struct{}),
	}
	b.workers.Store(&[]*workers.Worker{})
	b.initPools()
	go b.sweepSessions()
	return b
}

// Sessions exposes the learned session table (for admin views and edge upgrades).
func (b *Balancer) Sessions() *sticky.Table { return b.sessions }

// Affinity exposes the table of other pinned keys (addresses, header values), for edge
// upgrades.
func (b *Balancer) Affinity() *sticky.Table { return b.pins }

func (b *Balancer) sweepSessions() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-b.done:
			return
		case now := <-t.C:
			if n := b.sessions.Sweep(now) + b.pins.Sweep(now); n > 0 {
				b.m.SessionEvictions.WithLabelValues(metrics.EvictExpired).Add(float64(n))
			}
			b.publishSessionGauges()
		}
	}
}

func (b *Balancer) publishSessionGauges() {
	b.m.SessionTableSize.Set(float64(b.sessions.Len() + b.pins.Len()))
	for _, w := range *b.workers.Load() {
		b.m.Sessions.WithLabelValues(w.Label()).Set(float64(b.Load(w.Slot)))
	}
}

// clientConn is a client connection the edge still holds.
type clientConn struct {
	c       net.Conn
	ip      netip.Addr                   // counted in perIP
	state   atomic.Int32                 // connHead, connIdle, connActive
	waiting atomic.Pointer[workers.Conn] // the worker connection whose answer it awaits
}

const (
	connHead   = iota // waiting for (the rest of) a request head
	connIdle          // keep-alive connection between requests
	connActive        // a request is being proxied
)

// Serve accepts connections on ln until Shutdown. Transient accept errors (EMFILE,
// ENFILE, ECONNABORTED...) back off from 5 ms to 1 s instead of spinning or exiting.
func (b *Balancer) Serve(ln net.Listener) error {
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return ErrClosed
	}
	b.listeners[ln] = struct{}{}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.listeners, ln)
		b.mu.Unlock()
	}()
	if tl, ok := ln.(*net.TCPListener); ok && !b.cfg.NoFastPath && b.redirectPort() == "" {
		return b.serveTCP(tl)
	}

	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if b.isClosing() {
				return ErrClosed
			}
			if b.frozen() {
				return ErrFrozen // Freeze took the listener, still open
			}
			if fdutil.TemporaryAccept(err) {
				if !b.backOff(&delay, err) {
					return ErrClosed
				}
				continue
			}
			return fmt.Errorf("balancer: accept on %s: %w", ln.Addr(), err)
		}
		delay = 0
		if !b.admit(c) {
			return ErrClosed
		}
	}
}

// backOff sleeps after a transient accept failure, 5 ms doubling to 1 s, as net/http's
// Serve does: EMFILE would otherwise spin (the pending connection stays queued). It
// reports false when the edge shut down meanwhile.
func (b *Balancer) backOff(delay *time.Duration, err error) bool {
	*delay = min(max(2**delay, 5*time.Millisecond), time.Second)
	b.warnf("accept failed; retrying", "err", err, "retry_in", *delay,
		"hint", "raise the fd limit (LimitNOFILE) if this is EMFILE")
	select {
	case <-time.After(*delay):
		return true
	case <-b.done:
		return false
	}
}

// admit tracks a new client connection and starts serving it, or turns it away when a
// limit is reached. It reports false when the edge is shutting down.
func (b *Balancer) admit(c net.Conn) bool {
	cc := &clientConn{c: c}
	switch b.track(cc) {
	case trackClosed:
		c.Close()
		return false
	case trackTooMany:
		// Keep accepting: a full edge answers and closes instead of leaving clients in
		// the backlog, where they cannot tell a slow edge from a dead one.
		b.m.Rejections.WithLabelValues(metrics.RejectMaxConns).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		go b.reject(c, 503, "the edge is at its connection limit; try again", false)
	case trackPerIP:
		b.m.Rejections.WithLabelValues(metrics.RejectPerIP).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		go b.reject(c, 429, "too many connections from this address", false)
	default:
		go b.serveConn(cc)
	}
	return true
}

func (b *Balancer) isClosing() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

const (
	trackOK = iota
	trackClosed
	trackTooMany
	trackPerIP
)

func (b *Balancer) track(cc *clientConn) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing {
		return trackClosed
	}
	if len(b.conns) >= b.cfg.MaxConns {
		return trackTooMany
	}
	if b.cfg.MaxConnsPerIP > 0 {
		ip := addrPort(cc.c.RemoteAddr()).Addr()
		if ip.Is6() {
			// One IPv6 client holds a whole /64: counting addresses one by one would let
			// it open MaxConnsPerIP connections from each of 2^64 of them.
			ip = netip.PrefixFrom(ip, 64).Masked().Addr()
		}
		if b.perIP[ip] >= b.cfg.MaxConnsPerIP {
			return trackPerIP
		}
		b.perIP[ip]++
		cc.ip = ip
	}
	b.conns[cc] = struct{}{}
	b.wg.Add(1)
	return trackOK
}

func (b *Balancer) untrack(cc *clientConn) {
	b.mu.Lock()
	delete(b.conns, cc)
	if cc.ip.IsValid() {
		if b.perIP[cc.ip]--; b.perIP[cc.ip] <= 0 {
			delete(b.perIP, cc.ip)
		}
	}
	b.mu.Unlock()
	b.wg.Done()
}

// Shutdown stops accepting, ends connections that are mid-head or idle between
// requests, lets proxied requests in flight finish (their responses carry
// Connection: close), and waits for that until ctx ends; then it closes what is left.
// Handed-off WebSockets live in the workers and are not touched.
func (b *Balancer) Shutdown(ctx context.Context) error {
	b.mu.Lock()
	if !b.closing {
		b.closing = true
		close(b.done)
	}
	for ln := range b.listeners {
		ln.Close()
	}
	for _, lf := range b.rawLns {
		lf.Close()
	}
	b.wakeIdle()
	b.mu.Unlock()

	waited := make(chan struct{})
	go func() { b.wg.Wait(); close(waited) }()
	// Connections may go idle after the first sweep; keep waking them.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-waited:
			return nil
		case <-tick.C:
			b.mu.Lock()
			b.wakeIdle()
			b.mu.Unlock()
		case <-ctx.Done():
			b.mu.Lock()
			for cc := range b.conns {
				cc.c.Close()
			}
			b.mu.Unlock()
			<-waited
			return ctx.Err()
		}
	}
}

// wakeIdle makes blocked reads of idle and mid-head connections return now. b.mu held.
func (b *Balancer) wakeIdle() {
	b.wakeParked()
	past := time.Unix(1, 0)
	for cc := range b.conns {
		if s := cc.state.Load(); s == connHead || s == connIdle {
			cc.c.SetReadDeadline(past)
		} else if vc := cc.waiting.Load(); vc != nil && b.frozen() {
			vc.C.SetReadDeadline(past) // its exchange goes to the next image
		}
	}
}

// serveConn is one client connection's life in the edge; named for goroutine dumps.
func (b *Balancer) serveConn(cc *clientConn) {
	parked := false // an idle keep-alive connection parked: whoever resumes it untracks it
	defer func() {
		if !parked {
			b.untrack(cc)
		}
	}()
	c := cc.c
	if tc, ok := c.(*tls.Conn); ok {
		b.serveTLSConn(cc, tc)
		return
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		c.Close()
		return
	}
	select {
	case b.pending <- struct{}{}:
	default:
		b.m.Rejections.WithLabelValues(metrics.RejectOverload).Inc()
		b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
		b.reject(c, 503, "too many connections are sending their request head; try again", false)
		return
	}
	c.SetReadDeadline(time.Now().Add(b.cfg.HeadTimeout))
	raw, err := sc.SyscallConn()
	if err != nil {
		<-b.pending
		c.Close()
		return
	}
	ph := getPeekBuf(b.cfg.MaxHeadBytes)
	_, err = upgrade.PeekInto(raw, &ph.head, ph.buf)
	<-b.pending
	if err != nil {
		putPeekBuf(ph)
		if b.frozen() && isTimeout(err) && b.park(c, nil) {
			return // nothing was read: the next image peeks again
		}
		b.rejectHead(c, err)
		return
	}
	if b.redirectPort() != "" {
		b.redirectHTTPS(c, &ph.head)
		putPeekBuf(ph)
		return
	}
	if ph.head.WebSocket {
		// Nothing has been read from the socket: the worker sees the original bytes.
		// The head aliases ph.buf, which stays ours until the handoff is done.
		c.SetReadDeadline(time.Time{})
		if b.handoffPeeked(cc, ph) {
			parked = true // the handoff untracks the connection when the worker answers
			return
		}
		putPeekBuf(ph)
		return
	}
	putPeekBuf(ph)
	parked = b.proxyConn(cc, nil, false)
}

// resumeIdle serves a parked keep-alive connection whose next request arrived (or that
// closed, or that shutdown or an edge upgrade woke).
func (b *Balancer) resumeIdle(cc *clientConn) {
	if !b.proxyConn(cc, nil, true) {
		b.untrack(cc)
	}
}

func (b *Balancer) rejectHead(c net.Conn, err error) {
	b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptRejected).Inc()
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		b.m.Rejections.WithLabelValues(metrics.RejectClientClosed).Inc()
		c.Close()
		return
	case errors.Is(err, upgrade.ErrTLS):
		b.m.Rejections.WithLabelValues(metrics.RejectTLS).Inc()
		if now := time.Now().Unix(); b.tlsWarned.Swap(now) < now-60 {
			b.log.Warn("client sent a TLS handshake to a plain-HTTP port: TLS is not enabled on this port; terminate TLS in front of stickyd",
				"client", c.RemoteAddr().String())
		}
		c.Close()
		return
	case isTimeout(err):
		b.m.Rejections.WithLabelValues(metrics.RejectHeadTimeout).Inc()
		if b.isClosing() {
			c.Close()
			return
		}
		b.reject(c, 408, "request head not received in time", true)
		return
	}
	status := upgrade.StatusOf(err)
	reason := "bad_request"
	switch {
	case errors.Is(err, upgrade.ErrHeadTooLarge):
		reason = "head_too_large"
	case errors.Is(err, upgrade.ErrSmuggling):
		reason = "smuggling"
	case errors.Is(err, upgrade.ErrVersion):
		reason = "version"
	}
	b.m.Rejections.WithLabelValues(reason).Inc()
	b.log.Debug("rejected request head", "client", c.RemoteAddr().String(), "status", status, "err", err)
	b.reject(c, status, err.Error(), true)
}

// warnf logs a warning about one request at most about once a second per message (a
// broken worker or a flood of bad clients must not flood the log); the count of the
// ones left out goes with the next.
func (b *Balancer) warnf(msg string, args ...any) {
	now := time.Now().UnixNano()
	v, _ := b.warned.LoadOrStore(msg, new(warnState))
	ws := v.(*warnState)
	last := ws.last.Load()
	if now-last < int64(time.Second) || !ws.last.CompareAndSwap(last, now) {
		ws.dropped.Add(1)
		return
	}
	if n := ws.dropped.Swap(0); n > 0 {
		args = append(args, "similar_suppressed", n)
	}
	b.log.Warn(msg, args...)
}

type warnState struct{ last, dropped atomic.Int64 }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, upgrade.ErrTimeout) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// reject answers status and closes. Closing a socket with unread input makes the kernel
// send a reset that can destroy the answer before the client reads it, so when input
// may be pending the edge half-closes first and drains briefly, as net/http does.
func (b *Balancer) reject(c net.Conn, status int, msg string, drain bool) {
	b.rejectWith(c, status, "", msg, drain)
}

// rejectWith is reject with more header lines (each ending in CRLF).
func (b *Balancer) rejectWith(c net.Conn, status int, fields, msg string, drain bool) {
	body := msg + "\n"
	c.SetWriteDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nConnection: close\r\n%sContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s",
		status, statusText(status), fields, len(body), body)
	closeGracefully(c, drain)
}

func closeGracefully(c net.Conn, drain bool) {
	if drain {
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
			c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			io.CopyN(io.Discard, c, 256<<10)
		}
	}
	c.Close()
}

// handoff gives a WebSocket upgrade to its worker and returns when it is done. consumed
// is nil when the head was only peeked; otherwise it holds every byte the edge read from
// the connection.
func (b *Balancer) handoff(cc *clientConn, h *upgrade.Head, consumed []byte) {
	b.newHandoff(cc, h, consumed).next()
}

// handoffPeeked is handoff for serveConn's peeked upgrade, which may return before the
// worker has answered (AsyncChannel: a Node worker). It reports whether it did: the
// connection's tracking and ph are then released by the handoff when it ends.
func (b *Balancer) handoffPeeked(cc *clientConn, ph *peekBuf) (pending bool) {
	run := b.newHandoff(cc, &ph.head, nil)
	run.ph = ph
	return run.next()
}

// handoffRun is one upgrade's way to a worker: the attempts made so far, kept while a
// worker's answer is pending so that a failure goes on from there.
type handoffRun struct {
	b        *Balancer
	cc       *clientConn
	h        *upgrade.Head
	consumed []byte
	meta     fdpass.Meta
	tried    uint64
	failed   *workers.Worker // the last worker this connection failed on (pools skip it by identity)
	attempt  int
	r        route     // the attempt in progress
	start    time.Time // when it started
	// ph, when set, allows an asynchronous handoff (AsyncChannel); the run then puts it
	// back and untracks the connection when it ends.
	ph *peekBuf
}

func (b *Balancer) newHandoff(cc *clientConn, h *upgrade.Head, consumed []byte) *handoffRun {
	c := cc.c
	return &handoffRun{
		b: b, cc: cc, h: h, consumed: consumed,
		meta: fdpass.Meta{
			Kind:     fdpass.KindConn,
			ConnID:   b.connID.Add(1),
			Remote:   addrPort(c.RemoteAddr()),
			Local:    addrPort(c.LocalAddr()),
			Consumed: consumed,
		},
	}
}

// next makes the remaining attempts, up to 3 in all, and answers 503 when none worked. It
// reports whether a worker's answer is pending (complete goes on from there).
func (run *handoffRun) next() (pending bool) {
	b, c, h, consumed := run.b, run.cc.c, run.h, run.consumed
	for ; run.attempt < 3; run.attempt++ {
		if run.attempt > 0 && consumed == nil && !unread(c) {
			// The worker that failed read the request before it went: another could not
			// answer it (it would wait for a head that never comes). The client sees its
			// connection end, as if that worker had closed it, and retries.
			b.warnf("handoff failed after the worker read the request; connection closed, not retried", "worker", run.r.w.Slot)
			c.Close()
			return false
		}
		r := b.route(h, run.meta.Remote.Addr(), run.tried)
		if r.unknownSID {
			// A peeked head is still unread in the socket: closing over it would reset the
			// connection and destroy the 400, so the edge drains it first.
			b.answerUnknownSession(c, h.Method == "HEAD")
			closeGracefully(c, consumed == nil)
			return false
		}
		if r.w == nil && r.pool.Gate != nil && !b.acquire(c, &r, run.failed, true, consumed == nil) {
			return false // answered 503, or the client left while it waited
		}
		if r.w == nil {
			break
		}
		run.r, run.start = r, time.Now()
		var err error
		// A backend reached by address takes no descriptors, a Node worker cannot take
		// bytes the edge already read, and a TLS session lives in the edge: the edge tunnels (a peeked head is still in the
		// socket, so the tunnel carries the client's own bytes).
		_, isTLS := c.(*tls.Conn)
		if _, dials := r.w.Channel().(workers.Dialer); dials || isTLS || consumed != nil && !r.w.Channel().CanReplay() {
			if dials && r.key.Kind == sticky.KindNone && !b.isHandshake(h) {
				countTunnel(r.w)
			}
			if err = b.tunnel(run.cc, r.w, h, consumed); err == nil {
				return false
			}
		} else if ac, ok := r.w.Channel().(workers.AsyncChannel); ok && run.ph != nil {
			if err = ac.DeliverFunc(c.(syscall.Conn), run.meta, run.complete); err == nil {
				return true
			}
		} else {
			// Each channel bounds its own wait (HandoffTimeout): no context per handoff.
			if err = r.w.Channel().Deliver(context.Background(), c.(syscall.Conn), run.meta); err == nil {
				// The worker holds its own descriptor now; the edge keeps nothing.
				c.Close()
				b.handedOff(r.w, run.start)
				return false
			}
		}
		if !run.failedAttempt(err) {
			return false
		}
	}
	b.m.Rejections.WithLabelValues(metrics.RejectNoWorker).Inc()
	b.reject(c, 503, "no worker could take the connection; try again", consumed == nil)
	return false
}

// complete is a worker's answer to an asynchronous handoff, on the worker channel's own
// goroutine: a success ends the run there; a failure goes on in a goroutine of its own
// (the next attempt may wait, and the channel must keep serving its worker).
func (run *handoffRun) complete(err error) {
	if err == nil {
		run.cc.c.Close() // the worker holds its own descriptor now; the edge keeps nothing
		run.b.handedOff(run.r.w, run.start)
		run.end()
		return
	}
	go func() {
		if run.failedAttempt(err) {
			run.attempt++
			if run.next() {
				return
			}
		}
		run.end()
	}()
}

// unread reports whether the peeked request is still in c's socket for another worker to
// read.
func unread(c net.Conn) bool {
	state, _ := fdutil.PeekConn(c)
	return state == fdutil.PeekData
}

// end releases what an asynchronous handoff kept for its last attempt.
func (run *handoffRun) end() {
	putPeekBuf(run.ph)
	run.b.untrack(run.cc)
}

// failedAttempt records a failed attempt and reports whether another worker may be tried.
func (run *handoffRun) failedAttempt(err error) bool {
	b, r := run.b, run.r
	b.m.HandoffDuration.Observe(time.Since(run.start).Seconds())
	result := metrics.HandoffError
	if errors.Is(err, workers.ErrWorkerTimeout) {
		result = metrics.HandoffTimeout
		// A worker that does not take connections gets no new sessions for a while;
		// the ones it already holds are not moved.
		r.w.MarkStuck(b.log, "a handoff timed out")
	}
	b.m.Handoffs.WithLabelValues(r.w.Label(), result).Inc()
	b.warnf("handoff failed", "worker", r.w.Slot, "err", err)
	if r.key.Kind == sticky.KindSID {
		// The session exists only on that worker.
		b.m.Rejections.WithLabelValues(metrics.RejectNoWorker).Inc()
		b.reject(run.cc.c, 503, "no worker could take the connection; try again", run.consumed == nil)
		return false
	}
	if r.tableKey != "" {
		b.tableFor(r.key.Kind).Delete(r.tableKey)
	}
	run.tried |= slotBit(r.w.Slot)
	run.failed = r.w
	b.m.Handoffs.WithLabelValues(r.w.Label(), metrics.HandoffRetried).Inc()
	return true
}

// handedOff counts a connection a worker took (both paths record it here).
func (b *Balancer) handedOff(w *workers.Worker, start time.Time) {
	w.NoteHandoff(start)
	b.m.HandoffDuration.Observe(time.Since(start).Seconds())
	b.m.Handoffs.WithLabelValues(w.Label(), metrics.HandoffOK).Inc()
	b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptHandedOff).Inc()
}

// slotBit is slot's bit in a set of tried workers. Slots 64 apart share one: a request
// routes within one pool, whose slots are consecutive (the pools of `stickyd proxy` start
// at multiples of 64), so within a pool of up to 64 workers each has its own, and past
// that a retry may skip one more worker than it must — never retry the one that failed.
func slotBit(slot int) uint64 {
	if slot < 0 {
		return 0
	}
	return 1 << (uint(slot) & 63)
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// answerUnknownSession answers engine.io's own 400 for a sid no live worker holds (no
// body for HEAD).
func (b *Balancer) answerUnknownSession(c net.Conn, isHead bool) {
	b.m.UnknownSessions.Inc()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	body := upgrade.SessionUnknownBody
	if isHead {
		body = ""
	}
	fmt.Fprintf(c, "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		len(upgrade.SessionUnknownBody), body)
	c.SetWriteDeadline(time.Time{})
}

// peekBuf is a head buffer and the Head parsed from it (whose strings alias buf).
type peekBuf struct {
	buf  []byte
	head upgrade.Head
}

var peekPool sync.Pool

func getPeekBuf(n int) *peekBuf {
	if pb, ok := peekPool.Get().(*peekBuf); ok && len(pb.buf) == n {
		return pb
	}
	return &peekBuf{buf: make([]byte, n)}
}

func putPeekBuf(pb *peekBuf) {
	fields := pb.head.Fields[:0]
	pb.head = upgrade.Head{Fields: fields}
	peekPool.Put(pb)
}

func statusText(code int) string {
	if t := http.StatusText(code); t != "" {
		return t
	}
	return "Error"
}
