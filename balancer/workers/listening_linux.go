//go:build linux

package workers

import (
	"encoding/binary"
	"net/netip"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// listeningTCP returns the host's listening TCP sockets (this network namespace): socket
// inode → local address. It asks the kernel through sock_diag netlink for listening
// sockets only, as `ss -lt` does, so its cost does not grow with the host's connections;
// where that is refused it reads /proc/net/tcp.
func listeningTCP() map[string]string {
	out := map[string]string{}
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagListening(family, out); err != nil {
			return listeningFromProc()
		}
	}
	return out
}

const (
	nlmsgHdrLen    = 16
	inetDiagReqLen = 56 // struct inet_diag_req_v2
	inetDiagMsgLen = 72 // struct inet_diag_msg
	tcpListen      = 10 // TCP_LISTEN in the kernel's TCP states
)

func diagListening(family uint8, out map[string]string) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	req := make([]byte, nlmsgHdrLen+inetDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1) // sequence
	req[16] = family
	req[17] = unix.IPPROTO_TCP
	ne.PutUint32(req[20:], 1<<tcpListen) // idiag_states
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 32<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				return syscall.EINVAL
			}
			d := m.Data
			if len(d) < inetDiagMsgLen || d[1] != tcpListen {
				continue
			}
			port := binary.BigEndian.Uint16(d[4:])
			var ip netip.Addr
			if d[0] == unix.AF_INET {
				ip = netip.AddrFrom4([4]byte(d[8:12]))
			} else {
				ip = netip.AddrFrom16([16]byte(d[8:24]))
			}
			inode := ne.Uint32(d[68:])
			out[strconv.FormatUint(uint64(inode), 10)] = netip.AddrPortFrom(ip, port).String()
		}
	}
}
