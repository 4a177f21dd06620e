//go:build unix

package balancer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
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

// replayableBody bounds request bodies the edge buffers so that a request can be sent
// again when a pooled virtual connection turns out to be closed (engine.io polling POSTs
// are small); larger bodies stream and are never retried.
const replayableBody = 64 << 10

// maxTrailerLines bounds the trailer of a chunked request body.
const maxTrailerLines = 100

var (
	readerPool  sync.Pool
	writerPool  = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 8<<10) }}
	copyPool    = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
	smallPool   = sync.Pool{New: func() any { b := make([]byte, replayableBody); return &b }}
	scratchPool = sync.Pool{New: func() any {
		sc := &proxyScratch{
			head: upgrade.Head{Fields: make([]upgrade.Field, 0, 32)},
			resp: upgrade.Response{Raw: make([]byte, 0, 2048), Fields: make([]upgrade.RespField, 0, 32)},
		}
		sc.sendStep, sc.flushStep = sc.x.sendStep, sc.flushWaitStep
		return sc
	}}
)

// connBufs are a proxied client connection's buffers and scratch state (≈30 KiB). They
// are taken from the pools while a request is read and served, and given back while the
// connection waits for its next request, so an idle keep-alive connection holds none.
type connBufs struct {
	br *bufio.Reader
	bw *bufio.Writer
	sc *proxyScratch

	raw syscall.RawConn // the client's socket, for flushAndWait (kept by put)
}

func (cb *connBufs) get(c net.Conn, size int) {
	if cb.br != nil {
		return
	}
	br, _ := readerPool.Get().(*bufio.Reader)
	if br == nil || br.Size() != size {
		br = bufio.NewReaderSize(c, size)
	} else {
		br.Reset(c)
	}
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(c)
	*cb = connBufs{br: br, bw: bw, sc: scratchPool.Get().(*proxyScratch)}
}

func (cb *connBufs) put() {
	if cb.br == nil {
		return
	}
	cb.sc.reset()
	scratchPool.Put(cb.sc)
	cb.br.Reset(nil)
	readerPool.Put(cb.br)
	cb.bw.Reset(nil)
	writerPool.Put(cb.bw)
	*cb = connBufs{raw: cb.raw}
}

// waitReadable parks the goroutine on the runtime poller until c has a byte to read, is
// closed by its peer, fails or reaches its read deadline, without a buffer (MSG_PEEK of
// one byte into the stack). ok is false when c is not a socket it can wait on that way
// (a connection with bytes of its own in front, from a previous edge image).
func waitReadable(c net.Conn) (ok bool, err error) {
	sc, isSock := c.(syscall.Conn)
	if !isSock {
		return false, nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, nil
	}
	_, err = fdutil.WaitReadable(rc)
	return true, err
}

// parkAfter is how long an idle keep-alive connection waits for its next request in its
// goroutine before it is parked without one (idlePark). Most next requests come at once —
// engine.io's next poll, a page's next fetch — and parking costs a few system calls and
// a goroutine start: parking at every gap cost polling through `stickyd proxy` ≈10 % of
// its rate. A connection idle longer than this is the kind that piles up. (The wait's
// deadline is moved only when half of it is spent, so the wait is parkAfter/2 to
// parkAfter: awaitRequest.)
const parkAfter = 250 * time.Millisecond

// awaitRequest waits on an idle keep-alive connection until bytes of its next request
// are in cb.br (err nil), it ends — idle timeout, closed by the client, woken for a
// shutdown or an edge upgrade (err) — or it is parked without a goroutine (parked; the
// park owns it from then on). On an error cb's buffers may have been given back.
//
// A connection the park can take waits up to parkAfter reading straight into its
// buffers: the read that finds nothing and the one that gets the request are all the
// system calls the wait costs (a MSG_PEEK wait without buffers cost two peeks and the
// read; issue 14). The buffers are held that long only: a connection idle longer is
// parked without them, so an idle connection still costs no buffer (issue 17). One that
// cannot be parked (TLS, a connection with bytes of its own in front, no epoll) waits
// without buffers on the runtime poller from the start, as does everything elsewhere.
func (b *Balancer) awaitRequest(cc *clientConn, cb *connBufs, resumed, combine bool) (parked bool, err error) {
	c := cc.c
	if cb.br.Buffered() > 0 {
		// Pipelined: the last answer goes out, the next head is read from the buffer.
		if err := cb.bw.Flush(); err != nil {
			return false, err
		}
		cb.sc.graceUntil = time.Time{}
		c.SetReadDeadline(time.Now().Add(b.cfg.IdleTimeout))
		_, err = cb.br.Peek(1)
		return false, err
	}
	now := time.Now()
	idleUntil := now.Add(b.cfg.IdleTimeout)
	grace := !resumed && b.cfg.IdleTimeout > parkAfter && b.canParkIdle(c)
	if resumed || grace {
		// resumed: it is readable already (or woken for a shutdown or an edge upgrade).
		if !grace {
			c.SetReadDeadline(idleUntil)
		} else if d := cb.sc.graceUntil; d.Sub(now) < parkAfter/2 {
			// The wait's deadline is moved only when less than half the grace is left of
			// it: between requests that come every few milliseconds it is set once in
			// parkAfter/2, not per request. An idle connection is parked after parkAfter/2
			// to parkAfter.
			cb.sc.graceUntil = now.Add(parkAfter)
			c.SetReadDeadline(cb.sc.graceUntil)
		}
		if b.rewakeIfStopping(c) {
			cb.sc.graceUntil = time.Time{}
		}
		if grace && combine && cb.bw.Buffered() > 0 {
			err = b.flushAndWait(c, cb)
		} else {
			err = cb.bw.Flush()
		}
		if err == nil {
			_, err = cb.br.Peek(1)
		}
		if err == nil || !grace || !isTimeout(err) || b.frozen() || b.isClosing() {
			return false, err // the request, or gone, or woken for a shutdown or an upgrade
		}
		// Idle for parkAfter: parked without its buffers and goroutine. A request that
		// arrives meanwhile is seen by the park (its epoll reports a readable socket).
		cb.put()
		if b.parkIdle(cc) {
			return true, nil
		}
	} else {
		if err := cb.bw.Flush(); err != nil {
			return false, err
		}
		cb.put()
	}
	c.SetReadDeadline(idleUntil)
	b.rewakeIfStopping(c)
	if ok, err := waitReadable(c); ok && err != nil {
		return false, err
	}
	cb.get(c, b.cfg.MaxHeadBytes)
	_, err = cb.br.Peek(1)
	return false, err
}

