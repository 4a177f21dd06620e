// Package fdutil marks the descriptors of an edge image for or against the execve of
// the next one (the in-place edge upgrade). The edge and its worker supervisor share it.
package fdutil

import (
	"errors"
	"syscall"

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
