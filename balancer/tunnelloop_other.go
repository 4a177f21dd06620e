//go:build unix && !linux

package balancer

import (
	"net"
	"net/netip"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/upgrade"
)

// tunnelInLoop: the event loop is Linux-only (epoll); elsewhere every tunnel keeps its two
// goroutines (tunnel.go).
func (b *Balancer) tunnelInLoop(cc *clientConn, c, vc net.Conn, closed func()) bool {
	return false
}

func (b *Balancer) tunnelDialInLoop(cc *clientConn, w *workers.Worker, h *upgrade.Head, consumed []byte) (bool, error) {
	return false, nil
}

// fastTunnel: no event loop, no fast tunnel; the general path tunnels.
func (b *Balancer) fastTunnel(nfd int, peer, local netip.AddrPort, h *upgrade.Head, raw []byte, r *route) bool {
	return false
}