// flushAndWait sends the last answer, left in cb.bw by writeResponse, from inside the
// wait for the next request (RawConn.Read), as sendAndWait does with a request: the
// poller records the socket's readiness from before the write on, so the first read of
// the next request is not tried when it cannot have come yet (one system call per
// request; issue 14). Readiness from before the wait began is forgotten: bytes a client
// sent before it had its answer — a pipelined request, a FIN — are seen at the end of
// the grace, when the park finds them (up to parkAfter late; proxyConn stops combining
// on a connection that has pipelined). The answer is sent even when the wait cannot start.
func (b *Balancer) flushAndWait(c net.Conn, cb *connBufs) error {
	if cb.raw == nil {
		rc, err := c.(syscall.Conn).SyscallConn() // canParkIdle: a TCP or Unix socket
		if err != nil {
			return cb.bw.Flush()
		}
		cb.raw = rc
	}
	rc, sc := cb.raw, cb.sc
	sc.flushW, sc.flushDone, sc.flushErr = cb.bw, false, nil
	err := rc.Read(sc.flushStep)
	sc.flushW = nil
	if !sc.flushDone {
		if ferr := cb.bw.Flush(); ferr != nil {
			return ferr
		}
		return err
	}
	if sc.flushErr != nil {
		return sc.flushErr
	}
	return err
}

// flushWaitStep is flushAndWait's read-wait function (see sendStep).
func (sc *proxyScratch) flushWaitStep(uintptr) bool {
	if sc.flushDone {
		return true
	}
	sc.flushDone = true
	sc.flushErr = sc.flushW.Flush()
	return sc.flushErr != nil
}

// rewakeIfStopping sets c's read deadline in the past again if a shutdown or an edge
// upgrade began: its wake-up may have come just before the deadline was moved.
func (b *Balancer) rewakeIfStopping(c net.Conn) (woken bool) {
	if b.frozen() || b.isClosing() {
		c.SetReadDeadline(time.Unix(1, 0))
		return true
	}
	return false
}

// proxyScratch is the per-connection state of the proxy, reused request after request.
type proxyScratch struct {
	head upgrade.Head // aliases the client reader's buffer: valid until the body is read

	resp   upgrade.Response // the worker's response head (its own copy of the lines)
	body   upgrade.Body
	prefix [2048]byte // the start of an engine.io handshake answer

	x exchange // the request in flight (here, not on the heap per request)

	parked bool // the request in flight went to the next edge image with the connection

	// graceUntil is the client's read deadline as awaitRequest's grace set it; zero once
	// anything else may have set another (a head read on, a body, a shutdown's wake-up).
	graceUntil time.Time

	// sendStep is x.sendStep and flushStep sc.flushWaitStep as func values, made once: a
	// method value made per request would be a heap allocation per request (it escapes
	// into RawConn.Read).
	sendStep, flushStep func(uintptr) bool
	raw                 syscall.RawConn // rawFor's socket, for sendAndWait
	rawFor              net.Conn
	flushW              *bufio.Writer // flushAndWait's writer, while it waits
	flushDone           bool
	flushErr            error
}

func (sc *proxyScratch) reset() {
	clear(sc.head.Fields[:cap(sc.head.Fields)])
	sc.head = upgrade.Head{Fields: sc.head.Fields[:0]}
	sc.body = upgrade.Body{}
	sc.x = exchange{}
	sc.parked = false
	sc.graceUntil = time.Time{}
}

// reqInfo is what the edge needs of a request head after its body was read (the head
// aliases a buffer that reading the body reuses).
type reqInfo struct {
	isHead, handshake, close bool
	idempotent               bool // safe to send again when no answer came (RFC 9110 §9.2.2)
	protoMinor               int
}

// idempotentRequest reports whether a request may be sent to a worker a second time
// after the first try got no answer: the methods net/http's Transport replays, or a
// request carrying an idempotency key. A POST that crashed its worker is never carried
// on to the next one.
func idempotentRequest(h *upgrade.Head) bool {
	switch h.Method {
	case "GET", "HEAD", "OPTIONS", "TRACE":
		return true
	}
	return h.Header("Idempotency-Key") != "" || h.Header("X-Idempotency-Key") != ""
}

// proxyConn serves a client connection whose requests are proxied one by one, each to
// the worker its identity maps to. With pending, the connection comes from a previous
// edge image with its request already sent to a worker: its answer is relayed first.
// resumed means the connection was parked between requests (idlePark) and is readable
// now. It reports whether it parked the connection between requests: the connection is
// then still tracked, and resumeIdle or the idle timeout untracks it.
func (b *Balancer) proxyConn(cc *clientConn, pending *parkedExchange, resumed bool) (parked bool) {
	c := cc.c
	var cb connBufs
	cb.get(c, b.cfg.MaxHeadBytes)
	handedOff := false
	defer func() {
		if !handedOff && cb.bw != nil {
			cb.bw.Flush() // the last answer (writeResponse leaves a keep-alive one in bw)
		}
		cb.put()
		if !handedOff {
			c.Close()
		}
	}()
	peer := addrPort(c.RemoteAddr())
	trusted := b.cfg.Rules.Trusts(peer.Addr())
	first, counted := !resumed, resumed
	whole := false     // the next request's head was parsed whole where it lay (no head deadline)
	pipelines := false // the client sent a request before it had the answer to the last one
	if pending != nil {
		first, counted = false, true
		keep := b.finishParked(cc, cb.br, cb.bw, cb.sc, peer, pending)
		if cb.sc.parked {
			handedOff = true
			return
		}
		if !keep {
			return
		}
	}
	for {
		if !first {
			cc.state.Store(connIdle)
			if b.isClosing() {
				return
			}
			if b.frozen() {
				// Between requests: the next edge image serves it, with any pipelined bytes.
				if cb.bw.Flush() != nil {
					return
				}
				buffered, _ := cb.br.Peek(cb.br.Buffered())
				if b.park(c, buffered) {
					handedOff = true
					return
				}
			}
			// A client that pipelines may send its next request before it has its answer:
			// its answers are not sent from inside the wait (flushAndWait).
			pipelines = pipelines || cb.br.Buffered() > 0
			idleParked, err := b.awaitRequest(cc, &cb, resumed, !pipelines)
			resumed = false
			if idleParked {
				handedOff = true
				return true
			}
			if err != nil {
				if b.frozen() && isTimeout(err) && (cb.br == nil || cb.br.Buffered() == 0) && b.park(c, nil) {
					handedOff = true
				}
				return // idle timeout, client closed, shutdown, or parked
			}
			// A head that came whole (the usual case) is parsed where it is: no head
			// deadline to set now and clear after it. One that did not is read on within
			// HeadTimeout. A whole head leaves the wait's deadline behind: every read of
			// the client after a head sets its own (body reads, the next wait), and the
			// WebSocket hand-off clears it.
			if buf, _ := cb.br.Peek(cb.br.Buffered()); upgrade.ParseInto(&cb.sc.head, buf, b.cfg.MaxHeadBytes) == nil {
				whole = true
			} else {
				cc.state.Store(connHead)
				cb.sc.graceUntil = time.Time{}
				c.SetReadDeadline(time.Now().Add(b.cfg.HeadTimeout))
			}
		}
		first = false
		br, sc := cb.br, cb.sc
		if !whole {
			n, err := readHead(br, &sc.head, b.cfg.MaxHeadBytes)
			if err != nil {
				if b.frozen() && isTimeout(err) {
					// Part of a head has arrived: the next image gets those bytes with it.
					buffered, _ := br.Peek(br.Buffered())
					if b.park(c, buffered) {
						handedOff = true
						return
					}
				}
				if n == 0 && (errors.Is(err, io.EOF) || isTimeout(err)) {
					return
				}
				b.rejectHead(c, err)
				return
			}
		}
		cc.state.Store(connActive)
		if !whole || sc.head.WebSocket {
			c.SetReadDeadline(time.Time{})
		}
		whole = false
		if sc.head.WebSocket {
			// The head (and anything pipelined after it) has been read: the worker gets
			// those bytes with the descriptor. The head aliases br's buffer, which nothing
			// reads again before the handoff is done.
			buffered, _ := br.Peek(br.Buffered())
			consumed := bytes.Clone(buffered)
			handedOff = true
			b.handoff(cc, &sc.head, consumed)
			return
		}
		if !counted {
			counted = true
			b.m.ConnectionsAccepted.WithLabelValues(metrics.AcceptProxied).Inc()
		}
		keep := b.proxyRequest(cc, br, cb.bw, sc, peer, trusted)
		if sc.parked {
			handedOff = true // the next edge image relays the answer and goes on
			return
		}
		if !keep {
			return
		}
	}
}

