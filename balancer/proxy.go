package balancer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stickyd/stickyd/metrics"
	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// replayableBody bounds request bodies the edge buffers so that a request can be sent
// again when a pooled virtual connection turns out to be closed (engine.io polling POSTs
// are small); larger bodies stream and are never retried.
const replayableBody = 64 << 10

var (
	readerPool sync.Pool
	writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 8<<10) }}
	copyPool   = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
)

// proxyConn serves a client connection whose requests are proxied one by one, each to
// the worker its identity maps to.
func (b *Balancer) proxyConn(cc *clientConn) {
	c := cc.c
	br, _ := readerPool.Get().(*bufio.Reader)
	if br == nil || br.Size() != b.cfg.MaxHeadBytes {
		br = bufio.NewReaderSize(c, b.cfg.MaxHeadBytes)
	} else {
		br.Reset(c)
	}
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(c)
	handedOff := false
	defer func() {
		br.Reset(nil)
		readerPool.Put(br)
		bw.Reset(nil)
		writerPool.Put(bw)
		if !handedOff {
			c.Close()
		}
	}()
	peer := addrPort(c.RemoteAddr())
	first, counted := true, false
	for {
		if !first {
			cc.state.Store(connIdle)
			if b.isClosing() {
				return
			}
			c.SetReadDeadline(time.Now().Add(b.cfg.IdleTimeout))
			if _, err := br.Peek(1); err != nil {
				return // idle timeout, client closed, or shutdown
			}
			cc.state.Store(connHead)
			c.SetReadDeadline(time.Now().Add(b.cfg.HeadTimeout))
		}
		first = false
		head, raw, err := readHead(br, b.cfg.MaxHeadBytes)
		if err != nil {
			if len(raw) == 0 && (errors.Is(err, io.EOF) || isTimeout(err)) {
				return
			}
			b.rejectHead(c, err)
			return
		}
		cc.state.Store(connActive)
		c.SetReadDeadline(time.Time{})
		if head.WebSocket {
			// The head (and anything pipelined after it) has been read: the worker gets
			// those bytes with the descriptor.
			buffered, _ := br.Peek(br.Buffered())
			consumed := append(raw, buffered...)
			handedOff = true
			b.handoff(cc, &head, consumed)
			return
		}
		if !counted {
			counted = true
			b.m.ConnectionsAccepted.WithLabelValues("proxied").Inc()
		}
		if !b.proxyRequest(c, br, bw, &head, peer) {
			return
		}
	}
}

// readHead reads one request head from br and returns it parsed together with a copy
// of its raw bytes. The returned head does not alias br's buffer.
func readHead(br *bufio.Reader, max int) (upgrade.Head, []byte, error) {
	for {
		buf, _ := br.Peek(br.Buffered())
		head, err := upgrade.Parse(buf, max)
		if err == nil {
			raw := append([]byte(nil), buf[:head.Size]...)
			br.Discard(head.Size)
			return head, raw, nil
		}
		if !errors.Is(err, upgrade.ErrIncomplete) {
			return head, buf, err
		}
		if len(buf) >= max {
			return head, buf, &upgrade.Error{Status: 431, Reason: "request head too large", Err: upgrade.ErrHeadTooLarge}
		}
		if _, err := br.Peek(len(buf) + 1); err != nil {
			if len(buf) > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return head, buf, err
		}
	}
}

// hopHeaders are connection-level fields that never cross the edge.
var hopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Te": true,
	"Trailer": true, "Transfer-Encoding": true, "Upgrade": true, "Content-Length": true,
	"Host": true, "Proxy-Authenticate": true, "Proxy-Authorization": true,
}

