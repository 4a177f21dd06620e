//go:build unix

package fdpass

import (
	"encoding/binary"
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// acceptInto is recvInto for the worker's accept loop: the received socket becomes a
// sockConn instead of going through net.FileConn, and the usual control message (one
// SCM_RIGHTS with one descriptor) is read in place. Every descriptor the kernel delivered
// is closed on every error path. b has recvBufSize bytes.
func acceptInto(uc *net.UnixConn, b []byte) (net.Conn, Meta, error) {
	buf, oob := b[:MaxMessage+1], b[MaxMessage+1:]
	// On Linux (and the BSDs) ReadMsgUnix passes MSG_CMSG_CLOEXEC: the descriptor arrives
	// close-on-exec, so a worker's children never inherit a client socket.
	n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
	var one [1]int
	fds, perr := oneRight(oob[:oobn], one[:0])
	if perr != nil || fds == nil && oobn > 0 {
		fds, perr = parseRights(oob[:oobn])
	}
	fd, m, err := received(buf, n, flags, fds, err, perr)
	if fd < 0 {
		return nil, m, err
	}
	c, err := newSockConn(fd, m)
	if err != nil {
		return nil, m, err
	}
	return newConn(c, m), m, nil
}

// oneRight reads the control data of a handoff — exactly one SCM_RIGHTS message with one
// descriptor — without the allocations of unix.ParseSocketControlMessage. It returns nil
// (and no error) for anything else, which the general parser then reads.
func oneRight(oob []byte, dst []int) ([]int, error) {
	if len(oob) != unix.CmsgSpace(4) && len(oob) != unix.CmsgLen(4) {
		return nil, nil
	}
	// The buffer need not be aligned for a Cmsghdr: copy the header out.
	var h unix.Cmsghdr
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&h)), unix.SizeofCmsghdr), oob)
	if h.Level != unix.SOL_SOCKET || h.Type != unix.SCM_RIGHTS || uint64(h.Len) != uint64(unix.CmsgLen(4)) {
		return nil, nil
	}
	fd := int32(binary.NativeEndian.Uint32(oob[unix.CmsgLen(0):]))
	return append(dst, int(fd)), nil
}
