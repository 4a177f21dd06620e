//go:build darwin || freebsd

package platform

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Handoff reports whether this system can hand accepted connections to worker
// processes (SCM_RIGHTS with Linux's socket options): the run, serve and demo modes.
const Handoff = false

// PollRDHUP is 0: there is no POLLRDHUP; poll reports a peer's close as POLLHUP, or only
// as readable. Its one user (fdpass's hang-up watch) serves the Linux-only modes.
const PollRDHUP = 0

// SIOCINQ is the ioctl for the bytes queued to read on a socket: FIONREAD,
// _IOR('f', 127, int), the same number on macOS and FreeBSD (x/sys/unix does not name it).
const SIOCINQ = 0x4004667f

// Socketpair returns a connected pair of AF_UNIX sockets of type typ, close-on-exec.
func Socketpair(typ int) ([2]int, error) {
	return socketpairForkLock(typ)
}

// Accept accepts a connection on the listening socket fd, close-on-exec and
// non-blocking.
func Accept(fd int) (int, unix.Sockaddr, error) {
	return acceptForkLock(fd)
}

// SetDeferAccept does nothing: macOS has no deferred accept and FreeBSD's (the
// accf_data accept filter) is a kernel module that is not loaded by default. A client
// that connects and sends nothing costs an accept; the head timeout closes it.
func SetDeferAccept(fd int) error {
	return nil
}

// AnonFile returns a descriptor of an anonymous file that survives execve (an unlinked
// temporary file: there is no memfd).
func AnonFile(name string) (int, error) {
	return anonFileUnlinked(name)
}

// PeerCred is not implemented off Linux: its one user, the sidecar control socket of
// stickyd serve, is Linux-only.
func PeerCred(fd int) (uid, pid int, err error) {
	return 0, 0, fmt.Errorf("peer credentials of a unix socket: %w", ErrUnsupported)
}

// RecvmsgNow is one recvmsg on a socket in non-blocking mode.
func RecvmsgNow(fd int, p, oob []byte) (n, oobn, flags int, err error) {
	n, oobn, flags, _, err = unix.Recvmsg(fd, p, oob, 0)
	return n, oobn, flags, err
}

// PeekByte is one recv of a byte with MSG_PEEK|MSG_DONTWAIT.
func PeekByte(fd uintptr) (int, error) {
	var b [1]byte
	n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	return n, err
}
