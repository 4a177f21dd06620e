package platform

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Handoff reports whether this system can hand accepted connections to worker
// processes (SCM_RIGHTS with Linux's socket options): the run, serve and demo modes.
const Handoff = true

// PollRDHUP is the poll event for "the peer shut its side down" (POLLRDHUP).
const PollRDHUP = unix.POLLRDHUP

// SIOCINQ is the ioctl for the bytes queued to read on a socket.
const SIOCINQ = unix.SIOCINQ

// TCPKeepIdle is the TCP option for the idle seconds before the first keep-alive probe.
const TCPKeepIdle = unix.TCP_KEEPIDLE

// Socketpair returns a connected pair of AF_UNIX sockets of type typ, close-on-exec.
func Socketpair(typ int) ([2]int, error) {
	return unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
}

// Accept accepts a connection on the listening socket fd, close-on-exec and
// non-blocking.
func Accept(fd int) (int, unix.Sockaddr, error) {
	return unix.Accept4(fd, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
}

// SetDeferAccept makes the listening socket fd wake accept only once a client has sent
// data (TCP_DEFER_ACCEPT).
func SetDeferAccept(fd int) error {
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 1)
}

// AnonFile returns a descriptor of an anonymous file that survives execve (memfd).
func AnonFile(name string) (int, error) {
	return unix.MemfdCreate(name, 0)
}

// PeerCred returns the user and process id of the peer of the AF_UNIX socket fd
// (SO_PEERCRED).
func PeerCred(fd int) (uid, pid int, err error) {
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return 0, 0, err
	}
	return int(cred.Uid), int(cred.Pid), nil
}

// RecvmsgNow is one recvmsg on a socket in non-blocking mode (received descriptors
// close-on-exec). A raw system call: it never blocks, so the runtime need not know (a
// wrapped one wakes the runtime's monitor thread whenever the process was idle).
func RecvmsgNow(fd int, p, oob []byte) (n, oobn, flags int, err error) {
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

// PeekByte is one recv of a byte with MSG_PEEK|MSG_DONTWAIT: a raw system call, with no
// source address to decode (unix.Recvfrom allocates one).
func PeekByte(fd uintptr) (int, error) {
	var b [1]byte
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