// proxyRequest forwards one request and its response. It reports whether the client
// connection may carry another request.
func (b *Balancer) proxyRequest(c net.Conn, br *bufio.Reader, bw *bufio.Writer, h *upgrade.Head, peer netip.AddrPort) bool {
	// Read small bodies whole so a request can be retried on a fresh connection.
	var small []byte
	var body io.Reader
	if h.ContentLength > b.cfg.MaxBodyBytes {
		b.m.Rejections.WithLabelValues(metrics.RejectBodyTooLarge).Inc()
		b.reject(c, 413, fmt.Sprintf("request body over the %d-byte limit", b.cfg.MaxBodyBytes), true)
		return false
	}
	// Every read of a body must make progress within BodyTimeout: a client that trickles
	// its body cannot hold a worker connection forever.
	paced := &pacedReader{r: br, c: c, d: b.cfg.BodyTimeout}
	switch {
	case h.Chunked:
		// The chunked reader must read br itself: wrapped in anything else it would add a
		// buffer of its own and swallow the next request's bytes.
		body = &limitedBody{r: &chunkedBody{r: httputil.NewChunkedReader(br), br: br, pace: paced}, n: b.cfg.MaxBodyBytes}
	case h.ContentLength > replayableBody:
		body = io.LimitReader(paced, h.ContentLength)
	case h.ContentLength > 0:
		small = make([]byte, h.ContentLength)
		if _, err := io.ReadFull(paced, small); err != nil {
			c.SetReadDeadline(time.Time{})
			if isTimeout(err) {
				b.m.Rejections.WithLabelValues(metrics.RejectBodyTimeout).Inc()
				b.reject(c, 408, "request body not received in time", false)
			}
			return false
		}
	}
	defer c.SetReadDeadline(time.Time{})

	var tried uint64
	for attempt := 0; ; attempt++ {
		r := b.route(h, peer.Addr(), tried)
		if r.unknownSID {
			b.answerUnknownSession(c)
			return body == nil // an unread streaming body cannot be skipped safely
		}
		if r.w == nil {
			b.m.Rejections.WithLabelValues("no_worker").Inc()
			b.reject(c, 503, "no worker is ready; try again", false)
			return false
		}
		req := buildRequest(h, peer, small, body)
		resp, err := r.w.transport.RoundTrip(req)
		if err != nil {
			if errors.Is(err, errBodyTooLarge) {
				b.m.Rejections.WithLabelValues(metrics.RejectBodyTooLarge).Inc()
				b.reject(c, 413, fmt.Sprintf("request body over the %d-byte limit", b.cfg.MaxBodyBytes), false)
				return false
			}
			if isTimeout(err) {
				b.m.Rejections.WithLabelValues(metrics.RejectBodyTimeout).Inc()
				b.reject(c, 408, "request body not received in time", false)
				return false
			}
			b.log.Warn("proxied request failed", "worker", r.w.Slot, "err", err)
			// Retry elsewhere only when nothing of the body was lost and the request is
			// not bound to this worker's session.
			if body == nil && r.key.Kind != sticky.KindSID && attempt < 2 && b.isGone(r.w) {
				tried |= slotBit(r.w.Slot)
				continue
			}
			b.m.RequestsProxied.WithLabelValues(r.w.label, "5xx").Inc()
			b.reject(c, 502, "the worker failed to answer", false)
			return false
		}
		b.m.RequestsProxied.WithLabelValues(r.w.label, metrics.StatusClass(resp.StatusCode)).Inc()
		keep := b.writeResponse(bw, h, resp, r.w)
		resp.Body.Close()
		if lb, ok := body.(*limitedBody); ok && !lb.r.done {
			return false
		}
		if lr, ok := body.(*io.LimitedReader); ok && lr.N > 0 {
			return false // the worker answered without reading the whole body
		}
		return keep
	}
}

// isGone reports whether w left routing (its process died): then a retry elsewhere is safe.
func (b *Balancer) isGone(w *Worker) bool {
	select {
	case <-w.ch.Done():
		return true
	default:
		return w.State() == StateGone
	}
}

