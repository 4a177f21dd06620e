//go:build unix && !linux

package nodeipc

import "golang.org/x/sys/unix"

// recvmsgNow is one recvmsg on a socket in non-blocking mode.
func recvmsgNow(fd int, p, oob []byte) (n, oobn, flags int, err error) {
	n, oobn, flags, _, err = unix.Recvmsg(fd, p, oob, 0)
	return n, oobn, flags, err
}
