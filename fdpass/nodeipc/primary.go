//go:build unix

package nodeipc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	// ErrRejected: a cluster worker answered newconn with accepted:false (its server is closed
	// or at maxConnections). The worker closed its copy; the caller may retry elsewhere.
	ErrRejected = errors.New("nodeipc: worker rejected the connection")
	// ErrNotReady: Deliver before the worker's style is known (wait for Ready) or after its app
	// server closed.
	ErrNotReady = errors.New("nodeipc: worker not ready for connections")
)

// Style is how a worker takes connections.
type Style int32

const (
	StyleUnknown Style = iota
	StyleListen        // the app called server.listen(port): cluster newconn on its key
	StyleSticky        // @socket.io/sticky setupWorker(io): sticky:connection with the socket
)

func (s Style) String() string {
	switch s {
	case StyleListen:
		return "listen"
	case StyleSticky:
		return "sticky"
	}
	return "unknown"
}

// EventKind tells what an Event reports.
type EventKind int

const (
	EventOnline              EventKind = iota // the worker's cluster module is up
	EventListening                            // the app server is listening (Ready)
	EventServerListening                      // another server of the app listens (Address, Port)
	EventStickyReady                          // @socket.io/sticky's setupWorker handler is installed (Ready)
	EventStickyConnection                     // @socket.io/sticky reported an engine.io session (SID)
	EventStickyDisconnection                  // @socket.io/sticky reported a closed session (SID)
	EventDisconnect                           // the worker is leaving (exitedAfterDisconnect) or the channel closed
	EventMessage                              // any other message from the app (Message)
)

// Event is a best-effort notification from Primary.Run.
type Event struct {
	Kind    EventKind
	SID     string // EventStickyConnection / EventStickyDisconnection
	Address string // EventListening / EventServerListening ("" for any)
	Port    int
	Message Message
}

// QueryServer is a worker's request to listen (Node's cluster "queryServer").
type QueryServer struct {
	Address     string // "" when the app gave no host
	Port        int
	AddressType int  // 4, 6, -1 (unix path); 0 for anything else (e.g. "udp4")
	FD          *int // listen({fd}) — not supported for shared servers
	Index       int
	Seq         int
	Key         string // Node's handle key: address:port:addressType:fd:index
	Raw         json.RawMessage
}

// Primary emulates Node's cluster primary for one worker on top of a Channel.
type Primary struct {
	Channel *Channel
	// OnQueryServer decides, for each server the app listens on, whether it is the "app
	// server" that receives the edge's traffic. Other servers are bound by Shared and served
	// by the workers directly. nil: the first server wins. Not consulted once a worker has an
	// app server or is a @socket.io/sticky worker.
	OnQueryServer func(q QueryServer) (appServer bool)
	// Shared binds the other servers; share one between the workers of an app. nil: the
	// Primary uses its own, closed when Run returns.
	Shared *SharedListeners
	Logger *slog.Logger
	// Relay, if set, forwards the worker's @socket.io/cluster-adapter messages to the other
	// workers that use the same Relay, and theirs to it, from Run's start until it returns.
	Relay *Relay
	// OnWebSockets, if set, is called (from Run) with each WebSocket count the preload
	// reports; see WebSockets.
	OnWebSockets func(n int64)

	initOnce      sync.Once
	readyOnce     sync.Once
	ready         chan struct{}
	events        chan Event
	runDone       chan struct{}
	wake          chan struct{} // capacity 1: Detach asks Run to pause between messages
	seq           atomic.Int64
	style         atomic.Int32
	ws            atomic.Int64 // WebSockets the preload last reported
	unknownLogged atomic.Bool  // a message nobody acts on was logged (once)
	relay         *relayMember // (Run's goroutine) this worker in Relay

	mu           sync.Mutex
	appKey       string // Node key of the app server ("" when none)
	appListening bool
	pending      map[int]chan bool
	started      bool           // Run was called
	detached     bool           // Detach succeeded
	detachReq    *detachRequest // waiting for Run to pause
	ownShared    *SharedListeners
	adoptedOwn   *SharedListeners // own shared listeners handed over (ResumePrimary)
}

func (p *Primary) init() {
	p.initOnce.Do(func() {
		p.ready = make(chan struct{})
		p.events = make(chan Event, 256)
		p.runDone = make(chan struct{})
		p.wake = make(chan struct{}, 1)
		p.pending = make(map[int]chan bool)
		if p.Channel != nil {
			// The reader wakes the Deliver waiting for a newconn answer itself (no hop
			// through the queue and Run, no JSON decoding of the answer).
			p.Channel.onNewconnReply(p.completeNewconn)
		}
		if p.Logger == nil {
			if p.Channel != nil {
				p.Logger = p.Channel.log
			} else {
				p.Logger = slog.Default()
			}
		}
	})
}