func buildRequest(h *upgrade.Head, peer netip.AddrPort, small []byte, body io.Reader) *http.Request {
	u := &url.URL{Scheme: "http", Host: "worker", RawQuery: h.RawQuery}
	if strings.HasPrefix(h.Path, "//") {
		u.Path = h.Path
	} else {
		u.Opaque = h.Path // sent exactly as the client wrote it
	}
	hdr := make(http.Header, len(h.Fields)+2)
	var connTokens string
	for _, f := range h.Fields {
		if strings.EqualFold(f.Name, "Connection") {
			connTokens += "," + f.Value
		}
	}
	for _, f := range h.Fields {
		name := http.CanonicalHeaderKey(f.Name)
		if hopHeaders[name] || (connTokens != "" && hasToken(connTokens, name)) {
			continue
		}
		hdr[name] = append(hdr[name], f.Value)
	}
	ip := peer.Addr().String()
	if prior := hdr["X-Forwarded-For"]; len(prior) > 0 {
		hdr["X-Forwarded-For"] = []string{strings.Join(prior, ", ") + ", " + ip}
	} else {
		hdr["X-Forwarded-For"] = []string{ip}
	}
	if _, ok := hdr["X-Forwarded-Proto"]; !ok {
		hdr["X-Forwarded-Proto"] = []string{"http"}
	}
	if _, ok := hdr["User-Agent"]; !ok {
		hdr["User-Agent"] = []string{""} // keeps net/http from adding its own
	}
	req := &http.Request{
		Method:     h.Method,
		URL:        u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     hdr,
		Host:       h.Host,
	}
	switch {
	case small != nil:
		req.ContentLength = int64(len(small))
		req.Body = io.NopCloser(bytes.NewReader(small))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(small)), nil }
	case body != nil && h.Chunked:
		req.ContentLength = -1
		req.TransferEncoding = []string{"chunked"}
		req.Body = io.NopCloser(body)
	case body != nil:
		req.ContentLength = h.ContentLength
		req.Body = io.NopCloser(body)
	}
	return req.WithContext(context.Background())
}

func hasToken(list, token string) bool {
	for _, t := range strings.Split(list, ",") {
		if strings.EqualFold(strings.TrimSpace(t), token) {
			return true
		}
	}
	return false
}

// pacedReader extends the connection's read deadline before every read.
type pacedReader struct {
	r io.Reader
	c net.Conn
	d time.Duration
}

func (p *pacedReader) Read(b []byte) (int, error) {
	p.c.SetReadDeadline(time.Now().Add(p.d))
	return p.r.Read(b)
}

var errBodyTooLarge = errors.New("balancer: request body over the limit")

// limitedBody fails a chunked body that grows past the limit.
type limitedBody struct {
	r *chunkedBody
	n int64
}

func (l *limitedBody) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	if l.n -= int64(n); l.n < 0 {
		return n, errBodyTooLarge
	}
	return n, err
}

// chunkedBody decodes a chunked request body and consumes its trailer section, so the
// next request on the connection starts where it should.
type chunkedBody struct {
	r    io.Reader
	br   *bufio.Reader
	pace *pacedReader
	done bool
}

func (cb *chunkedBody) Read(p []byte) (int, error) {
	if cb.done {
		return 0, io.EOF
	}
	cb.pace.c.SetReadDeadline(time.Now().Add(cb.pace.d))
	n, err := cb.r.Read(p)
	if err == io.EOF {
		// Trailer fields up to the empty line; bounded like a head.
		for i := 0; i < 100; i++ {
			line, lerr := cb.br.ReadSlice('\n')
			if lerr != nil {
				return n, lerr
			}
			if len(line) == 2 && line[0] == '\r' {
				cb.done = true
				return n, io.EOF
			}
		}
		return n, errors.New("balancer: too many trailer fields")
	}
	return n, err
}

