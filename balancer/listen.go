//go:build unix

package balancer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

// ListenConfig is how the edge binds its client-facing sockets.
type ListenConfig struct {
	// DeferAccept sets TCP_DEFER_ACCEPT so accept returns only once the request head has
	// started to arrive; the peek that follows then rarely has to park. Linux only: off
	// Linux it does nothing (platform.SetDeferAccept).
	DeferAccept bool
}

// Listen binds addr for clients. A host name binds every address it resolves to
// (localhost: 127.0.0.1 and ::1); an empty host binds both families. If any of them is
// taken, Listen closes what it bound and fails naming that address: with no SO_REUSEPORT
// a stale or second instance can never silently take part of the traffic.
func (lc ListenConfig) Listen(ctx context.Context, addr string) ([]net.Listener, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: want host:port, :port or [v6]:port: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		if p, lerr := net.DefaultResolver.LookupPort(ctx, "tcp", portStr); lerr == nil {
			port = uint64(p)
		} else {
			return nil, fmt.Errorf("listen address %q: bad port %q", addr, portStr)
		}
	}
	var addrs []netip.Addr
	switch ip, perr := netip.ParseAddr(host); {
	case host == "":
		addrs = []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}
	case perr == nil:
		addrs = []netip.Addr{ip}
	case strings.EqualFold(strings.TrimSuffix(host, "."), "localhost"):
		// RFC 6761 §6.3: localhost is the loopback, whatever /etc/hosts lists (many
		// container images map it to 127.0.0.1 only). An IPv6-less host skips ::1 below.
		addrs = []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}
	default:
		addrs, err = net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: resolve %s: %w", addr, host, err)
		}
		addrs = dedupAddrs(addrs)
		// IPv4 first: with port 0 the first bind picks the port, and the kernel's pick
		// avoids ports that IPv4 connections (busier on most hosts) hold.
		slices.SortStableFunc(addrs, func(a, b netip.Addr) int {
			if a.Is4() == b.Is4() {
				return 0
			}
			if a.Is4() {
				return -1
			}
			return 1
		})
	}
	nlc := net.ListenConfig{
		// Skip the per-connection keepalive setsockopt: handed-off connections get the
		// worker's settings, proxied ones are bounded by the edge's idle timeout.
		KeepAlive: -1,
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if network == "tcp6" && address != "" {
					// Each family gets its own socket, so [::] must not also claim IPv4.
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
				}
				if serr == nil && lc.DeferAccept {
					serr = platform.SetDeferAccept(int(fd))
				}
				// Accepted sockets inherit these from the listener, so neither the edge
				// nor a worker spends system calls on them per connection (Go's defaults
				// for accepted TCP connections: no Nagle, keep-alive probes after 15 s).
				for _, o := range [][3]int{
					{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
					{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
					{unix.IPPROTO_TCP, platform.TCPKeepIdle, 15},
					{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
				} {
					if serr == nil {
						serr = unix.SetsockoptInt(int(fd), o[0], o[1], o[2])
					}
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	// With port 0 the first socket picks the port and the others must get the same one;
	// another process may hold it on their address, so try a few fresh ports.
	for try := 0; ; try++ {
		lns, err := lc.bindAll(ctx, nlc, addrs, host, uint16(port))
		if err == nil || port != 0 || try == 8 || !errors.Is(err, syscall.EADDRINUSE) {
			return lns, err
		}
	}
}

func (lc ListenConfig) bindAll(ctx context.Context, nlc net.ListenConfig, addrs []netip.Addr, host string, port uint16) ([]net.Listener, error) {
	var lns []net.Listener
	for _, a := range addrs {
		network := "tcp4"
		if a.Is6() && !a.Is4In6() {
			network = "tcp6"
		}
		ln, err := nlc.Listen(ctx, network, netip.AddrPortFrom(a, port).String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			hint := ""
			if errors.Is(err, syscall.EADDRINUSE) {
				hint = " (another process, perhaps an earlier stickyd, holds it; stop it or choose another -listen)"
			}
			if errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) {
				if a.Is6() && (host == "" || a.IsLoopback()) {
					continue // no IPv6 on this host: the IPv4 socket still serves
				}
			}
			return nil, fmt.Errorf("listen on %s: %w%s", netip.AddrPortFrom(a, port), err, hint)
		}
		lns = append(lns, ln)
		if port == 0 {
			// The other families must share the port the kernel picked for the first.
			port = uint16(ln.Addr().(*net.TCPAddr).Port)
		}
	}
	return lns, nil
}

func dedupAddrs(in []netip.Addr) []netip.Addr {
	out := in[:0]
	seen := map[netip.Addr]bool{}
	for _, a := range in {
		a = a.Unmap()
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}
