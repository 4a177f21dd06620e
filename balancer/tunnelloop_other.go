//go:build unix && !linux

package balancer

import (
	"net"

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