// writeResponse sends the worker's response to the client. The client connection's
// keep-alive is the edge's business: a worker that closes its virtual connection after
// every response (as @socket.io/sticky workers do) does not close the client's.
func (b *Balancer) writeResponse(bw *bufio.Writer, h *upgrade.Head, resp *http.Response, w *Worker) bool {
	keep := !h.Close && !b.isClosing()
	noBody := h.Method == "HEAD" || resp.StatusCode == 204 || resp.StatusCode == 304 || resp.StatusCode < 200
	var prefix []byte
	if isHandshake(h) && resp.StatusCode == 200 {
		prefix = b.learnSession(h, resp, w)
	}
	chunked := !noBody && resp.ContentLength < 0
	if chunked && h.ProtoMinor == 0 {
		keep = false // HTTP/1.0 clients know no chunked encoding: the end of body is the close
		chunked = false
	}
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(resp.Status)
	bw.WriteString("\r\n")
	var connTokens string
	for _, v := range resp.Header["Connection"] {
		connTokens += "," + v
	}
	for k, vv := range resp.Header {
		if hopHeaders[k] || (connTokens != "" && hasToken(connTokens, k)) {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	switch {
	case noBody:
		if cl := resp.Header.Get("Content-Length"); cl != "" && h.Method == "HEAD" {
			bw.WriteString("Content-Length: " + cl + "\r\n")
		}
	case chunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case resp.ContentLength >= 0:
		bw.WriteString("Content-Length: ")
		bw.WriteString(strconv.FormatInt(resp.ContentLength, 10))
		bw.WriteString("\r\n")
	}
	if !keep {
		bw.WriteString("Connection: close\r\n")
	} else if h.ProtoMinor == 0 {
		bw.WriteString("Connection: keep-alive\r\n")
	}
	bw.WriteString("\r\n")
	if noBody {
		return bw.Flush() == nil && keep
	}
	var out io.Writer = bw
	var cw io.WriteCloser
	if chunked {
		cw = httputil.NewChunkedWriter(bw)
		out = cw
	}
	if len(prefix) > 0 {
		if _, err := out.Write(prefix); err != nil {
			return false
		}
	}
	if err := copyFlushing(out, bw, resp.Body); err != nil {
		return false
	}
	if cw != nil {
		cw.Close()
		bw.WriteString("\r\n")
	}
	return bw.Flush() == nil && keep
}

// copyFlushing streams src to dst, flushing after every read so long-poll and
// server-sent data reach the client as soon as the worker produces them.
func copyFlushing(dst io.Writer, bw *bufio.Writer, src io.Reader) error {
	bp := copyPool.Get().(*[]byte)
	defer copyPool.Put(bp)
	buf := *bp
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
			if werr := bw.Flush(); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// learnSession records which worker minted the session in an engine.io handshake
// answer, before the client can send its next request. It returns the body bytes it had
// to read, which the caller forwards first.
func (b *Balancer) learnSession(h *upgrade.Head, resp *http.Response, w *Worker) []byte {
	now := time.Now()
	for _, sc := range resp.Cookies() {
		for _, s := range b.cfg.Rules.Sources {
			if s.Kind == sticky.KindCookie && s.Name == sc.Name && sc.Value != "" {
				b.sessions.Put(sticky.NamedKey(sticky.KindCookie, sc.Name, sc.Value).String(), w.Slot, now)
			}
		}
	}
	limit := int64(2048)
	if resp.ContentLength >= 0 && resp.ContentLength < limit {
		limit = resp.ContentLength
	}
	prefix := make([]byte, limit)
	n, _ := io.ReadFull(resp.Body, prefix)
	prefix = prefix[:n]
	if sid, ok := upgrade.OpenPacketSID(prefix); ok {
		if ev := b.sessions.Put(sticky.Key{Kind: sticky.KindSID, Value: sid}.String(), w.Slot, now); ev > 0 {
			b.m.SessionEvictions.WithLabelValues("capacity").Add(float64(ev))
		}
	}
	return prefix
}

// tunnel proxies an upgraded connection byte for byte through a virtual connection, for
// workers that cannot take bytes the edge already read with a descriptor (Node). The
// edge stays in the data path for this one connection.
func (b *Balancer) tunnel(cc *clientConn, w *Worker, consumed []byte) {
	c := cc.c
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.HandoffTimeout)
	vc, err := w.dialVirtual(ctx)
	cancel()
	if err != nil {
		b.m.Handoffs.WithLabelValues(w.label, "error").Inc()
		b.reject(c, 503, "no worker could take the connection; try again", false)
		return
	}
	defer vc.Close()
	b.m.ConnectionsAccepted.WithLabelValues("tunneled").Inc()
	if _, err := vc.Write(consumed); err != nil {
		return
	}
	errc := make(chan error, 2)
	go pipe(vc, c, errc)
	go pipe(c, vc, errc)
	<-errc
	<-errc
}

// pipe copies one direction of a tunnel and half-closes the far side at the end.
func pipe(dst, src net.Conn, errc chan<- error) {
	_, err := io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
	errc <- err
}

var _ = fmt.Sprintf
