//go:build unix

package fdpass

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sockConn is a received socket served through an *os.File. net.FileConn would dup the
// descriptor, ask the kernel for its type and both addresses and close the original —
// about 34 µs per handoff on the benchmark machine, most of a direct accept's cost again.
// os.NewFile on a non-blocking descriptor registers it with the runtime poller as it is,
// so reads, writes and deadlines behave as on a *net.TCPConn; the addresses come from the
// edge's metadata, or from the kernel only when someone asks and the edge sent none.
//
// Errors are *net.OpError like a net.Conn's (net/http treats a read timeout as a quiet
// close only when the error is a net.Error; *os.PathError is not one), and a closed conn
// reports net.ErrClosed.
type sockConn struct {
	f             *os.File
	network       string         // "tcp" for client connections, "unix" for virtual ones
	local, remote netip.AddrPort // from the edge's metadata; zero when it sent none
	addrs         atomic.Pointer[[2]net.Addr]
	closed        atomic.Bool // Close was called: every later error is net.ErrClosed
}

// newSockConn takes ownership of fd, a connected stream socket received from the edge:
// on error fd is closed.
func newSockConn(fd int, m Meta) (*sockConn, error) {
	// The descriptor shares its file description with the edge's socket, which Go made
	// non-blocking; a sender that is not Go may not have, and os.NewFile leaves a blocking
	// descriptor out of the poller (deadlines would not work, reads would hold a thread).
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil && fl&unix.O_NONBLOCK == 0 {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fdpass: received descriptor: %w", err)
	}
	network := "tcp"
	if m.Kind == KindVirtual {
		network = "unix"
	}
	f := os.NewFile(uintptr(fd), "fdpass-"+network)
	return &sockConn{f: f, network: network, local: m.Local, remote: m.Remote}, nil
}

func (c *sockConn) Read(p []byte) (int, error) {
	n, err := c.f.Read(p)
	if err != nil && err != io.EOF {
		err = c.opErr("read", err)
	}
	return n, err
}

func (c *sockConn) Write(p []byte) (int, error) {
	n, err := c.f.Write(p)
	if err != nil {
		err = c.opErr("write", err)
	}
	return n, err
}

func (c *sockConn) Close() error {
	c.closed.Store(true)
	if err := c.f.Close(); err != nil {
		return c.opErr("close", err)
	}
	return nil
}

// CloseWrite shuts down the sending side (net/http half-closes before closing, so an
// error response is not lost to a reset).
func (c *sockConn) CloseWrite() error { return c.shutdown(unix.SHUT_WR) }

// CloseRead shuts down the receiving side.
func (c *sockConn) CloseRead() error { return c.shutdown(unix.SHUT_RD) }

func (c *sockConn) shutdown(how int) error {
	rc, err := c.f.SyscallConn()
	if err != nil {
		return c.opErr("close", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), how) }); err != nil {
		return c.opErr("close", err)
	}
	if serr != nil {
		return c.opErr("close", os.NewSyscallError("shutdown", serr))
	}
	return nil
}

func (c *sockConn) SetDeadline(t time.Time) error {
	if err := c.f.SetDeadline(t); err != nil {
		return c.opErr("set", err)
	}
	return nil
}

func (c *sockConn) SetReadDeadline(t time.Time) error {
	if err := c.f.SetReadDeadline(t); err != nil {
		return c.opErr("set", err)
	}
	return nil
}

func (c *sockConn) SetWriteDeadline(t time.Time) error {
	if err := c.f.SetWriteDeadline(t); err != nil {
		return c.opErr("set", err)
	}
	return nil
}

// SetNoDelay is *net.TCPConn's, for code that asserted that type on an accepted conn
// before (the edge's socket already has TCP_NODELAY, as Go sets it on accept).
func (c *sockConn) SetNoDelay(noDelay bool) error {
	return c.setsockopt(unix.IPPROTO_TCP, unix.TCP_NODELAY, noDelay)
}

// SetKeepAlive is *net.TCPConn's (the edge's socket already has Go's default keep-alive).
func (c *sockConn) SetKeepAlive(keepalive bool) error {
	return c.setsockopt(unix.SOL_SOCKET, unix.SO_KEEPALIVE, keepalive)
}

func (c *sockConn) setsockopt(level, opt int, on bool) error {
	v := 0
	if on {
		v = 1
	}
	rc, err := c.f.SyscallConn()
	if err != nil {
		return c.opErr("set", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, v) }); err != nil {
		return c.opErr("set", err)
	}
	if serr != nil {
		return c.opErr("set", os.NewSyscallError("setsockopt", serr))
	}
	return nil
}

// SyscallConn gives raw access to the socket, as *net.TCPConn's does.
func (c *sockConn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }

// LocalAddr is the address the client connected to: from the edge's metadata; EdgeAddr
// for a virtual connection; else the socket's own (asked of the kernel once).
func (c *sockConn) LocalAddr() net.Addr {
	if c.local.IsValid() {
		return net.TCPAddrFromAddrPort(c.local)
	}
	if c.network == "unix" {
		return EdgeAddr{} // a virtual connection: what ClientAddr looks for
	}
	return c.sysAddrs()[0]
}

// RemoteAddr is the client's address: from the edge's metadata, else the socket's peer.
func (c *sockConn) RemoteAddr() net.Addr {
	if c.remote.IsValid() {
		return net.TCPAddrFromAddrPort(c.remote)
	}
	return c.sysAddrs()[1]
}

func (c *sockConn) sysAddrs() *[2]net.Addr {
	if a := c.addrs.Load(); a != nil {
		return a
	}
	a := new([2]net.Addr)
	if rc, err := c.f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if sa, err := unix.Getsockname(int(fd)); err == nil {
				a[0] = sockaddrToAddr(sa)
			}
			if sa, err := unix.Getpeername(int(fd)); err == nil {
				a[1] = sockaddrToAddr(sa)
			}
		})
	}
	// A closed socket has no addresses; like net's, the answer is then a nil Addr, and
	// only a successful look-up is kept.
	if a[0] != nil || a[1] != nil {
		c.addrs.CompareAndSwap(nil, a)
	}
	return a
}

func sockaddrToAddr(sa unix.Sockaddr) net.Addr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]).To16(), Port: sa.Port}
	case *unix.SockaddrInet6:
		ip := make(net.IP, net.IPv6len)
		copy(ip, sa.Addr[:])
		return &net.TCPAddr{IP: ip, Port: sa.Port}
	case *unix.SockaddrUnix:
		return &net.UnixAddr{Name: sa.Name, Net: "unix"}
	}
	return nil
}

// opErr turns an *os.File error into the *net.OpError a net.Conn returns.
func (c *sockConn) opErr(op string, err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	// The os package reports a closed file two ways (os.ErrClosed, and poll's "use of
	// closed file" from the deadline setters); a net.Conn says net.ErrClosed.
	if c.closed.Load() || errors.Is(err, os.ErrClosed) {
		err = net.ErrClosed
	}
	oe := &net.OpError{Op: op, Net: c.network, Err: err}
	if op != "close" && op != "set" {
		// Addresses only where net puts them, and only from what is at hand: an error
		// path must not make system calls of its own.
		if c.local.IsValid() {
			oe.Source = net.TCPAddrFromAddrPort(c.local)
		}
		if c.remote.IsValid() {
			oe.Addr = net.TCPAddrFromAddrPort(c.remote)
		}
	}
	return oe
}