// readHead parses the request head at the start of br's buffer into h, reading until
// it is complete. h aliases br's buffer, and the head is not consumed from br: the
// caller discards h.Size bytes. n is the number of bytes buffered when it returned.
func readHead(br *bufio.Reader, h *upgrade.Head, max int) (n int, err error) {
	for {
		buf, _ := br.Peek(br.Buffered())
		err := upgrade.ParseInto(h, buf, max)
		if err == nil {
			return len(buf), nil
		}
		if err != upgrade.ErrIncomplete && !errors.Is(err, upgrade.ErrIncomplete) {
			return len(buf), err
		}
		if len(buf) >= max {
			return len(buf), &upgrade.Error{Status: 431, Reason: "request head too large", Err: upgrade.ErrHeadTooLarge}
		}
		if _, err := br.Peek(len(buf) + 1); err != nil {
			if len(buf) > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return len(buf), err
		}
	}
}

// proxyRequest forwards one request and its response. It reports whether the client
// connection may carry another request.
func (b *Balancer) proxyRequest(cc *clientConn, br *bufio.Reader, bw *bufio.Writer, sc *proxyScratch, peer netip.AddrPort, trusted bool) bool {
	c := cc.c
	h := &sc.head
	br.Discard(h.Size)
	if h.ContentLength > b.cfg.MaxBodyBytes {
		b.m.Rejections.WithLabelValues(metrics.RejectBodyTooLarge).Inc()
		b.reject(c, 413, fmt.Sprintf("request body over the %d-byte limit", b.cfg.MaxBodyBytes), true)
		return false
	}
	info := reqInfo{isHead: h.Method == "HEAD", handshake: b.isHandshake(h), close: h.Close,
		idempotent: idempotentRequest(h), protoMinor: h.ProtoMinor}
	streaming := h.Chunked || h.ContentLength > replayableBody
	hasBody := h.Chunked || h.ContentLength > 0
	if hasBody {
		sc.graceUntil = time.Time{} // body reads set the client's read deadline
	}

	// A client that sent "Expect: 100-continue" waits (curl: one second) before its
	// body. The edge reads the body before it picks a connection to the worker, so it
	// answers the expectation itself, as nginx does, and does not forward it.
	if hasBody && h.ProtoMinor == 1 && expectsContinue(h) {
		bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
		if bw.Flush() != nil {
			return false
		}
	}

	// Read small bodies whole so a request can be retried on a fresh connection. They
	// are read straight from the socket once br's buffer is drained, so the head (which
	// aliases that buffer) stays valid for routing and writing it again.
	var small []byte
	if !streaming && h.ContentLength > 0 {
		sp := smallPool.Get().(*[]byte)
		defer smallPool.Put(sp)
		small = (*sp)[:h.ContentLength]
		err := b.readSmallBody(c, br, small)
		c.SetReadDeadline(time.Time{})
		if err != nil {
			if isTimeout(err) {
				b.m.Rejections.WithLabelValues(metrics.RejectBodyTimeout).Inc()
				b.reject(c, 408, "request body not received in time", false)
			}
			return false
		}
	}

	var tried uint64
	var failed *workers.Worker // the last worker this request failed on (pools skip it by identity)
	fresh, elsewhere := false, 0
	for {
		r := b.route(h, peer.Addr(), tried)
		if r.unknownSID {
			b.answerUnknownSession(c, info.isHead)
			return !streaming // an unread streaming body cannot be skipped safely
		}
		g := r.pool.Gate
		switch {
		case r.w == nil && g != nil:
			if !b.acquire(c, &r, failed, false, streaming) {
				return false // answered 503, or the client left while it waited
			}
		case r.w == nil:
			b.m.Rejections.WithLabelValues(metrics.RejectNoWorker).Inc()
			b.reject(c, 503, "no worker is ready; try again", false)
			return false
		case g != nil:
			g.Claim(r.w) // bound to a session or key: its worker, whatever its load
		default:
			r.w.BeginRequest()
		}
		x := &sc.x
		*x = exchange{b: b, cc: cc, c: c, br: br, bw: bw, sc: sc, peer: peer, trusted: trusted, info: info,
			small: small, streaming: streaming, w: r.w, slot: r.w.Slot, label: r.w.Label()}
		keep, err := x.run(fresh)
		if g != nil {
			g.Release(r.w)
		} else {
			r.w.EndRequest()
		}
		if err == nil {
			return keep
		}
		if errors.Is(err, errParked) {
			sc.parked = true
			return false
		}
		if x.answered {
			return false // the client has (part of) the answer: all that is left is to close
		}
		switch {
		case errors.Is(err, errBodyTooLarge):
			b.m.Rejections.WithLabelValues(metrics.RejectBodyTooLarge).Inc()
			b.reject(c, 413, fmt.Sprintf("request body over the %d-byte limit", b.cfg.MaxBodyBytes), false)
			return false
		case x.bodyTimeout:
			b.m.Rejections.WithLabelValues(metrics.RejectBodyTimeout).Inc()
			b.reject(c, 408, "request body not received in time", false)
			return false
		case errors.Is(err, errBadRequestBody):
			b.m.Rejections.WithLabelValues(metrics.RejectBadRequest).Inc()
			b.reject(c, 400, "malformed chunked request body", false)
			return false
		case errors.Is(err, errClientGone):
			// Nobody is left to answer; the worker's connection was closed, which tells
			// it to stop.
			b.m.Rejections.WithLabelValues(metrics.RejectClientGone).Inc()
			return false
		}
		safe := x.retrySafe()
		// A pooled connection the worker closed while it was idle: send the request
		// again once, on a fresh connection (as net/http's Transport does) — only when
		// it cannot have reached the worker or may be sent twice.
		if x.stale && !streaming && !fresh && safe {
			fresh = true
			continue
		}
		stuck := errors.Is(err, workers.ErrWorkerTimeout)
		if errors.Is(err, errResponseTimeout) {
			r.w.MarkStuck(b.log, "no response head within the response timeout")
			b.countResponse(x, 504)
			b.m.Rejections.WithLabelValues(metrics.RejectWorkerSlow).Inc()
			b.reject(c, 504, fmt.Sprintf("the worker did not answer within %v", b.cfg.ResponseTimeout), false)
			return false
		}
		if stuck {
			r.w.MarkStuck(b.log, "it did not take a connection in time")
		}
		b.warnf("proxied request failed", "worker", r.w.Slot, "err", err)
		// Elsewhere only when nothing of the body was lost, the request is not bound to
		// this worker's session, and sending it again is safe.
		if !streaming && r.key.Kind != sticky.KindSID && safe && (stuck && elsewhere < 2 || elsewhere < 1 && b.isGone(r.w)) {
			tried |= slotBit(r.w.Slot)
			failed = r.w
			fresh = false
			elsewhere++
			continue
		}
		b.countResponse(x, 502)
		b.m.Rejections.WithLabelValues(metrics.RejectWorkerFailed).Inc()
		b.reject(c, 502, "the worker failed to answer", false)
		return false
	}
}

