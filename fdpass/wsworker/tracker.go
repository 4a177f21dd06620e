// Package wsworker is the WebSocket side of a Go worker behind stickyd: it tracks the
// WebSockets a worker serves (so shutdown closes them with 1001 and the edge hears how
// many are open) and has the echo loop of the demo and bench workers. It is apart from
// package fdpass so that the edge, which links fdpass, does not link gorilla/websocket.
package wsworker

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Tracker tracks upgraded WebSockets of a worker so that shutdown can close
// them with close code 1001 (going away): http.Server.Shutdown does not touch
// hijacked connections. The zero value is ready to use; a Tracker is safe for
// concurrent use and must not be copied after first use.
//
// Typical use in a handler:
//
//	c, err := upgrader.Upgrade(w, r, nil)
//	if err != nil {
//		return
//	}
//	defer c.Close()
//	defer tracker.Add(c)()
//	for { ... c.ReadMessage() ... } // returns once the close handshake ends
//
// and srv.RegisterOnShutdown(tracker.GoingAway).
type Tracker struct {
	mu       sync.Mutex
	conns    map[*websocket.Conn]struct{}
	idle     chan struct{} // closed when conns becomes empty; nil unless someone waits
	shutdown bool
}

// closeWriteTimeout bounds the write of each 1001 Close frame.
const closeWriteTimeout = time.Second

// Add tracks c until the returned done is called (done is idempotent). Call
// done when the handler is finished with c, typically deferred. If the
// tracker is shutting down, c is sent the 1001 Close frame right away.
func (t *Tracker) Add(c *websocket.Conn) (done func()) {
	t.mu.Lock()
	if t.conns == nil {
		t.conns = make(map[*websocket.Conn]struct{})
	}
	t.conns[c] = struct{}{}
	shutting := t.shutdown
	t.mu.Unlock()
	if shutting {
		sendGoingAway(c)
	}
	var once sync.Once
	return func() { once.Do(func() { t.remove(c) }) }
}

func (t *Tracker) remove(c *websocket.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.conns, c)
	if len(t.conns) == 0 && t.idle != nil {
		close(t.idle)
		t.idle = nil
	}
}

// Len returns the number of tracked connections.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// Shutdown sends a Close frame with code 1001 "going away" to every tracked
// connection (WriteControl with a short deadline, concurrently), then waits
// until their done functions have run or ctx ends. When ctx ends first it
// closes the remaining connections' network connections and returns
// ctx.Err(); otherwise it returns nil. Connections added during Shutdown are
// sent the Close frame too.
func (t *Tracker) Shutdown(ctx context.Context) error {
	t.mu.Lock()
	t.shutdown = true
	if len(t.conns) == 0 {
		t.mu.Unlock()
		return nil
	}
	if t.idle == nil {
		t.idle = make(chan struct{})
	}
	idle := t.idle
	conns := make([]*websocket.Conn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()

	for _, c := range conns {
		go sendGoingAway(c)
	}
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
	}
	t.mu.Lock()
	for c := range t.conns {
		c.Close() // the handler's read fails, it returns and calls done
	}
	t.mu.Unlock()
	return ctx.Err()
}

// GoingAway is Shutdown with a 5 s budget, suitable for
// http.Server.RegisterOnShutdown.
func (t *Tracker) GoingAway() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	t.Shutdown(ctx)
}

// sendGoingAway writes the 1001 Close frame; a conn that cannot take it is
// closed at once, as it will never finish the close handshake.
func sendGoingAway(c *websocket.Conn) {
	msg := websocket.FormatCloseMessage(websocket.CloseGoingAway, "going away")
	err := c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(closeWriteTimeout))
	if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
		c.Close()
	}
}

// Echo serves the echo protocol of stickyd's demo and benchmark workers on c: first hello
// as a text message, then every message back to its sender with the same type. A peer
// silent (no message, no pong) for idle is dropped; messages are capped at 1 MiB.
func Echo(c *websocket.Conn, hello []byte, idle time.Duration) {
	c.SetReadLimit(1 << 20)
	c.SetReadDeadline(time.Now().Add(idle))
	c.SetPongHandler(func(string) error { return c.SetReadDeadline(time.Now().Add(idle)) })
	if err := c.WriteMessage(websocket.TextMessage, hello); err != nil {
		return
	}
	for {
		typ, msg, err := c.ReadMessage()
		if err != nil {
			return
		}
		c.SetReadDeadline(time.Now().Add(idle))
		if err := c.WriteMessage(typ, msg); err != nil {
			return
		}
	}
}