// Ready is closed once the worker can take connections: its app server is listening (the
// queryServer was answered and its "listening" message arrived), or it is a @socket.io/sticky
// worker (the preload reported setupWorker's handler).
func (p *Primary) Ready() <-chan struct{} {
	p.init()
	return p.ready
}

// Style reports how the worker takes connections.
func (p *Primary) Style() Style { return Style(p.style.Load()) }

// Events returns best-effort notifications; events are dropped when nobody reads.
func (p *Primary) Events() <-chan Event {
	p.init()
	return p.events
}

func (p *Primary) emit(e Event) {
	select {
	case p.events <- e:
	default:
	}
}

func (p *Primary) setReady() { p.readyOnce.Do(func() { close(p.ready) }) }

func (p *Primary) nextSeq() int { return int(p.seq.Add(1) - 1) }

// Run reads messages until the channel closes, answering queryServer, tracking
// online/listening/close/exitedAfterDisconnect, acks of newconn and @socket.io/sticky reports.
// It returns nil when the child went away or the channel was closed, ctx.Err() when ctx ends
// first (the channel stays open), ErrDetached after Detach, or the error that broke the
// channel. Call it once.
func (p *Primary) Run(ctx context.Context) error {
	p.init()
	p.mu.Lock()
	if p.started {
		p.mu.Unlock()
		return errors.New("nodeipc: Primary.Run called twice")
	}
	p.started = true
	detached := p.detached
	adopted := p.adoptedOwn
	p.adoptedOwn = nil
	p.mu.Unlock()
	defer close(p.runDone)
	if detached {
		return ErrDetached
	}
	if p.Relay != nil {
		p.relay = p.Relay.join(p.Channel, p.Logger)
		gone := true
		defer func() { p.relay.leave(gone) }()
		// Detach or ctx: the worker lives on, so the others must not hear it closed.
		defer func() {
			if p.Channel.Err() == nil || errors.Is(p.Channel.Err(), ErrDetached) {
				gone = false
			}
		}()
	}
	if p.Shared == nil {
		if adopted != nil {
			p.Shared = adopted
		} else {
			p.Shared = new(SharedListeners)
		}
		p.mu.Lock()
		p.ownShared = p.Shared
		p.mu.Unlock()
		defer p.Shared.Close()
	} else if adopted != nil {
		// The caller chose its own SharedListeners for the resumed worker; the sockets the
		// previous Primary owned stay open in the worker.
		adopted.Close()
	}
	for {
		// A Detach request is served between two messages even while more keep arriving.
		select {
		case <-p.wake:
			if p.servePause() {
				return ErrDetached
			}
		default:
		}
		m, err := p.Channel.recv(ctx.Done(), p.wake)
		if err == errWake {
			if p.servePause() {
				return ErrDetached
			}
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			p.emit(Event{Kind: EventDisconnect})
			if err == io.EOF || err == ErrClosed {
				return nil
			}
			return err
		}
		p.handle(ctx, m)
	}
}

func (p *Primary) handle(ctx context.Context, m Message) {
	switch {
	case m.Cmd == "NODE_CLUSTER":
		p.handleCluster(ctx, m)
	case m.Cmd == "STICKYD" && m.Act == "sticky-ready":
		if p.style.CompareAndSwap(int32(StyleUnknown), int32(StyleSticky)) {
			p.Logger.Debug("nodeipc: @socket.io/sticky worker ready")
		}
		if p.Style() == StyleSticky {
			p.setReady()
			p.emit(Event{Kind: EventStickyReady, Message: m})
		}
	case m.Cmd == "STICKYD" && m.Act == "websockets":
		p.websocketsReport(m)
	case m.Type == "sticky:connection":
		p.emit(Event{Kind: EventStickyConnection, SID: m.Data, Message: m})
	case m.Type == "sticky:disconnection":
		p.emit(Event{Kind: EventStickyDisconnection, SID: m.Data, Message: m})
	default:
		if p.relay != nil && p.relay.handle(m.Raw) {
			return
		}
		if p.Relay != nil && p.unknownLogged.CompareAndSwap(false, true) {
			// Under stickyd nobody runs the app's own primary code: say so once per worker.
			p.Logger.Info("nodeipc: the worker sent a message to its cluster primary that stickyd does not act on "+
				"(it relays @socket.io/cluster-adapter and serves @socket.io/sticky; code of the app's own primary does not run under stickyd)",
				"cmd", m.Cmd, "type", m.Type, "bytes", len(m.Raw))
		}
		p.emit(Event{Kind: EventMessage, Message: m})
	}
}

// WebSockets is the number of upgraded connections (WebSockets) the worker's HTTP servers
// hold, as the preload last reported it (at most every 250 ms, on change). 0 before the
// first report.
func (p *Primary) WebSockets() int64 { return p.ws.Load() }

