//go:build unix && !linux

package balancer

import "net"

// tunnelInLoop: the event loop is Linux-only (epoll); elsewhere every tunnel keeps its two
// goroutines (tunnel.go).
func (b *Balancer) tunnelInLoop(cc *clientConn, c, vc net.Conn, closed func()) bool {
	return false
}
