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

	// The handoffs waiting for the worker's answer have a lock of their own: the channel's
	// reader takes it for every answer, and Detach holds mu while it stops the reader (a
	// stray answer from the worker then must not wait for mu). Order: mu, pmu, Channel.mu.
	pmu        sync.Mutex
	pending    map[int]func(error) // newconn handoffs waiting for the worker's answer
	due        []dueHandoff        // pending's deadlines, oldest first (entries may be answered already)
	dueHead    int
	dueTimer   *time.Timer // fails or times out the oldest pending handoff; armed while any is pending
	dueArmed   bool
	started    bool           // Run was called
	detached   bool           // Detach succeeded
	detachReq  *detachRequest // waiting for Run to pause
	ownShared  *SharedListeners
	adoptedOwn *SharedListeners // own shared listeners handed over (ResumePrimary)
}

func (p *Primary) init() {
	p.initOnce.Do(func() {
		p.ready = make(chan struct{})
		p.events = make(chan Event, 256)
		p.runDone = make(chan struct{})
		p.wake = make(chan struct{}, 1)
		p.pending = make(map[int]func(error))
		if p.Channel != nil {
			// The reader completes the handoff waiting for a newconn answer itself (no hop
			// through the queue and Run, no JSON decoding of the answer).
			p.Channel.onNewconnReply(p.completeNewconn)
			fail := p.failPending
			p.Channel.onClose.Store(&fail)
			if p.Channel.Err() != nil { // closed before the hook was set
				p.failPending()
			}
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
		p.completeNewconn(*m.Ack, r.Accepted)
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
// you still own it. Errors wrap ErrNotReady, ErrRejected, ErrNACK, ErrAckTimeout, ErrBacklog
// or ErrClosed, or ctx's error when ctx ended while the handle still waited for the channel.
// A worker that takes no handle within Config.AckTimeout is treated as hung: the channel is
// closed, which makes a Node worker exit, so a copy it may hold goes away with it.
func (p *Primary) Deliver(ctx context.Context, conn syscall.Conn) error {
	p.init()
	if p.Style() != StyleListen {
		return p.deliverSticky(ctx, conn)
	}
	ch := make(chan error, 1)
	seq, err := p.deliverListen(ctx, conn, func(err error) { ch <- err })
	if err != nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		if p.cancelQueued(seq) {
			return fmt.Errorf("nodeipc: deliver: waiting for the channel: %w", ctx.Err())
		}
		return <-ch // on its way to the worker: the answer (or the timeout) comes
	}
}

// DeliverFunc is Deliver without the wait: it returns once the handle is written or queued
// behind the one in flight, and done gets Deliver's result exactly once — usually later,
// from the channel's reader goroutine, so it must be quick and must not block (closing the
// edge's copy of conn and counting is what it is for; anything longer goes to a goroutine).
// A @socket.io/sticky worker (StyleSticky), whose handoff ends at the ACK, gets done before
// DeliverFunc returns. conn must stay open until done. When DeliverFunc returns an error
// nothing was sent, done is not called, and the caller still owns conn.
//
// This is the edge's way to hand connections to Node workers: a burst of handoffs goes out
// one per ACK from the reader, and no goroutine waits for each answer.
func (p *Primary) DeliverFunc(conn syscall.Conn, done func(error)) error {
	p.init()
	if p.Style() != StyleListen {
		if err := p.deliverSticky(context.Background(), conn); err != nil {
			return err
		}
		done(nil)
		return nil
	}
	_, err := p.deliverListen(context.Background(), conn, done)
	return err
}

func (p *Primary) deliverSticky(ctx context.Context, conn syscall.Conn) error {
	if p.Style() != StyleSticky {
		return fmt.Errorf("nodeipc: deliver: style unknown: %w", ErrNotReady)
	}
	var b [8]byte
	rand.Read(b[:])
	return p.Channel.SendHandle(ctx, "net.Socket",
		stickyConnMsg{Type: "sticky:connection", Data: "", ConnectionID: hex.EncodeToString(b[:])}, conn)
}

// dueHandoff is when a pending newconn handoff times out. The first deadline counts from
// the call; a handle already sent by then (it may have waited its turn for most of it)
// gets one more AckTimeout for the worker's answer (extended).
type dueHandoff struct {
	seq      int
	at       time.Time
	extended bool
}

var errDeliverRejected = fmt.Errorf("nodeipc: deliver: %w", ErrRejected)

// deliverListen sends (or queues) a newconn handle and registers done for the answer. An
// error means nothing was sent and done will not be called. ctx matters only to the
// benchmark's baseline (waitNewconnACK), whose send waits for the turn.
func (p *Primary) deliverListen(ctx context.Context, conn syscall.Conn, done func(error)) (int, error) {
	seq := p.nextSeq()
	p.mu.Lock()
	if p.detached {
		p.mu.Unlock()
		return 0, fmt.Errorf("nodeipc: deliver: %w: %w", ErrClosed, ErrDetached)
	}
	key := p.appKey
	if key == "" {
		p.mu.Unlock()
		return 0, fmt.Errorf("nodeipc: deliver: app server closed: %w", ErrNotReady)
	}
	p.pmu.Lock() // under mu too: Detach sees either this handoff pending or nothing
	p.pending[seq] = done
	p.due = append(p.due, dueHandoff{seq: seq, at: time.Now().Add(p.Channel.cfg.AckTimeout)})
	if !p.dueArmed {
		p.dueArmed = true
		if p.dueTimer == nil {
			p.dueTimer = time.AfterFunc(p.Channel.cfg.AckTimeout, p.sweepDue)
		} else {
			p.dueTimer.Reset(p.Channel.cfg.AckTimeout)
		}
	}
	p.pmu.Unlock()
	p.mu.Unlock()
	if err := p.Channel.SendHandle(ctx, "net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: key, Seq: seq}, conn); err != nil {
		if p.takePending(seq) == nil {
			return seq, nil // answered meanwhile (the channel closed): done has the error
		}
		return seq, err
	}
	return seq, nil
}

// takePending removes and returns the handoff waiting for seq's answer: whoever takes it
// calls it (each is called once).
func (p *Primary) takePending(seq int) func(error) {
	p.pmu.Lock()
	done := p.pending[seq]
	delete(p.pending, seq)
	// Answers come in order: the deadlines of answered handoffs leave from the front.
	for p.dueHead < len(p.due) {
		if _, ok := p.pending[p.due[p.dueHead].seq]; ok {
			break
		}
		p.dueHead++
	}
	if p.dueHead == len(p.due) {
		p.due, p.dueHead = p.due[:0], 0
	}
	p.pmu.Unlock()
	return done
}

// cancelQueued withdraws handoff seq if its handle still waits for the channel.
func (p *Primary) cancelQueued(seq int) bool {
	p.pmu.Lock()
	defer p.pmu.Unlock()
	if _, ok := p.pending[seq]; !ok || !p.Channel.dropQueued(seq) {
		return false
	}
	delete(p.pending, seq)
	return true
}

// completeNewconn passes a newconn answer to the handoff waiting for it, from the
// channel's reader. It reports whether one was waiting (if not, Run sees the message).
func (p *Primary) completeNewconn(seq int, accepted bool) bool {
	done := p.takePending(seq)
	if done == nil {
		return false
	}
	if accepted {
		done(nil)
	} else {
		done(errDeliverRejected)
	}
	return true
}

// failPending fails every pending handoff: the channel closed.
func (p *Primary) failPending() {
	p.pmu.Lock()
	var fail []func(error)
	for seq, done := range p.pending {
		fail = append(fail, done)
		delete(p.pending, seq)
	}
	p.due, p.dueHead = nil, 0
	p.pmu.Unlock()
	if len(fail) == 0 {
		return
	}
	err := fmt.Errorf("nodeipc: deliver: waiting for newconn reply: %w", p.Channel.sendErr())
	for _, done := range fail {
		done(err)
	}
}

// sweepDue runs when the oldest pending handoff may be overdue. One still waiting for the
// channel fails (the worker is slow to take connections: the edge tries another); one whose
// handle went out means a hung worker, whose channel is closed — which fails every other.
func (p *Primary) sweepDue() {
	now := time.Now()
	var expired []func(error)
	hung := false
	p.pmu.Lock()
	p.dueArmed = false
	for p.dueHead < len(p.due) {
		d := p.due[p.dueHead]
		done, ok := p.pending[d.seq]
		if !ok {
			p.dueHead++
			continue
		}
		if now.Before(d.at) {
			break
		}
		p.dueHead++
		if p.Channel.dropQueued(d.seq) {
			delete(p.pending, d.seq)
			expired = append(expired, done)
			continue
		}
		if d.extended {
			hung = true
			break
		}
		p.due = append(p.due, dueHandoff{seq: d.seq, at: now.Add(p.Channel.cfg.AckTimeout), extended: true})
	}
	if p.dueHead == len(p.due) {
		p.due, p.dueHead = p.due[:0], 0
	} else if p.dueHead > 1024 && p.dueHead > len(p.due)/2 {
		p.due = append(p.due[:0], p.due[p.dueHead:]...)
		p.dueHead = 0
	}
	if !hung && p.dueHead < len(p.due) {
		p.dueArmed = true
		p.dueTimer.Reset(p.due[p.dueHead].at.Sub(now))
	}
	p.pmu.Unlock()
	timeout := p.Channel.cfg.AckTimeout
	for _, done := range expired {
		done(fmt.Errorf("nodeipc: deliver: waited %v for the channel: %w", timeout, context.DeadlineExceeded))
	}
	if hung {
		p.Channel.closeWith(fmt.Errorf("nodeipc: deliver: the worker took a handle and did not answer within %v: %w", timeout, ErrAckTimeout))
	}
}