func (p *Primary) websocketsReport(m Message) {
	var r struct {
		N json.RawMessage `json:"n"`
	}
	_ = json.Unmarshal(m.Raw, &r)
	v := rawInt(r.N)
	if v == nil || *v < 0 {
		p.Logger.Debug("nodeipc: bad websockets report", "msg", string(m.Raw))
		return
	}
	p.ws.Store(int64(*v))
	if p.OnWebSockets != nil {
		p.OnWebSockets(int64(*v))
	}
}

func (p *Primary) handleCluster(ctx context.Context, m Message) {
	switch m.Act {
	case "":
		if m.Ack == nil {
			return
		}
		var r struct {
			Accepted bool `json:"accepted"`
		}
		_ = json.Unmarshal(m.Raw, &r)
		p.mu.Lock()
		ch := p.pending[*m.Ack]
		delete(p.pending, *m.Ack)
		p.mu.Unlock()
		if ch != nil {
			ch <- r.Accepted
		}
	case "online":
		p.emit(Event{Kind: EventOnline, Message: m})
	case "queryServer":
		p.queryServer(ctx, m)
	case "listening":
		q := parseQuery(m)
		p.mu.Lock()
		isApp := p.appKey != "" && q.Key == p.appKey
		if isApp {
			p.appListening = true
		}
		p.mu.Unlock()
		if isApp {
			p.setReady()
			p.emit(Event{Kind: EventListening, Address: q.Address, Port: q.Port, Message: m})
		} else {
			p.emit(Event{Kind: EventServerListening, Address: q.Address, Port: q.Port, Message: m})
		}
	case "close":
		var r struct {
			Key string `json:"key"`
		}
		_ = json.Unmarshal(m.Raw, &r)
		p.mu.Lock()
		if r.Key != "" && r.Key == p.appKey {
			p.appKey, p.appListening = "", false
		}
		p.mu.Unlock()
	case "exitedAfterDisconnect":
		if m.Seq != nil {
			p.reply(map[string]any{"cmd": "NODE_CLUSTER", "ack": *m.Seq})
		}
		p.emit(Event{Kind: EventDisconnect, Message: m})
	}
}

func (p *Primary) reply(msg map[string]any) {
	msg["seq"] = p.nextSeq()
	if err := p.Channel.Send(msg); err != nil {
		p.Logger.Warn("nodeipc: reply to worker failed", "err", err)
	}
}

// jsString renders a JSON value the way a JS template literal would (undefined when absent).
func jsString(r json.RawMessage) string {
	if len(r) == 0 {
		return "undefined"
	}
	if r[0] == '"' {
		var s string
		if json.Unmarshal(r, &s) == nil {
			return s
		}
	}
	return string(r)
}

func parseQuery(m Message) QueryServer {
	var r struct {
		Address, Port, AddressType, FD, Index json.RawMessage
	}
	_ = json.Unmarshal(m.Raw, &r)
	q := QueryServer{Raw: m.Raw, Address: rawString(r.Address), FD: rawInt(r.FD)}
	if v := rawInt(r.Port); v != nil {
		q.Port = *v
	}
	if v := rawInt(r.AddressType); v != nil {
		q.AddressType = *v
	}
	if v := rawInt(r.Index); v != nil {
		q.Index = *v
	}
	if m.Seq != nil {
		q.Seq = *m.Seq
	}
	q.Key = jsString(r.Address) + ":" + jsString(r.Port) + ":" + jsString(r.AddressType) + ":" +
		jsString(r.FD) + ":" + jsString(r.Index)
	return q
}

