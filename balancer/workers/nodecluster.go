//go:build unix

package workers

import (
	"sync"

	"github.com/stickyd/stickyd/fdpass/nodeipc"
	"github.com/stickyd/stickyd/metrics"
)

// nodeCluster is what the Node workers of a Supervisor share as their cluster primary
// beyond connections: the @socket.io/cluster-adapter relay (what the adapter's
// setupPrimary() does in a Node primary) and the WebSocket counts their preload reports.
type nodeCluster struct {
	once  sync.Once
	relay *nodeipc.Relay
}

// joinNodeCluster wires a Node worker's Primary, before its Run starts: its cluster-adapter
// messages are relayed to and from the other workers, and its WebSocket count goes to
// stickyd_websockets{worker}.
func (s *Supervisor) joinNodeCluster(slot int, p *nodeipc.Primary) {
	c := &s.cluster
	if s.parent != nil {
		// The pools of one app are one socket.io cluster: broadcasts reach every pool.
		c = &s.parent.cluster
	}
	c.once.Do(func() {
		cm := s.Edge.WorkerSettings().Metrics.ClusterMessages
		relayed := cm.WithLabelValues(metrics.ClusterRelayed)
		dropped := cm.WithLabelValues(metrics.ClusterDropped)
		c.relay = &nodeipc.Relay{Stats: func(r, d int) {
			if r > 0 {
				relayed.Add(float64(r))
			}
			if d > 0 {
				dropped.Add(float64(d))
			}
		}}
	})
	p.Relay = c.relay
	gauge := s.Edge.WorkerSettings().Metrics.WebSockets.WithLabelValues(metrics.WorkerLabel(slot))
	gauge.Set(float64(p.WebSockets())) // a resumed worker's last count
	p.OnWebSockets = func(n int64) { gauge.Set(float64(n)) }
}

// WebSockets is the count the worker's preload last reported.
func (n *nodeChannel) WebSockets() int64 { return n.p.WebSockets() }
