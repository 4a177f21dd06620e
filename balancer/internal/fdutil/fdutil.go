//go:build unix

// Package fdutil marks the descriptors of an edge image for or against the execve of
// the next one (the in-place edge upgrade). The edge and its worker supervisor share it.
package fdutil

import (
	"errors"
	"syscall"

	"github.com/stickyd/stickyd/fdpass/platform"
	"golang.org/x/sys/unix"
)

// ErrNoFD means a connection has no descriptor to hand over.
var ErrNoFD = errors.New("fdutil: connection has no descriptor")

// Inherit returns c's descriptor, marked to survive execve. The descriptor stays owned
// by c; nothing is duplicated, so nothing changes on the shared file description.
func Inherit(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, ErrNoFD
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var ferr error
	err = raw.Control(func(u uintptr) {
		fd = int(u)
		_, ferr = unix.FcntlInt(u, unix.F_SETFD, 0)
	})
	if err == nil {
		err = ferr
	}
	return fd, err
}

// CloseOnExec marks c's descriptor close-on-exec again (after a failed upgrade).
func CloseOnExec(c syscall.Conn) {
	if raw, err := c.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
}

// TemporaryAccept reports whether an accept error passes (out of descriptors or
// memory, an aborted connection): the caller backs off and accepts again instead of
// giving up or spinning.
func TemporaryAccept(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EINTR)
}

// What a socket holds, seen without consuming anything (Peek, WaitReadable).
const (
	PeekEmpty = iota // nothing to read yet
	PeekData         // at least one byte waits
	PeekEOF          // the peer closed (or shut down) its sending side
	PeekError        // the socket failed (reset, closed)
)

// Peek looks at fd with a one-byte MSG_PEEK|MSG_DONTWAIT: never blocks, consumes nothing.
func Peek(fd uintptr) (int, error) {
	for {
		n, err := platform.PeekByte(fd)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return PeekEmpty, nil
		case err != nil:
			return PeekError, err
		case n == 0:
			return PeekEOF, nil
		}
		return PeekData, nil
	}
}

// PeekConn is Peek on a connection's socket; a connection without one, or whose socket
// is gone, is PeekError.
func PeekConn(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return PeekError, ErrNoFD
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return PeekError, err
	}
	state, perr := PeekError, error(nil)
	if err := rc.Control(func(fd uintptr) { state, perr = Peek(fd) }); err != nil {
		return PeekError, err
	}
	return state, perr
}

// WaitReadable parks the goroutine on the runtime poller, holding no buffer, until rc
// has a byte to read, its peer closed, it failed, or its read deadline passed (then
// err is the deadline's error). The state is as Peek's, never PeekEmpty unless err.
func WaitReadable(rc syscall.RawConn) (state int, err error) {
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		state, perr = Peek(fd)
		return state != PeekEmpty // empty: wait for the poller
	})
	if err != nil {
		return PeekEmpty, err
	}
	return state, perr
}
