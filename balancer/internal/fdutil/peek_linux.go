//go:build linux

package fdutil

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// peekByte is one recv of a byte with MSG_PEEK|MSG_DONTWAIT: a raw system call (it never
// blocks, so the runtime need not know), with no source address to decode — the edge
// probes every pooled connection per request with it, and unix.Recvfrom allocates.
func peekByte(fd uintptr) (int, error) {
	var b [1]byte
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
