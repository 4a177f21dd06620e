//go:build unix

package balancer

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
	"github.com/stickyd/stickyd/fdpass/platform"
)

// writeTunnelHead writes an upgrade request's head for a backend reached by address, which
// sees the edge as its peer: the head as the client sent it (Connection and Upgrade stay:
// the backend answers the upgrade itself), less the client's forwarding fields unless the
// peer is a trusted proxy, plus X-Forwarded-For (the chain a trusted proxy gave, then the
// peer) and X-Forwarded-Proto — what the per-request path writes for the same backend.
// head is the whole head, through its blank line; a head it cannot split is written as is.
func writeTunnelHead(w *bufio.Writer, head []byte, peer netip.Addr, trusted bool, proto string) {
	rest := head
	for len(rest) > 0 && (rest[0] == '\r' || rest[0] == '\n') {
		rest = rest[1:] // empty lines before the request line (RFC 9112 §2.2)
	}
	i := bytes.IndexByte(rest, '\n')
	if i < 0 {
		w.Write(head)
		return
	}
	w.Write(rest[:i+1]) // request line
	rest = rest[i+1:]
	var chain []string
	hasProto := false
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			i = len(rest) - 1
		}
		line := rest[:i+1]
		rest = rest[i+1:]
		text := strings.TrimRight(string(line), "\r\n")
		if text == "" {
			break // the blank line: ours go before it
		}
		name, value, _ := strings.Cut(text, ":")
		switch forwardingField(strings.TrimSpace(name)) {
		case fwdFor:
			if trusted {
				chain = append(chain, strings.TrimSpace(value))
			}
			continue // rebuilt below
		case fwdEdge:
			continue // the edge's own field for socketpair workers
		case fwdProto:
			if !trusted {
				continue
			}
			hasProto = true
		case fwdNone, fwdExpect:
		default:
			if !trusted {
				continue // a client's claim about itself (Forwarded, X-Real-IP): dropped
			}
		}
		w.Write(line)
	}
	w.WriteString("X-Forwarded-For: ")
	for _, c := range chain {
		w.WriteString(c)
		w.WriteString(", ")
	}
	w.Write(peer.AppendTo(w.AvailableBuffer()))
	w.WriteString("\r\n")
	if !hasProto {
		w.WriteString("X-Forwarded-Proto: ")
		w.WriteString(proto)
		w.WriteString("\r\n")
	}
	w.WriteString("\r\n")
}

// tlsTunnelBuf is what a direction of a tunnel from a TLS client holds while it waits.
const tlsTunnelBuf = 4 << 10

var tunnelBufPool = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// copyPooled copies a socket to a destination that cannot splice (a TLS client, a
// socketpair to a worker): it waits for input holding no buffer, then moves what is there
// through a pooled one.
func copyPooled(dst, src net.Conn, sc syscall.Conn) error {
	rc, err := sc.SyscallConn()
	if err != nil {
		_, err := io.Copy(dst, src)
		return err
	}
	for {
		switch state, err := fdutil.WaitReadable(rc); {
		case err != nil:
			return err // a deadline (freeze, shutdown), a closed connection, a failed socket
		case state == fdutil.PeekEOF:
			return nil
		}
		bp := tunnelBufPool.Get().(*[]byte)
		n, rerr2 := src.Read(*bp)
		if n > 0 {
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				tunnelBufPool.Put(bp)
				return werr
			}
		}
		tunnelBufPool.Put(bp)
		if rerr2 == io.EOF {
			return nil
		}
		if rerr2 != nil {
			return rerr2
		}
	}
}

// copyWhenReadable copies src to dst until src ends, like io.Copy, but takes a splice pipe
// only while bytes wait in src. Between two sockets io.Copy splices through a kernel pipe
// (two descriptors) that it holds for as long as it waits for input: on an idle tunnel,
// forever — 4 of the 6 descriptors an idle tunnel held. Here the goroutine waits for input
// with no pipe (through the netpoller), then splices exactly what is queued (SIOCINQ), and
// the pipe goes back to the runtime's pool. dst must be a
// *net.TCPConn (its ReadFrom splices from TCP and unix sources); anything else is io.Copy.
func copyWhenReadable(dst, src net.Conn) error {
	tc, ok := dst.(*net.TCPConn)
	sc, ok2 := src.(syscall.Conn)
	if pc, isPrefix := src.(*prefixConn); isPrefix && len(pc.pending) > 0 {
		ok2 = false // bytes of its own in front of the socket: no waiting on the socket
	}
	if !ok2 {
		// TLS: the session may hold decrypted bytes the socket no longer shows, so the
		// copy cannot wait on the socket; it keeps a small buffer (not io.Copy's 32 KiB).
		buf := make([]byte, tlsTunnelBuf)
		_, err := io.CopyBuffer(dst, src, buf)
		return err
	}
	if !ok {
		return copyPooled(dst, src, sc)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		_, err := io.Copy(dst, src)
		return err
	}
	lr := &io.LimitedReader{R: src}
	for {
		var queued int
		var eof bool
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			// Bytes queued: one ioctl, no more syscalls than io.Copy's own loop.
			if queued, rerr = unix.IoctlGetInt(int(fd), platform.SIOCINQ); rerr != nil || queued > 0 {
				return true
			}
			// Nothing queued: nothing yet, or the end (a FIN queues no bytes).
			state, perr := fdutil.Peek(fd)
			switch state {
			case fdutil.PeekEmpty:
				return false // nothing yet: wait for the netpoller
			case fdutil.PeekError:
				rerr = perr
			case fdutil.PeekEOF:
				eof = true
			default:
				queued = 1 // arrived between the two calls
			}
			return true
		})
		switch {
		case err != nil:
			return err // a deadline (freeze, shutdown) or a closed connection
		case rerr != nil:
			return rerr
		case eof:
			return nil
		}
		lr.N = int64(max(queued, 1))
		if _, err := tc.ReadFrom(lr); err != nil {
			return err
		}
	}
}