func (p *Primary) queryServer(ctx context.Context, m Message) {
	q := parseQuery(m)
	var data json.RawMessage
	{
		var r struct {
			Data json.RawMessage `json:"data"`
		}
		_ = json.Unmarshal(m.Raw, &r)
		data = r.Data
	}
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	if m.Seq == nil {
		p.Logger.Warn("nodeipc: queryServer without seq", "msg", string(m.Raw))
		return
	}

	app := false
	p.mu.Lock()
	candidate := p.appKey == "" && p.Style() != StyleSticky && q.AddressType != 0 && q.FD == nil
	p.mu.Unlock()
	if candidate {
		if p.OnQueryServer != nil {
			app = p.OnQueryServer(q)
		} else {
			app = true
		}
	}
	if app {
		p.mu.Lock()
		p.appKey, p.appListening = q.Key, false
		p.mu.Unlock()
		p.style.CompareAndSwap(int32(StyleUnknown), int32(StyleListen))
		reply := map[string]any{
			"cmd": "NODE_CLUSTER", "errno": nil, "key": q.Key, "ack": q.Seq, "data": data,
		}
		if q.AddressType == 4 || q.AddressType == 6 {
			// Round-robin mode: no handle. checkBindError wants the requested port back.
			addr, family := q.Address, "IPv4"
			if q.AddressType == 6 || addr == "" {
				family = "IPv6"
				if addr == "" {
					addr = "::"
				}
			}
			reply["sockname"] = map[string]any{"address": addr, "family": family, "port": q.Port}
		}
		p.Logger.Debug("nodeipc: app server", "key", q.Key)
		p.reply(reply)
		return
	}

	ln, errno, err := p.Shared.listener(q)
	if err != nil {
		p.Logger.Warn("nodeipc: cannot serve the app's server", "key", q.Key, "err", err)
		p.reply(map[string]any{"cmd": "NODE_CLUSTER", "errno": errno, "key": q.Key, "ack": q.Seq, "data": data})
		return
	}
	reply := map[string]any{
		"cmd": "NODE_CLUSTER", "errno": 0, "key": q.Key, "ack": q.Seq, "data": data, "seq": p.nextSeq(),
	}
	if err := p.Channel.SendHandle(ctx, "net.Native", reply, ln.(syscall.Conn)); err != nil {
		p.Logger.Warn("nodeipc: sending a shared listener failed", "key", q.Key, "err", err)
	}
}

type newconnMsg struct {
	Cmd string `json:"cmd"`
	Act string `json:"act"`
	Key string `json:"key"`
	Seq int    `json:"seq"`
}

type stickyConnMsg struct {
	Type         string `json:"type"`
	Data         string `json:"data"`
	ConnectionID string `json:"connectionId"`
}

// Deliver hands one connection (TCP socket or socketpair end, nothing consumed from it) to the
// worker, in the style detected:
//   - StyleListen: net.Native newconn on the app server key, then waits for the worker's
//     {ack:seq, accepted} reply (accepted:false -> ErrRejected);
//   - StyleSticky: net.Socket sticky:connection with data "" and a fresh connectionId;
//     done at the handle ACK.
//
// Like SendHandle it neither duplicates nor closes conn: on success close your copy; on error
// you still own it. Errors wrap ErrNotReady, ErrRejected, ErrNACK, ErrAckTimeout or ErrClosed.
// A timeout closes the channel (hung worker), which makes a Node worker exit, so a copy it
// may hold goes away with it.
func (p *Primary) Deliver(ctx context.Context, conn syscall.Conn) error {
	p.init()
	switch p.Style() {
	case StyleSticky:
		var b [8]byte
		rand.Read(b[:])
		return p.Channel.SendHandle(ctx, "net.Socket",
			stickyConnMsg{Type: "sticky:connection", Data: "", ConnectionID: hex.EncodeToString(b[:])}, conn)
	case StyleListen:
	default:
		return fmt.Errorf("nodeipc: deliver: style unknown: %w", ErrNotReady)
	}
	seq := p.nextSeq()
	ch := make(chan bool, 1)
	p.mu.Lock()
	if p.detached {
		p.mu.Unlock()
		return fmt.Errorf("nodeipc: deliver: %w: %w", ErrClosed, ErrDetached)
	}
	key := p.appKey
	if key == "" {
		p.mu.Unlock()
		return fmt.Errorf("nodeipc: deliver: app server closed: %w", ErrNotReady)
	}
	p.pending[seq] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pending, seq)
		p.mu.Unlock()
	}()
	if err := p.Channel.SendHandle(ctx, "net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: key, Seq: seq}, conn); err != nil {
		return err
	}
	timer := time.NewTimer(p.Channel.cfg.AckTimeout)
	defer timer.Stop()
	select {
	case ok := <-ch:
		if !ok {
			return fmt.Errorf("nodeipc: deliver: %w", ErrRejected)
		}
		return nil
	case <-p.Channel.Done():
		return fmt.Errorf("nodeipc: deliver: waiting for newconn reply: %w", p.Channel.sendErr())
	case <-p.runDone:
		return fmt.Errorf("nodeipc: deliver: Primary.Run returned: %w", ErrClosed)
	case <-timer.C:
		err := fmt.Errorf("nodeipc: deliver: no newconn reply within %v: %w", p.Channel.cfg.AckTimeout, ErrAckTimeout)
		p.Channel.closeWith(err)
		return err
	}
}

// completeNewconn passes a newconn answer to the Deliver waiting for it, from the
// channel's reader. It reports whether one was waiting (if not, Run sees the message).
func (p *Primary) completeNewconn(seq int, accepted bool) bool {
	p.mu.Lock()
	ch := p.pending[seq]
	delete(p.pending, seq)
	p.mu.Unlock()
	if ch == nil {
		return false
	}
	ch <- accepted // capacity 1, one answer per seq
	return true
}
