//go:build linux

package nodeipc

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// recvmsgNow is one non-blocking recvmsg on a socket in non-blocking mode. It is a raw
// system call: it never blocks, so the runtime need not know (a wrapped one wakes the
// runtime's monitor thread whenever the process was idle, which the channel's reader
// mostly is between a worker's writes).
func recvmsgNow(fd int, p, oob []byte) (n, oobn, flags int, err error) {
	var iov unix.Iovec
	if len(p) > 0 {
		iov.Base = &p[0]
		iov.SetLen(len(p))
	}
	var msg unix.Msghdr
	msg.Iov = &iov
	msg.Iovlen = 1
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	r, _, e := unix.RawSyscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_CMSG_CLOEXEC)
	if e != 0 {
		return 0, 0, 0, e
	}
	return int(r), int(msg.Controllen), int(msg.Flags), nil
}
