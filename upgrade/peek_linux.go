package upgrade

import (
	"syscall"
	"unsafe"
)

const (
	pollERR   = 0x8
	pollHUP   = 0x10
	pollRDHUP = 0x2000
)

type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

// peerShutdown reports whether the peer has shut down its writing side
// (POLLRDHUP), without blocking.
func peerShutdown(fd uintptr) shutState {
	var ts syscall.Timespec // zero: do not wait
	for {
		p := pollFd{fd: int32(fd), events: pollRDHUP}
		r, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1,
			uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			return shutUnknown
		case r == 1 && p.revents&(pollRDHUP|pollHUP|pollERR) != 0:
			return shutYes
		}
		return shutNo
	}
}