// expectsContinue reports whether the request carries "Expect: 100-continue".
func expectsContinue(h *upgrade.Head) bool {
	for i := range h.Fields {
		if len(h.Fields[i].Name) == 6 && strings.EqualFold(h.Fields[i].Name, "Expect") &&
			strings.EqualFold(strings.TrimSpace(h.Fields[i].Value), "100-continue") {
			return true
		}
	}
	return false
}

// readSmallBody fills p with the request body: first what br holds, then straight from
// the connection (br is empty by then), every read within BodyTimeout.
func (b *Balancer) readSmallBody(c net.Conn, br *bufio.Reader, p []byte) error {
	n := min(br.Buffered(), len(p))
	if n > 0 {
		buf, _ := br.Peek(n)
		copy(p, buf)
		br.Discard(n)
	}
	for n < len(p) {
		c.SetReadDeadline(time.Now().Add(b.cfg.BodyTimeout))
		m, err := c.Read(p[n:])
		n += m
		if err != nil && n < len(p) {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// isGone reports whether w left routing (its process died): then a retry elsewhere is
// safe. A worker connection that fails is often the first sign of a dying worker, a
// moment before its channel reports it, so it waits briefly for that.
func (b *Balancer) isGone(w *workers.Worker) bool {
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	select {
	case <-w.Channel().Done():
		return true
	case <-t.C:
		return w.State() == workers.StateGone
	}
}

var (
	errBodyTooLarge    = errors.New("balancer: request body over the limit")
	errBadRequestBody  = errors.New("balancer: malformed chunked request body")
	errResponseTimeout = errors.New("balancer: no response head from the worker within the response timeout")
	errClientGone      = errors.New("balancer: the client closed its connection while its request was in flight")
	errParked          = errors.New("balancer: request in flight handed to the next edge image")
)

// clientCheckInterval is how often an exchange waiting for its response head looks
// whether the client is still there: a long-poll whose client left must not hold its
// goroutine, its worker connection and a CLOSE_WAIT socket for the whole poll.
const clientCheckInterval = time.Second

// aLongTimeAgo is a deadline in the past: it makes a blocked read or write return now.
var aLongTimeAgo = time.Unix(1, 0)

// exchange is one request/response over one virtual connection.
type exchange struct {
	b         *Balancer
	cc        *clientConn
	c         net.Conn
	br        *bufio.Reader // the client's; its buffer holds the head until the body is read
	bw        *bufio.Writer // the client's
	sc        *proxyScratch
	peer      netip.AddrPort
	trusted   bool // the peer is a trusted proxy: its forwarding fields are kept
	info      reqInfo
	small     []byte
	streaming bool
	w         *workers.Worker // nil for an exchange adopted from a previous image whose worker is not back yet
	slot      int
	label     string

	// outcome, for the caller
	answered    bool  // bytes of the response went to the client
	gotResponse bool  // bytes of a response came from the worker
	sentBytes   int64 // request bytes the worker's socket accepted
	stale       bool  // failed on a reused connection before the worker answered anything
	bodyTimeout bool  // the client's body did not make progress within BodyTimeout
	parked      bool  // handed to the next edge image: nothing may be closed

	vc *workers.Conn
	// A streaming body's sender: it reports on sent; clientTimeout is set by it before
	// it reports; aborted tells it that the response side stopped it; senderFailed is
	// set before it wakes the response reader with a past deadline.
	sent          chan error
	clientTimeout bool
	aborted       atomic.Bool
	senderFailed  atomic.Bool

	sendDone bool  // sendStep wrote the request
	sendErr  error // and this was the write's error
}

// retrySafe reports whether the request may go to a worker again: nothing of it reached
// the worker's socket, or it is idempotent and no response byte came back.
func (x *exchange) retrySafe() bool {
	if x.gotResponse {
		return false
	}
	return x.sentBytes == 0 || x.info.idempotent
}

// run sends the request and relays the response. It returns whether the client
// connection may carry another request; on error nothing or only part of the response
// reached the client (see x.answered).
func (x *exchange) run(fresh bool) (keep bool, err error) {
	b, sc := x.b, x.sc
	var vc *workers.Conn
	if fresh {
		vc, err = x.w.Pool().Dial(context.Background())
	} else {
		var unsolicited int
		vc, unsolicited, err = x.w.Pool().Get(context.Background())
		if unsolicited > 0 {
			b.protocolError(x, metrics.ProtoUnsolicited, unsolicited, "bytes arrived on an idle connection (a response nobody asked for)")
		}
	}
	if err != nil {
		return false, err
	}
	x.vc = vc
	reusable := false
	defer func() { x.release(reusable) }()

	// The head goes to the worker before any body byte is read: it aliases the client
	// reader's buffer.
	writeRequestHead(vc.BW, &sc.head, x.peer.Addr(), x.clientAddr(), x.scheme())
	if x.streaming {
		x.sent = make(chan error, 1)
		go x.sendBody(vc, x.sent, sc.head.Chunked, sc.head.ContentLength)
	} else if x.small != nil {
		// Sent by awaitResponse, in the same wait as the answer's first byte.
		vc.BW.Write(x.small)
	}
	return x.relay(&reusable)
}

// release gives the virtual connection back to the pool, or closes it.
func (x *exchange) release(reusable bool) {
	vc := x.vc
	x.sentBytes = vc.Sent()
	switch {
	case x.parked:
		vc.Detach() // the descriptor stays open for the next edge image
	case reusable && x.w != nil:
		if !x.w.Pool().Put(vc) {
			x.b.protocolError(x, metrics.ProtoUnsolicited, 1, "bytes past the end of a response")
		}
	default:
		vc.Close()
	}
}

// relay waits for the worker's response and sends it to the client.
func (x *exchange) relay(reusable *bool) (keep bool, err error) {
	b, sc, vc := x.b, x.sc, x.vc
	if err := x.awaitResponse(); err != nil {
		if err == errParked {
			return false, err
		}
		x.stale = vc.Reused && !x.streaming && vc.BR.Buffered() == 0
		if berr := x.finishBody(true); berr != nil {
			return false, berr
		}
		return false, err
	}
	x.gotResponse = true
	rh := &sc.resp
	if err := upgrade.ReadResponseHead(vc.BR, &sc.resp, x.info.isHead); err != nil {
		if errors.Is(err, upgrade.ErrBadResponse) || errors.Is(err, upgrade.ErrTooMany1xx) || errors.Is(err, upgrade.ErrResponseTooBig) {
			b.protocolError(x, metrics.ProtoMalformed, 1, err.Error())
		} else if isTimeout(err) && !x.senderFailed.Load() {
			err = errResponseTimeout
		}
		if berr := x.finishBody(true); berr != nil {
			return false, berr
		}
		return false, err
	}
	b.countResponse(x, rh.Status)

	keep = !x.info.close && !b.isClosing()
	var prefix []byte
	body := &sc.body
	*body = upgrade.Body{R: vc.BR, Wait: x, Mode: rh.BodyMode, N: rh.ContentLength}
	if x.info.handshake && rh.Status == 200 {
		prefix, err = b.learnSession(sc, x.slot)
		if err != nil {
			x.finishBody(true)
			return false, err
		}
	}
	keep, err = x.writeResponse(keep, prefix)
	if err != nil {
		if errors.Is(err, upgrade.ErrBadResponse) {
			b.protocolError(x, metrics.ProtoMalformed, 1, err.Error())
		}
		x.finishBody(true)
		return false, err
	}
	// The response is complete. A body still being sent means the worker answered
	// without reading all of it: the client's connection cannot go on.
	if berr := x.finishBody(true); berr != nil {
		return false, nil
	}
	*reusable = !rh.Close && rh.BodyMode != upgrade.BodyUntilEOF
	return keep, nil
}

// awaitResponse waits for the first byte of the worker's answer, up to ResponseTimeout.
// Meanwhile it looks every clientCheckInterval whether the client left, and it hands the
// exchange to the next edge image when the edge freezes for an upgrade.
func (x *exchange) awaitResponse() error {
	vc, b := x.vc, x.b
	if vc.BR.Buffered() > 0 && (x.streaming || vc.BW.Buffered() == 0) {
		return nil
	}
	now := time.Now()
	deadline := now.Add(b.cfg.ResponseTimeout)
	if x.cc != nil {
		x.cc.waiting.Store(vc)
		defer x.cc.waiting.Store(nil)
	}
	for {
		wake := now.Add(clientCheckInterval)
		if wake.After(deadline) {
			wake = deadline
		}
		vc.C.SetReadDeadline(wake)
		if x.senderFailed.Load() {
			return errAborted
		}
		var err error
		if !x.streaming && vc.BW.Buffered() > 0 {
			err = x.sendAndWait()
		}
		if err == nil {
			_, err = vc.BR.Peek(1)
		}
		if err == nil {
			// The rest of the head gets the same bound — unless it is all here already
			// (the usual case; not an interim 1xx answer, after which the final one is
			// read): the body's reads each set their own (WaitRead).
			if buf, _ := vc.BR.Peek(vc.BR.Buffered()); len(buf) < 10 || buf[9] == '1' || !bytes.Contains(buf, crlfcrlf) {
				vc.C.SetReadDeadline(time.Now().Add(b.cfg.ResponseTimeout))
			}
			return nil
		}
		if !isTimeout(err) {
			return err
		}
		if x.senderFailed.Load() {
			return errAborted
		}
		if b.frozen() && x.park() {
			return errParked
		}
		// A streaming body's sender reads the client and sees it leave by itself.
		if !x.streaming && clientGone(x.c) {
			return errClientGone
		}
		if now = time.Now(); !now.Before(deadline) {
			return errResponseTimeout
		}
	}
}

var crlfcrlf = []byte("\r\n\r\n")

// sendAndWait sends the request in vc.BW (a request without a streaming body) and
// waits for the worker's socket to become readable, in one read wait: the write is made
// from inside it, after the runtime's poller began to record the socket's readiness, so
// the read of the answer is not tried once before the worker can have answered (that
// read found nothing, every time: one system call per request; issue 14). Nothing that
// arrives after the write is missed — only readiness from before the wait began is
// forgotten, and before the write nothing may arrive (Pool.Get probed the connection
// idle). A write error is returned as the flush's; a wait error (deadline) after a
// complete write as the read's, as from Peek.
func (x *exchange) sendAndWait() error {
	vc, ps := x.vc, x.sc
	if ps.rawFor != vc.C { // the same virtual connection as last time, often (LIFO pool)
		ps.raw, ps.rawFor = nil, nil
		if sc, ok := vc.C.(syscall.Conn); ok {
			if rc, err := sc.SyscallConn(); err == nil {
				ps.raw, ps.rawFor = rc, vc.C
			}
		}
	}
	rc := ps.raw
	if rc == nil || x != &ps.x { // sendStep is bound to the scratch's exchange
		return vc.BW.Flush()
	}
	x.sendErr, x.sendDone = nil, false
	err := rc.Read(x.sc.sendStep)
	if !x.sendDone {
		// The wait did not start (a deadline already past, a closed socket): the request
		// is sent all the same, so a freeze's hand-over (park) gets a request the worker
		// has — or a write error.
		if ferr := vc.BW.Flush(); ferr != nil {
			return ferr
		}
		return err
	}
	if x.sendErr != nil {
		return x.sendErr
	}
	return err
}

// sendStep is sendAndWait's read-wait function: on its first call it writes the request
// and reports "not readable yet" (unless the write failed); called again, the socket is
// readable (or the wake-up was for readiness the read that follows finds spent: it then
// waits on the poller as any read does).
func (x *exchange) sendStep(uintptr) bool {
	if x.sendDone {
		return true
	}
	x.sendDone = true
	x.sendErr = x.vc.BW.Flush()
	return x.sendErr != nil
}

// park hands the exchange to the next edge image, if it can go: the request was sent
// whole and nothing of the answer has arrived.
func (x *exchange) park() bool {
	if x.streaming || x.sent != nil || x.vc.BR.Buffered() > 0 || x.vc.BW.Buffered() > 0 || x.cc == nil {
		return false
	}
	buffered, _ := x.br.Peek(x.br.Buffered()) // pipelined requests
	pending := slices.Clone(buffered)
	if pc, ok := x.c.(*prefixConn); ok {
		pending = append(pending, pc.pending...)
	}
	st := HandoverExchange{Client: HandoverConn{Buffered: pending}, Slot: x.slot, IsHead: x.info.isHead,
		Handshake: x.info.handshake, Close: x.info.close, Idempotent: x.info.idempotent, ProtoMinor: x.info.protoMinor}
	if !x.b.parkExchange(parkedExchange{c: x.c, vc: x.vc.C, st: st}) {
		return false
	}
	x.parked = true
	return true
}

// finishParked relays the answer to a request a previous edge image sent (or this one,
// before a failed upgrade), and reports whether the client connection goes on.
func (b *Balancer) finishParked(cc *clientConn, br *bufio.Reader, bw *bufio.Writer, sc *proxyScratch, peer netip.AddrPort, px *parkedExchange) bool {
	st := px.st
	w := b.worker(st.Slot)
	label := metrics.WorkerLabel(st.Slot)
	if w != nil {
		label = w.Label()
	}
	vc := &workers.Conn{C: px.vc, Reused: true}
	vc.Attach()
	x := &sc.x
	*x = exchange{b: b, cc: cc, c: cc.c, br: br, bw: bw, sc: sc, peer: peer, w: w, slot: st.Slot, label: label, vc: vc,
		info: reqInfo{isHead: st.IsHead, handshake: st.Handshake, close: st.Close, idempotent: st.Idempotent, protoMinor: st.ProtoMinor}}
	reusable := false
	keep, err := x.relay(&reusable)
	x.release(reusable && w != nil && w.State() != workers.StateGone)
	if err == nil {
		return keep
	}
	if errors.Is(err, errParked) {
		sc.parked = true
		return false
	}
	if !x.answered && !errors.Is(err, errClientGone) {
		b.countResponse(x, 502)
		b.reject(cc.c, 502, "the worker failed to answer", false)
	}
	return false
}

// WaitRead is called before a read of the worker's body that may block: what the
// client has not been sent yet goes out first (long-polls and streamed answers reach it
// at once), and a worker that stops in the middle of a body must not hold the edge
// longer than ResponseTimeout.
func (x *exchange) WaitRead() error {
	if err := x.bw.Flush(); err != nil {
		return err
	}
	x.vc.C.SetReadDeadline(time.Now().Add(x.b.cfg.ResponseTimeout))
	if x.senderFailed.Load() { // after the deadline: see awaitResponse
		return errAborted
	}
	return nil
}

// clientGone reports, without blocking, whether the client closed its connection (or it
// failed). A client that only half-closed looks the same; it is treated as gone, as
// nginx does.
func clientGone(c net.Conn) bool {
	raw := rawConn(c) // under TLS: the socket itself (a FIN is a FIN)
	if _, ok := raw.(syscall.Conn); !ok {
		return false
	}
	state, _ := fdutil.PeekConn(raw)
	return state == fdutil.PeekEOF || state == fdutil.PeekError
}

// countResponse counts a response status of the exchange's worker.
func (b *Balancer) countResponse(x *exchange, status int) {
	if x.w != nil {
		x.w.Pool().Requests(b.m, status).Inc()
		return
	}
	b.m.RequestsProxied.WithLabelValues(x.label, metrics.StatusClass(status)).Inc()
}

// protocolError counts a worker's breach of HTTP/1.1 framing (its connection is closed,
// never reused) and logs it, rate-limited.
func (b *Balancer) protocolError(x *exchange, reason string, n int, what string) {
	b.m.WorkerProtocolErrs.WithLabelValues(x.label, reason).Add(float64(n))
	b.warnf("worker broke HTTP framing; its connection is closed, not reused", "worker", x.slot, "reason", reason, "detail", what)
}

// writeRequestHead writes the request line and fields for the worker: the request as
// the client sent it, less hop-by-hop fields, plus X-Forwarded-For/-Proto and the
// edge's own framing. Forwarding fields from a peer that is not a trusted proxy are
// dropped, not appended to: the worker sees exactly one client address, the true one.
// client, when valid, goes in ClientAddrField (client is the peer unless trusted); proto
// ("http" or "https") is the scheme the client used with the edge.
func writeRequestHead(w *bufio.Writer, h *upgrade.Head, peer netip.Addr, client netip.AddrPort, proto string) {
	trusted := client.IsValid() && client.Addr() != peer
	w.WriteString(h.Method)
	w.WriteByte(' ')
	if t := h.Target; len(t) > 0 && (t[0] == '/' || t == "*") {
		w.WriteString(t)
	} else { // absolute form: the worker gets origin form
		w.WriteString(h.Path)
		if h.RawQuery != "" {
			w.WriteByte('?')
			w.WriteString(h.RawQuery)
		}
	}
	w.WriteString(" HTTP/1.1\r\nHost: ")
	if h.Host != "" {
		w.WriteString(h.Host)
	} else {
		w.WriteString("worker") // HTTP/1.0 without Host: HTTP/1.1 needs one
	}
	w.WriteString("\r\n")
	hasConn := false
	for i := range h.Fields {
		if strings.EqualFold(h.Fields[i].Name, "Connection") {
			hasConn = true
			break
		}
	}
	skip := func(name string) bool {
		return upgrade.IsHop(name) || (hasConn && upgrade.NamedByConnection(h.Fields, name))
	}
	nXFF, hasXFP := 0, false
	for _, f := range h.Fields {
		if skip(f.Name) {
			continue
		}
		switch fwd := forwardingField(f.Name); {
		case fwd == fwdFor:
			nXFF++
			continue
		case fwd == fwdExpect || fwd == fwdEdge:
			continue // answered by the edge (100 Continue), or the edge's own
		case fwd != fwdNone && !trusted:
			continue // a client's claim about itself: dropped
		case fwd == fwdProto:
			hasXFP = true
		}
		w.WriteString(f.Name)
		w.WriteString(": ")
		w.WriteString(f.Value)
		w.WriteString("\r\n")
	}
	w.WriteString("X-Forwarded-For: ")
	if nXFF > 0 && trusted {
		for _, f := range h.Fields {
			if strings.EqualFold(f.Name, "X-Forwarded-For") && !skip(f.Name) {
				w.WriteString(f.Value)
				w.WriteString(", ")
			}
		}
	}
	w.Write(peer.AppendTo(w.AvailableBuffer()))
	w.WriteString("\r\n")
	if !hasXFP {
		w.WriteString("X-Forwarded-Proto: ")
		w.WriteString(proto)
		w.WriteString("\r\n")
	}
	// RFC 7239: this hop, after whatever a trusted proxy sent (a second field line is
	// the same list).
	w.WriteString("Forwarded: for=")
	if peer.Is6() && !peer.Is4In6() {
		w.WriteString(`"[`)
		w.Write(peer.AppendTo(w.AvailableBuffer()))
		w.WriteString(`]"`)
	} else {
		w.Write(peer.Unmap().AppendTo(w.AvailableBuffer()))
	}
	w.WriteString(";proto=")
	w.WriteString(proto)
	w.WriteString("\r\n")
	if client.IsValid() {
		writeClientAddr(w, client)
	}
	switch {
	case h.Chunked:
		w.WriteString("Transfer-Encoding: chunked\r\n")
	case h.ContentLength >= 0:
		w.WriteString("Content-Length: ")
		w.Write(strconv.AppendInt(w.AvailableBuffer(), h.ContentLength, 10))
		w.WriteString("\r\n")
	}
	w.WriteString("\r\n")
}

// Request fields the edge rewrites or drops (forwardingField).
const (
	fwdNone   = iota
	fwdFor    // X-Forwarded-For: rebuilt by the edge
	fwdProto  // X-Forwarded-Proto: kept from a trusted proxy, else written by the edge
	fwdOther  // other claims about the client: kept only from a trusted proxy
	fwdExpect // Expect: answered by the edge
	fwdEdge   // the edge's own fields (ClientAddrField): never from a client
)

// ClientAddrField carries the client's address ("ip:port", port 0 when it came from a
// trusted proxy's X-Forwarded-For) to workers whose connection from the edge has no
// address of its own: Node workers reached over socketpairs, where the preload makes it
// the request's socket.remoteAddress. Whatever a client sends under this name is dropped.
const ClientAddrField = fdpass.ClientAddrField

func writeClientAddr(w *bufio.Writer, client netip.AddrPort) {
	w.WriteString(ClientAddrField)
	w.WriteString(": ")
	w.Write(client.AppendTo(w.AvailableBuffer()))
	w.WriteString("\r\n")
}

// scheme is how the client reached the edge: "https" over TLS.
func (x *exchange) scheme() string { return schemeOf(x.c) }

func schemeOf(c net.Conn) string {
	if _, ok := c.(*tls.Conn); ok {
		return "https"
	}
	return "http"
}

// clientAddr is the client as the worker should see it: the peer, or the client a
// trusted proxy names.
func (x *exchange) clientAddr() netip.AddrPort {
	if !x.trusted {
		return x.peer
	}
	h := &x.sc.head
	a := x.b.cfg.Rules.Client(sticky.Request{Peer: x.peer.Addr(), Fields: h})
	if a == x.peer.Addr() {
		return x.peer
	}
	return netip.AddrPortFrom(a, 0)
}

func forwardingField(name string) int {
	switch len(name) {
	case 6:
		if strings.EqualFold(name, "Expect") {
			return fwdExpect
		}
	case len(ClientAddrField):
		if strings.EqualFold(name, ClientAddrField) {
			return fwdEdge
		}
	case 9:
		if strings.EqualFold(name, "Forwarded") || strings.EqualFold(name, "X-Real-IP") {
			return fwdOther
		}
	case 15:
		if strings.EqualFold(name, "X-Forwarded-For") {
			return fwdFor
		}
	case 16:
		if strings.EqualFold(name, "X-Forwarded-Host") || strings.EqualFold(name, "X-Forwarded-Port") {
			return fwdOther
		}
	case 17:
		if strings.EqualFold(name, "X-Forwarded-Proto") {
			return fwdProto
		}
	}
	return fwdNone
}

// sendBody streams a body that is not buffered (chunked, or larger than
// replayableBody) from the client to the worker while the response is read. It runs in
// its own goroutine (a worker may answer while it reads, as an echo does) and reports on
// sent; on an error of its own it also wakes the response reader.
func (x *exchange) sendBody(vc *workers.Conn, sent chan<- error, chunked bool, n int64) {
	var err error
	if chunked {
		err = x.sendChunked(vc.BW)
	} else {
		err = x.sendLength(vc.BW, n)
	}
	if err != nil {
		if x.aborted.Load() {
			err = errAborted
		} else {
			x.senderFailed.Store(true) // before the wake-up: see awaitResponse and respBody.fill
			vc.C.SetReadDeadline(aLongTimeAgo)
		}
	}
	sent <- err
}

// finishBody waits for the body sender. With abort it first makes a sender that is
// still blocked (on the client or the worker) return. It returns the sender's own error
// (client too slow, body too large, malformed), or errAborted.
func (x *exchange) finishBody(abort bool) error {
	ch := x.sent
	if ch == nil {
		return nil
	}
	x.sent = nil
	var err error
	select {
	case err = <-ch:
	default:
		if abort {
			x.aborted.Store(true)
			x.c.SetReadDeadline(aLongTimeAgo)
			x.vc.C.SetWriteDeadline(aLongTimeAgo)
		}
		err = <-ch
		if abort {
			x.vc.C.SetWriteDeadline(time.Time{})
		}
	}
	x.c.SetReadDeadline(time.Time{})
	if err != nil && x.clientTimeout {
		x.bodyTimeout = true
	}
	return err
}

var errAborted = errors.New("balancer: request body abandoned")

// pace sets the client's read deadline before a read that may block, after flushing
// what the worker has not been sent yet.
func (x *exchange) pace(vw *bufio.Writer) error {
	if err := vw.Flush(); err != nil {
		return err
	}
	x.c.SetReadDeadline(time.Now().Add(x.b.cfg.BodyTimeout))
	return nil
}

// clientErr classifies an error reading the client's body.
func (x *exchange) clientErr(err error) error {
	if isTimeout(err) && !x.aborted.Load() {
		x.clientTimeout = true
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// sendLength copies an n-byte body: what br holds, then straight from the connection.
func (x *exchange) sendLength(vw *bufio.Writer, n int64) error {
	br := x.br
	if k := int(min(int64(br.Buffered()), n)); k > 0 {
		p, _ := br.Peek(k)
		if _, err := vw.Write(p); err != nil {
			return err
		}
		br.Discard(k)
		n -= int64(k)
	}
	if n == 0 {
		return vw.Flush()
	}
	bp := copyPool.Get().(*[]byte)
	defer copyPool.Put(bp)
	buf := *bp
	for n > 0 {
		if err := x.pace(vw); err != nil {
			return err
		}
		m, err := x.c.Read(buf[:min(int64(len(buf)), n)])
		if m > 0 {
			if _, werr := vw.Write(buf[:m]); werr != nil {
				return werr
			}
			n -= int64(m)
		}
		if err != nil && n > 0 {
			return x.clientErr(err)
		}
	}
	return vw.Flush()
}

// sendChunked forwards a chunked body chunk by chunk: sizes parsed and written anew
// (extensions dropped), data passed through, trailer fields consumed, the total held to
// MaxBodyBytes.
func (x *exchange) sendChunked(vw *bufio.Writer) error {
	br := x.br
	var total int64
	for {
		line, err := x.bodyLine(vw)
		if err != nil {
			return err
		}
		size, ok := upgrade.ParseChunkSize(line)
		if !ok {
			return errBadRequestBody
		}
		if size == 0 {
			for i := 0; ; i++ {
				if i == maxTrailerLines {
					return errBadRequestBody
				}
				line, err := x.bodyLine(vw)
				if err != nil {
					return err
				}
				if len(line) == 0 {
					break
				}
			}
			vw.WriteString("0\r\n\r\n")
			return vw.Flush()
		}
		if total += size; total > x.b.cfg.MaxBodyBytes {
			return errBodyTooLarge
		}
		vw.Write(strconv.AppendInt(vw.AvailableBuffer(), size, 16))
		vw.WriteString("\r\n")
		for size > 0 {
			if br.Buffered() == 0 {
				if err := x.pace(vw); err != nil {
					return err
				}
				if _, err := br.Peek(1); err != nil {
					return x.clientErr(err)
				}
			}
			k := int(min(int64(br.Buffered()), size))
			p, _ := br.Peek(k)
			if _, err := vw.Write(p); err != nil {
				return err
			}
			br.Discard(k)
			size -= int64(k)
		}
		if line, err := x.bodyLine(vw); err != nil {
			return err
		} else if len(line) != 0 {
			return errBadRequestBody
		}
		vw.WriteString("\r\n")
	}
}

// bodyLine reads one line of chunked framing from the client, without its CRLF.
func (x *exchange) bodyLine(vw *bufio.Writer) ([]byte, error) {
	buffered, _ := x.br.Peek(x.br.Buffered())
	if bytes.IndexByte(buffered, '\n') < 0 {
		if err := x.pace(vw); err != nil {
			return nil, err
		}
	}
	line, err := x.br.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull {
			return nil, errBadRequestBody
		}
		return nil, x.clientErr(err)
	}
	line = line[:len(line)-1]
	if len(line) == 0 || line[len(line)-1] != '\r' {
		return nil, errBadRequestBody // bare LF
	}
	return line[:len(line)-1], nil
}

// writeResponse sends the worker's response to the client. The client connection's
// keep-alive is the edge's business: a worker that closes its virtual connection after
// every response (as @socket.io/sticky workers do) does not close the client's.
func (x *exchange) writeResponse(keep bool, prefix []byte) (bool, error) {
	sc, bw, rh := x.sc, x.bw, &x.sc.resp
	noBody := x.info.isHead || rh.Status == 204 || rh.Status == 304
	chunked := !noBody && rh.ContentLength < 0
	if chunked && x.info.protoMinor == 0 {
		keep = false // HTTP/1.0 clients know no chunked encoding: the end of body is the close
		chunked = false
	}
	x.answered = true
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(sc.resp.Str(rh.StatusText))
	if rh.StatusText.End-rh.StatusText.Start == 3 {
		bw.WriteByte(' ')
	}
	bw.WriteString("\r\n")
	for _, f := range sc.resp.Fields {
		name := sc.resp.Str(f.Name)
		if upgrade.IsHop(name) || (rh.HasConnection && sc.resp.NamedByConnection(name)) {
			continue
		}
		bw.WriteString(name)
		bw.WriteString(": ")
		bw.WriteString(sc.resp.Str(f.Value))
		bw.WriteString("\r\n")
	}
	switch {
	case noBody:
		if x.info.isHead && rh.CLValue.End > rh.CLValue.Start {
			bw.WriteString("Content-Length: ")
			bw.WriteString(sc.resp.Str(rh.CLValue))
			bw.WriteString("\r\n")
		}
	case chunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case rh.ContentLength >= 0:
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), rh.ContentLength, 10))
		bw.WriteString("\r\n")
	}
	if !keep {
		bw.WriteString("Connection: close\r\n")
	} else if x.info.protoMinor == 0 {
		bw.WriteString("Connection: keep-alive\r\n")
	}
	if len(prefix) > 0 { // a handshake answer (learnSession): affinity hints for a balancer in front
		x.writeAffinity(bw, prefix)
	}
	bw.WriteString("\r\n")
	if noBody {
		return keep, x.endResponse(keep)
	}
	write := func(p []byte) error {
		if chunked {
			bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(len(p)), 16))
			bw.WriteString("\r\n")
		}
		if _, err := bw.Write(p); err != nil {
			return err
		}
		if chunked {
			_, err := bw.WriteString("\r\n")
			return err
		}
		return nil
	}
	if len(prefix) > 0 {
		if err := write(prefix); err != nil {
			return false, err
		}
	}
	body := &sc.body
	for {
		p, err := body.Next(1 << 30)
		if len(p) > 0 {
			if werr := write(p); werr != nil {
				return false, werr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return false, err
		}
	}
	if chunked {
		bw.WriteString("0\r\n\r\n")
	}
	return keep, x.endResponse(keep)
}

