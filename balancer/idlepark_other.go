//go:build unix && !linux

package balancer

import "net"

// idlePark is Linux-only (epoll); elsewhere an idle keep-alive connection waits in its
// goroutine.
type idlePark struct{}

func (b *Balancer) parkIdle(*clientConn) bool { return false }
func (b *Balancer) canParkIdle(net.Conn) bool { return false }
func (b *Balancer) wakeParked()               {}
func (b *Balancer) parkedIdleConns() int      { return 0 }
