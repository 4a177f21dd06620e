//go:build unix

package upgrade

import (
	"errors"
	"io"
	"os"
	"syscall"
)

// Peek waits until the connection's receive queue holds a complete request
// head and returns it parsed, with the number of bytes peeked into buf.
//
// It calls recvfrom(MSG_PEEK) inside rc.Read, so nothing is consumed: a later
// Read (or the worker that receives the fd) sees the same bytes. len(buf) is
// the size cap: no head end within len(buf) bytes is a 431 *Error. The read
// deadline already set on the conn is honoured: when it passes, Peek returns
// an *Error{408, Err: ErrTimeout}. A client that closes before sending
// anything gives io.EOF; one that closes in the middle of a head gives
// io.ErrUnexpectedEOF as soon as its FIN arrives (not at the deadline).
// Rejected heads are returned as *Error values as from Parse; ErrTLS is
// returned as soon as the first two bytes arrive.
//
// The returned Head owns its memory; PeekInto is the non-copying variant.
func Peek(rc syscall.RawConn, buf []byte) (Head, int, error) {
	var arr [16]Field
	h := Head{Fields: arr[:0]}
	n, err := PeekInto(rc, &h, buf)
	if err != nil {
		return Head{}, n, err
	}
	return h.Clone(), n, nil
}

// PeekInto is Peek filling *h like ParseInto: the strings in *h alias buf,
// so h is valid only while buf[:h.Size] is unchanged (do not return buf to a
// pool while h is in use; h.Clone() keeps it).
func PeekInto(rc syscall.RawConn, h *Head, buf []byte) (int, error) {
	if len(buf) == 0 {
		return 0, errTooLarge
	}
	p := peeker{h: h, buf: buf}
	if err := rc.Read(p.try); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return p.n, errTimeout
		}
		return p.n, err
	}
	return p.n, p.err
}

type peeker struct {
	h         *Head
	buf       []byte
	n, prev   int
	err       error
	finalPeek bool // the peer has shut down writing: the queue is final
}

// try is the RawConn.Read callback: true means done (result in p.err),
// false means wait for the poller to report readability.
//
// The Go poller is edge-triggered: it wakes on new data, on the peer's FIN
// (EPOLLRDHUP) and on errors, never again for bytes already queued. A peek
// of a partial head returns the same bytes forever, so a FIN after a
// partial head would otherwise only be noticed at the deadline. Whenever a
// peek finds an incomplete head, try therefore asks ppoll(POLLRDHUP) whether
// the peer has shut down; if so it peeks once more (all data sent before the
// FIN is queued by then) and reports io.ErrUnexpectedEOF if the head is
// still incomplete. Otherwise it waits; any later data or FIN is a new
// event, so no wake-up is lost. A wake-up without new bytes (a readiness
// event that raced with the previous peek) just waits again; it cannot spin
// because every wake-up needs a new event.
func (p *peeker) try(fd uintptr) bool {
	for {
		m, _, e := syscall.Recvfrom(int(fd), p.buf, syscall.MSG_PEEK)
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN:
			return false
		case e != nil:
			p.err = os.NewSyscallError("recvfrom", e)
			return true
		case m == 0:
			p.n = 0
			p.err = io.EOF
			if p.prev > 0 {
				p.err = io.ErrUnexpectedEOF
			}
			return true
		}
		p.n = m
		p.err = ParseInto(p.h, p.buf[:m], len(p.buf))
		if p.err != ErrIncomplete {
			return true
		}
		if p.finalPeek {
			p.err = io.ErrUnexpectedEOF
			return true
		}
		switch peerShutdown(fd) {
		case shutYes:
			p.finalPeek = true
			continue
		case shutUnknown:
			// No way to ask: a wake-up that brought no new bytes is
			// taken as the peer's FIN.
			if m == p.prev {
				p.err = io.ErrUnexpectedEOF
				return true
			}
		}
		p.prev = m
		return false
	}
}

type shutState int

const (
	shutNo shutState = iota
	shutYes
	shutUnknown
)