// endResponse flushes the end of an answer after which the connection closes. A
// keep-alive answer's end stays in the client's writer: the wait for the next request
// sends it (awaitRequest, flushAndWait), and every other way out of proxyConn flushes
// it first.
func (x *exchange) endResponse(keep bool) error {
	if keep {
		return nil
	}
	return x.bw.Flush()
}

// learnSession records which worker minted the session in an engine.io handshake
// answer, before the client can see it: from Set-Cookie (cookie identity) and from the
// open packet. It returns the body bytes it had to read, which are forwarded first.
func (b *Balancer) learnSession(sc *proxyScratch, slot int) ([]byte, error) {
	now := time.Now()
	for _, s := range b.cfg.Rules.Sources {
		if s.Kind != sticky.KindCookie {
			continue
		}
		for _, f := range sc.resp.Fields {
			if !strings.EqualFold(sc.resp.Str(f.Name), "Set-Cookie") {
				continue
			}
			ck, err := http.ParseSetCookie(sc.resp.Str(f.Value))
			if err == nil && ck.Name == s.Name && ck.Value != "" {
				b.sessions.Put(sticky.NamedKey(sticky.KindCookie, ck.Name, ck.Value).String(), slot, now)
			}
		}
	}
	limit := len(sc.prefix)
	if rh := &sc.resp; rh.ContentLength >= 0 && rh.ContentLength < int64(limit) {
		limit = int(rh.ContentLength)
	}
	n, err := io.ReadFull(&sc.body, sc.prefix[:limit])
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		return nil, err
	}
	prefix := sc.prefix[:n]
	if d, ok := upgrade.OpenPacketTimeout(prefix); ok && !b.cfg.FixedSessionTTL && b.sessions.RaiseTTL(d) {
		// The app keeps silent sessions longer than the edge did: so must the edge, or
		// it forgets them first and answers "Session ID unknown".
		b.log.Info("session TTL raised to the app's pingInterval + pingTimeout", "ttl", d)
	}
	if sid, ok := upgrade.OpenPacketSID(prefix); ok {
		if ev := b.sessions.Put(sticky.Key{Kind: sticky.KindSID, Value: sid}.String(), slot, now); ev > 0 {
			b.m.SessionEvictions.WithLabelValues(metrics.EvictCapacity).Add(float64(ev))
		}
	}
	return prefix, nil
}
