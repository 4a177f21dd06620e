//go:build unix

// Package nodeipc speaks Node.js's IPC channel protocol (JSON serialization mode) from the
// parent side, so that a Go process can spawn unmodified Node apps and hand them client
// connections the way Node's own cluster primary or @socket.io/sticky's primary would.
//
// The wire format is one JSON value per line. A handle (file descriptor) travels as
//
//	{"cmd":"NODE_HANDLE","type":"net.Native","msg":<message>}\n
//
// written with a single sendmsg whose SCM_RIGHTS control message carries the fd, so the fd is
// attached to the first byte of that line. The child answers {"cmd":"NODE_HANDLE_ACK"} (or
// NODE_HANDLE_NACK when the fd did not arrive, e.g. MSG_CTRUNC). Like Node's own sender, a
// Channel keeps one handle in flight: later handles and plain messages wait until the ACK.
//
// Channel is the transport; Primary emulates Node's cluster primary on top of it (queryServer,
// newconn, @socket.io/sticky's sticky:connection); SharedListeners owns the listening sockets
// of servers the app listens on besides the one that receives the edge's traffic.
//
// Spawning a worker (error handling elided):
//
//	os.WriteFile(preloadPath, []byte(nodeipc.PreloadScript()), 0o644) // once per edge
//	parent, child, _ := nodeipc.NewPair()
//	cmd := exec.Command("node", "server.js")
//	cmd.ExtraFiles = []*os.File{child} // fd 3 in the child
//	cmd.Env = append(os.Environ(), nodeipc.Env(3, workerID)...)
//	cmd.Env = append(cmd.Env, nodeipc.PreloadEnv(preloadPath)...)
//	cmd.Start()
//	child.Close()
//	p := &nodeipc.Primary{Channel: nodeipc.NewChannel(parent, nodeipc.Config{}), Shared: appShared}
//	go p.Run(ctx)  // returns when the worker exits
//	<-p.Ready()    // with a spawn timeout
//	err := p.Deliver(ctx, tcpConn) // then tcpConn.Close() on success; keep it on error
package nodeipc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stickyd/stickyd/fdpass/platform"
	"golang.org/x/sys/unix"
)

// Sentinel errors. Errors returned by this package wrap them with %w.
var (
	// ErrClosed: the channel was closed (by Close, or because the child went away or the
	// stream was corrupted; the cause is wrapped alongside when there is one).
	ErrClosed = errors.New("nodeipc: channel closed")
	// ErrNACK: the child answered NODE_HANDLE_NACK to every attempt (Config.MaxResends+1).
	ErrNACK = errors.New("nodeipc: handle not received by the child (NACK)")
	// ErrAckTimeout: the child did not acknowledge within Config.AckTimeout. The worker is
	// treated as hung and the channel is closed (a late ACK could otherwise be matched to the
	// next handle; a Node cluster worker also exits when its channel closes).
	ErrAckTimeout = errors.New("nodeipc: timed out waiting for the child's acknowledgement")
	// ErrLineTooLong: the child sent a line longer than Config.MaxLine; the channel is closed.
	ErrLineTooLong = errors.New("nodeipc: line from the child exceeds the limit")
	// ErrBadMessage: a line that is not JSON (channel closed), or a message that cannot be
	// encoded (nothing sent).
	ErrBadMessage = errors.New("nodeipc: malformed message")
	// ErrDetached: the channel (or Primary) was handed over by Primary.Detach; its socket
	// lives on in the PrimaryState. Sends after Detach fail with ErrClosed wrapping it;
	// Recv, Err and Primary.Run return it.
	ErrDetached = errors.New("nodeipc: detached for handover")
	// ErrBusy: Detach refused because a handle is in flight, a write is in progress or a
	// newconn reply is pending. Nothing was changed; retry once the edge is quiet.
	ErrBusy = errors.New("nodeipc: busy (handle in flight or reply pending)")
	// ErrBacklog: too many handoffs already wait for this worker's channel (the worker
	// takes connections more slowly than they come); nothing was sent.
	ErrBacklog = errors.New("nodeipc: too many handoffs wait for this worker")
)

// Config configures a Channel. The zero value is usable.
type Config struct {
	AckTimeout time.Duration // 0: 5s — a worker that does not ACK a handle in time is treated as hung
	MaxResends int           // 0: 3 (on NACK); negative: no resend
	MaxLine    int           // 0: 64 MiB; a longer line from the child closes the channel with ErrLineTooLong
	Logger     *slog.Logger  // nil: slog.Default()
}

func (cfg Config) withDefaults() Config {
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	switch {
	case cfg.MaxResends == 0:
		cfg.MaxResends = 3
	case cfg.MaxResends < 0:
		cfg.MaxResends = 0
	}
	if cfg.MaxLine <= 0 {
		// Large: a @socket.io/cluster-adapter fetchSockets response (every socket of a worker
		// with its handshake) is one line, and Node's own primary has no limit.
		cfg.MaxLine = 64 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg
}

// Message is one JSON line from the child (internal NODE_HANDLE_ACK/NACK are consumed by the
// Channel).
type Message struct {
	Raw            json.RawMessage
	Cmd, Act, Type string // top-level "cmd", "act", "type" when present (and strings)
	Seq, Ack       *int   // "seq"/"ack" when present (and integers)
	Data           string // "data" when a string
}

// Channel speaks Node's IPC protocol in JSON mode over the parent's end of the socketpair.
// All methods are safe for concurrent use. The owner must keep calling Recv (Primary.Run
// does): messages from the child are queued without bound until received.
type Channel struct {
	uc  *net.UnixConn
	cfg Config
	log *slog.Logger

	turn chan struct{} // capacity 1: held while writing, and by a handle until its ACK
	wmu  sync.Mutex    // serialises writes on uc (the reader writes ACKs without the turn)
	ack  chan bool     // capacity 1: ACK (true) / NACK (false) of the handle in flight

	mu       sync.Mutex
	inflight bool // a handle is waiting for ACK/NACK
	// A newconn handle whose ACK the reader waits for on its own (SendHandle has
	// returned; the turn stays taken until the ACK): see sendNewconn.
	piped    pipedHandle
	ackDue   time.Time   // (mu) when the piped handle's ACK is overdue
	ackFire  *time.Timer // closes the channel when the piped handle's ACK is overdue
	ackArmed bool        // (mu) ackFire is pending: it is re-armed when it fires, not per handle
	// Newconn handles waiting for the turn (mu). Whoever gives the turn up sends the next
	// one itself — usually the reader, on the ACK of the one before — so a burst of
	// handoffs goes out one per ACK with no caller to wake: Node's one handle in flight,
	// pipelined. plainWaiting counts the other writers blocked for the turn, which the
	// queue alternates with so that neither starves.
	hq           []queuedNewconn
	hqHead       int
	plainWaiting atomic.Int32
	plainNext    bool                   // (mu) the next release goes to a plain writer
	onClose      atomic.Pointer[func()] // run once after the channel closes (Primary fails its pending handoffs)
	readerBusy   atomic.Bool            // the reader is handling what it read, inside its RawRead
	// replyTo, when set (by the Primary), takes the worker's newconn answers straight from
	// the reader: the Deliver waiting for one is woken by the reader itself, not through
	// the queue and Run (one wake-up less per handoff). It reports whether it knew seq.
	replyTo atomic.Pointer[func(seq int, accepted bool) bool]
	queue   []Message
	head    int
	notify  chan struct{} // capacity 1: queue grew or channel closed
	err     error         // why the channel closed

	// Stopping the reader without closing the socket (Primary.Detach).
	stopping   atomic.Bool   // set while the reader is being stopped
	stopped    bool          // (mu) the reader returned because it was stopped
	leftover   []byte        // (mu) the incomplete line it held when it stopped
	readerDone chan struct{} // (mu) closed when the current reader goroutine returns

	done      chan struct{}
	closeOnce sync.Once

	// Reused by every handle so that a handoff allocates (almost) nothing. hbuf and
	// ackTimer belong to the holder of the turn (one handle in flight); oob, wline, wn,
	// werr and sendFD to the holder of wmu.
	hbuf      []byte      // the NODE_HANDLE line being sent
	hcache    handleCache // precomputed fixed parts of the lines Primary sends
	ackTimer  *time.Timer
	oob       []byte // SCM_RIGHTS control message with room for one fd
	wline     []byte
	wn        int
	werr      error
	sendFD    func(fd uintptr) // sendmsg of wline with fd attached; built once
	wdeadline time.Time        // the write deadline set last (see setWriteDeadline)
	// The reader's non-blocking variant (it must never wait for room in the socket):
	// trySendFD attaches the fd and runs trySendUC on the channel's own descriptor.
	ucRaw     syscall.RawConn
	trySendFD func(fd uintptr)
	trySendUC func(ufd uintptr) bool
}

// queuedNewconn is a newconn handle waiting for the turn.
type queuedNewconn struct {
	typ  string
	msg  any // the caller's newconnMsg, already boxed
	seq  int
	conn syscall.Conn
}

// maxQueuedHandles bounds the newconn handles waiting for one worker's channel; past it a
// handoff fails at once (ErrBacklog) and the edge tries another worker.
const maxQueuedHandles = 1024

// NewChannel takes ownership of uc (the parent's end of a SOCK_STREAM socketpair whose other
// end is the child's NODE_CHANNEL_FD) and starts one reader goroutine. Close releases both.
func NewChannel(uc *net.UnixConn, cfg Config) *Channel {
	return newChannel(uc, cfg, nil, nil)
}

// newChannel starts the reader with pending (bytes read earlier, e.g. by a previous edge
// image) in front of what it reads, after queued (messages received but not yet Recv'd).
func newChannel(uc *net.UnixConn, cfg Config, pending []byte, queued []Message) *Channel {
	cfg = cfg.withDefaults()
	c := &Channel{
		uc:         uc,
		cfg:        cfg,
		log:        cfg.Logger,
		turn:       make(chan struct{}, 1),
		ack:        make(chan bool, 1),
		notify:     make(chan struct{}, 1),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
		queue:      queued,
		oob:        unix.UnixRights(0),
	}
	c.sendFD = func(fd uintptr) {
		// The fd goes where unix.UnixRights puts it: the data of the one SCM_RIGHTS message.
		binary.NativeEndian.PutUint32(c.oob[unix.CmsgLen(0):], uint32(fd))
		c.wn, _, c.werr = c.uc.WriteMsgUnix(c.wline, c.oob, nil)
	}
	c.ucRaw, _ = uc.SyscallConn() // fails only for a closed conn, and then so does every write
	c.trySendUC = func(ufd uintptr) bool {
		c.wn, c.werr = unix.SendmsgN(int(ufd), c.wline, c.oob, nil, unix.MSG_DONTWAIT)
		return true // one attempt: EAGAIN is the caller's to handle
	}
	c.trySendFD = func(fd uintptr) {
		binary.NativeEndian.PutUint32(c.oob[unix.CmsgLen(0):], uint32(fd))
		if c.ucRaw == nil {
			c.wn, c.werr = 0, net.ErrClosed
			return
		}
		if err := c.ucRaw.Write(c.trySendUC); err != nil {
			c.wn, c.werr = 0, err
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// The last write's deadline has passed: the blocking write sets a new one.
				c.werr = unix.EAGAIN
			}
		}
	}
	if len(queued) > 0 {
		c.notify <- struct{}{}
	}
	go readLoop(c, c.readerDone, pending)
	return c
}

// Done is closed when the channel is closed (by Close or because the child went away).
func (c *Channel) Done() <-chan struct{} { return c.done }

// Err reports why the channel closed: nil while open, io.EOF when the child closed its end,
// ErrClosed after Close, or an error wrapping ErrLineTooLong, ErrBadMessage, ErrAckTimeout or
// a read/write error.
func (c *Channel) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the channel and waits for the reader goroutine to exit. It is idempotent.
// Pending and later calls fail with ErrClosed.
func (c *Channel) Close() error {
	c.closeWith(ErrClosed)
	c.mu.Lock()
	rd := c.readerDone
	c.mu.Unlock()
	<-rd
	return nil
}

func (c *Channel) closeWith(err error) {
	first := false
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.err = err
		clear(c.hq[c.hqHead:]) // their handoffs fail through onClose; drop the conns
		c.hq, c.hqHead = nil, 0
		c.mu.Unlock()
		close(c.done)
		if c.readerBusy.Load() {
			// Maybe the reader itself, inside its read (a write failed while it handled a
			// line): the socket's Close waits for that read to return, so it cannot be
			// made from here. It completes as soon as the read returns.
			go c.uc.Close()
		} else {
			c.uc.Close()
		}
		first = true
	})
	if f := c.onClose.Load(); first && f != nil {
		// Not here: the caller may hold a lock the hook takes (Detach stopping the reader
		// while the reader closes the channel).
		go (*f)()
	}
}

// sendErr is the error for a send that failed because the channel is closed.
func (c *Channel) sendErr() error {
	err := c.Err()
	if err == nil || errors.Is(err, ErrClosed) {
		if err == nil {
			err = ErrClosed
		}
		return err
	}
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// Recv returns the next message from the child. When the channel is closed and every queued
// message has been returned it returns io.EOF (the child closed its end, e.g. it exited),
// ErrClosed (after Close), or the error that closed the channel.
func (c *Channel) Recv() (Message, error) {
	return c.recv(nil, nil)
}

// errWake: recv was woken through its wake channel (Primary.Detach asks Run to pause).
var errWake = errors.New("nodeipc: woken")

func (c *Channel) recv(cancel, wake <-chan struct{}) (Message, error) {
	for {
		c.mu.Lock()
		if c.head < len(c.queue) {
			m := c.queue[c.head]
			c.queue[c.head] = Message{}
			c.head++
			more := c.head < len(c.queue)
			if !more {
				c.queue, c.head = c.queue[:0], 0
			}
			c.mu.Unlock()
			if more { // pass the wake-up on, in case several goroutines call Recv
				select {
				case c.notify <- struct{}{}:
				default:
				}
			}
			return m, nil
		}
		err := c.err
		c.mu.Unlock()
		if err != nil {
			return Message{}, err
		}
		select {
		case <-c.notify:
		case <-c.done:
		case <-cancel:
			return Message{}, context.Canceled
		case <-wake:
			return Message{}, errWake
		}
	}
}

func (c *Channel) enqueue(m Message) {
	c.mu.Lock()
	c.queue = append(c.queue, m)
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

func (c *Channel) acquire(ctx context.Context) error {
	select {
	case <-c.done:
		return c.sendErr()
	default:
	}
	select {
	case c.turn <- struct{}{}:
		return nil
	default:
	}
	c.plainWaiting.Add(1)
	defer c.plainWaiting.Add(-1)
	select {
	case c.turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("nodeipc: waiting for the channel: %w", ctx.Err())
	case <-c.done:
		return c.sendErr()
	}
}

// release gives the turn up: to the next queued newconn handle, which it sends (keeping
// the turn for it), or to whoever waits in acquire. It alternates between the two while
// both wait.
func (c *Channel) release() { c.releaseTurn(false) }

// releaseTurn is release; fromReader says the caller is the reader goroutine, which must
// not block on a full socket.
func (c *Channel) releaseTurn(fromReader bool) {
	for {
		c.mu.Lock()
		n := len(c.hq) - c.hqHead
		if n == 0 || c.err != nil || (c.plainNext && c.plainWaiting.Load() > 0) {
			c.plainNext = false
			<-c.turn
			c.mu.Unlock()
			return
		}
		h := c.hq[c.hqHead]
		c.hq[c.hqHead] = queuedNewconn{}
		if c.hqHead++; c.hqHead == len(c.hq) {
			c.hq, c.hqHead = c.hq[:0], 0
		}
		c.plainNext = true
		c.mu.Unlock()
		err := c.startNewconn(h, fromReader)
		if err == nil {
			return
		}
		// Its caller has gone back to work: the answer goes the way of a reply.
		c.rejectNewconn(h.seq)
	}
}

// dropQueued takes newconn seq out of the queue if it is still waiting for the turn.
func (c *Channel) dropQueued(seq int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := c.hqHead; i < len(c.hq); i++ {
		if c.hq[i].seq == seq {
			copy(c.hq[i:], c.hq[i+1:])
			c.hq[len(c.hq)-1] = queuedNewconn{} // the conn must not linger in the array
			if c.hq = c.hq[:len(c.hq)-1]; c.hqHead == len(c.hq) {
				c.hq, c.hqHead = c.hq[:0], 0
			}
			return true
		}
	}
	return false
}

// Send writes msg as one JSON line. Like Node, it is ordered behind any handle in flight, so it
// may wait up to Config.AckTimeout.
func (c *Channel) Send(msg any) error {
	line, err := marshalLine(msg)
	if err != nil {
		return err
	}
	if err := c.acquire(context.Background()); err != nil {
		return err
	}
	defer c.release()
	return c.writeLine(line, nil)
}

// relayWriteTimeout bounds a relay write to a worker that does not read its channel. Longer
// than the ACK timeout: a worker whose event loop stalls for a few seconds under a stream of
// cross-worker broadcasts is busy, not hung (Node's own primary would buffer without limit;
// the relay's bounded queue drops instead), and closing its channel would make it exit.
// Handoffs to it meanwhile time out on the turn and go to other workers.
const relayWriteTimeout = 30 * time.Second

// sendRaw writes lines (complete JSON lines, each ending in '\n') as they are, ordered like
// Send. The relay uses it to forward messages byte for byte.
func (c *Channel) sendRaw(lines []byte) error {
	if err := c.acquire(context.Background()); err != nil {
		return err
	}
	defer c.release()
	return c.writeLineWithin(lines, nil, max(relayWriteTimeout, c.cfg.AckTimeout))
}

// pipedHandle is the newconn handle in flight whose ACK the reader handles.
type pipedHandle struct {
	active   bool
	conn     syscall.Conn // the caller's: Primary.Deliver keeps it open until the reply
	seq      int
	attempts int
	line     []byte // its line (in hbuf), for a resend
}

type handleEnvelope struct {
	Cmd  string `json:"cmd"`
	Type string `json:"type"`
	Msg  any    `json:"msg"`
}

// SendHandle sends {"cmd":"NODE_HANDLE","type":typ,"msg":msg}\n with conn's fd in the same
// sendmsg, waits for NODE_HANDLE_ACK, resends on NACK (bounded by Config.MaxResends) and
// fails with ErrAckTimeout (closing the channel) when the child does not answer in time.
//
// It duplicates nothing and does not close conn: after success the child holds its own copy
// and the caller closes its one; on error the caller still owns conn (to answer 503 or retry
// elsewhere). ctx bounds only the wait for the channel (one handle in flight); once the line
// is written the wait for the ACK is bounded by Config.AckTimeout, because abandoning it would
// let a late ACK be matched to the next handle.
//
// Primary's newconn handles are the exception: they return once written, and the caller
// must keep conn open until the worker's newconn answer (Primary.Deliver does) — see
// sendNewconn.
func (c *Channel) SendHandle(ctx context.Context, typ string, msg any, conn syscall.Conn) error {
	if conn == nil {
		return fmt.Errorf("nodeipc: SendHandle: nil conn")
	}
	if m, ok := msg.(newconnMsg); ok && !waitNewconnACK {
		return c.sendNewconn(typ, msg, m.Seq, conn)
	}
	// The messages Primary sends every handoff are written from precomputed bytes under the
	// turn (into a buffer the turn owns); anything else is encoded before waiting for it.
	fast := isFastHandleMsg(msg)
	var line []byte
	if !fast {
		var err error
		if line, err = marshalLine(handleEnvelope{Cmd: "NODE_HANDLE", Type: typ, Msg: msg}); err != nil {
			return err
		}
	}
	if err := c.acquire(ctx); err != nil {
		return err
	}
	defer c.release()
	if fast {
		var err error
		if c.hbuf, err = c.hcache.appendLine(c.hbuf[:0], typ, msg); err != nil {
			return err
		}
		line = c.hbuf
	}
	// One timer per channel, reused: only the holder of the turn waits for an ACK.
	if c.ackTimer == nil {
		c.ackTimer = time.NewTimer(c.cfg.AckTimeout)
		c.ackTimer.Stop()
	}
	timer := c.ackTimer
	defer timer.Stop()
	for attempt := 0; ; attempt++ {
		c.mu.Lock()
		c.inflight = true
		c.mu.Unlock()
		if err := c.writeLine(line, conn); err != nil {
			c.mu.Lock()
			c.inflight = false
			c.mu.Unlock()
			select { // an ACK cannot be pending for a line not written, but stay clean
			case <-c.ack:
			default:
			}
			return err
		}
		timer.Reset(c.cfg.AckTimeout)
		select {
		case ok := <-c.ack:
			if ok {
				return nil
			}
			if attempt >= c.cfg.MaxResends {
				return fmt.Errorf("nodeipc: %s handle after %d attempts: %w", typ, attempt+1, ErrNACK)
			}
			c.log.Warn("nodeipc: child NACKed a handle, resending", "type", typ, "attempt", attempt+1)
		case <-timer.C:
			err := fmt.Errorf("nodeipc: %s handle not acknowledged within %v: %w", typ, c.cfg.AckTimeout, ErrAckTimeout)
			c.closeWith(err)
			return err
		case <-c.done:
			return c.sendErr()
		}
	}
}

// waitNewconnACK makes newconn handles wait for their ACK in SendHandle as every other
// handle does: the previous behaviour, kept for the benchmark's baseline.
var waitNewconnACK = false

// sendNewconn sends a newconn handle without waiting for its ACK, or queues it behind the
// handle in flight, and returns at once: the worker's newconn reply, which Primary waits
// for anyway, always comes after the ACK (Node answers a NODE_HANDLE with the ACK before
// it passes the message on). Whoever gives the turn up next sends the queued handle —
// usually the reader, as soon as it has the ACK — so no caller is woken to send, and a
// burst of handoffs costs the edge one wake-up per handle (BenchmarkNodeHandoffCPU).
//
// Node's rule holds: the turn stays taken until the ACK, so nothing else is written to
// the worker while the handle is in flight; the reader releases the turn. On a NACK the
// reader resends the line with the same conn — the caller holds it open until the reply —
// and after Config.MaxResends it answers the newconn itself, as not accepted, so that the
// handoff fails with ErrRejected and the caller keeps the connection; so does a queued
// handle whose conn cannot be sent. An ACK that does not come within Config.AckTimeout
// closes the channel with ErrAckTimeout. How long a handle may wait in the queue is the
// Primary's to bound (dropQueued).
func (c *Channel) sendNewconn(typ string, msg any, seq int, conn syscall.Conn) error {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.sendErr()
	}
	select {
	case c.turn <- struct{}{}: // under mu: a holder releasing now sees the queue first
	default:
		if n := len(c.hq) - c.hqHead; n >= maxQueuedHandles {
			c.mu.Unlock()
			return fmt.Errorf("nodeipc: %d handoffs already wait for this worker: %w", n, ErrBacklog)
		}
		c.hq = append(c.hq, queuedNewconn{typ: typ, msg: msg, seq: seq, conn: conn})
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	if err := c.startNewconn(queuedNewconn{typ: typ, msg: msg, seq: seq, conn: conn}, false); err != nil {
		c.release()
		return err
	}
	return nil
}

// startNewconn writes h's line; the caller holds the turn. On success the turn is the
// reader's (it releases it on the ACK); on failure the caller still holds it.
func (c *Channel) startNewconn(h queuedNewconn, fromReader bool) error {
	var err error
	// hbuf is made and taken under mu: the next holder of the turn, which rewrites it, is
	// the reader that saw this line's ACK, and mu is what orders the two for the race
	// detector (the socket in between is invisible to it).
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.sendErr()
	}
	// msg stays the caller's interface value: converting the newconnMsg again would allocate.
	if c.hbuf, err = c.hcache.appendLine(c.hbuf[:0], h.typ, h.msg); err != nil {
		c.mu.Unlock()
		return err
	}
	line := c.hbuf
	c.inflight = true
	c.piped = pipedHandle{active: true, conn: h.conn, seq: h.seq, line: line}
	c.armAckLocked()
	c.mu.Unlock()
	if fromReader {
		sent, err := c.tryWriteLine(line, h.conn)
		if err == nil && !sent {
			// The socket is full (the worker is not reading): wait for room elsewhere, as
			// the reader must keep reading meanwhile.
			go func() {
				if err := c.writeLine(line, h.conn); err != nil {
					c.abandonPiped(h.seq)
				}
			}()
			return nil
		}
	} else {
		err = c.writeLine(line, h.conn)
	}
	if err != nil {
		c.mu.Lock()
		c.inflight, c.piped = false, pipedHandle{}
		c.mu.Unlock()
		return err
	}
	// From here on the reader owns the turn and c.hbuf: nothing more to touch.
	return nil
}

// abandonPiped ends the piped handle seq whose line could not be written: the turn moves
// on and its handoff fails (ErrRejected; a failed write has closed the channel anyway).
func (c *Channel) abandonPiped(seq int) {
	c.mu.Lock()
	if !c.piped.active || c.piped.seq != seq {
		c.mu.Unlock()
		return
	}
	c.inflight, c.piped = false, pipedHandle{}
	c.mu.Unlock()
	c.release()
	c.rejectNewconn(seq)
}

// tryWriteLine writes line with conn's fd attached if the socket has room for it now, and
// reports whether it did. A line as short as a handle's goes in one piece or not at all.
func (c *Channel) tryWriteLine(line []byte, conn syscall.Conn) (bool, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("nodeipc: handle: %w", err)
	}
	c.wmu.Lock()
	select {
	case <-c.done:
		c.wmu.Unlock()
		return false, c.sendErr()
	default:
	}
	c.wline = line
	cerr := rc.Control(c.trySendFD)
	n, werr := c.wn, c.werr
	c.wline, c.werr = nil, nil
	c.wmu.Unlock()
	switch {
	case cerr != nil:
		return false, fmt.Errorf("nodeipc: handle: %w", cerr)
	case werr == unix.EAGAIN || werr == unix.EWOULDBLOCK:
		return false, nil
	case werr != nil:
		err := fmt.Errorf("nodeipc: write to child: %w", werr)
		c.closeWith(err)
		return false, fmt.Errorf("%w: %w", ErrClosed, err)
	case n < len(line):
		// Not for a short line; a stream socket may still take a long one in parts (the
		// fd went with the first).
		c.wmu.Lock()
		defer c.wmu.Unlock()
		if err := c.setWriteDeadline(c.cfg.AckTimeout); err != nil {
			return false, c.sendErr()
		}
		if _, werr := c.uc.Write(line[n:]); werr != nil {
			err := fmt.Errorf("nodeipc: write to child: %w", werr)
			c.closeWith(err)
			return false, fmt.Errorf("%w: %w", ErrClosed, err)
		}
	}
	return true, nil
}

// armAckLocked starts the piped handle's ACK timeout (c.mu held). The timer is not reset
// for every handle (each reset may wake the runtime's poller): it stays armed, and when it
// fires it looks at ackDue.
func (c *Channel) armAckLocked() {
	c.ackDue = time.Now().Add(c.cfg.AckTimeout)
	if c.ackArmed {
		return
	}
	c.ackArmed = true
	if c.ackFire == nil {
		c.ackFire = time.AfterFunc(c.cfg.AckTimeout, c.ackOverdue)
		return
	}
	c.ackFire.Reset(c.cfg.AckTimeout)
}

// ackOverdue runs when the ACK timer fires. A handle in flight whose ACK is not due yet
// (the timer was armed for an earlier one) re-arms it.
func (c *Channel) ackOverdue() {
	c.mu.Lock()
	c.ackArmed = false
	overdue := false
	if c.piped.active && c.err == nil {
		if left := time.Until(c.ackDue); left > 0 {
			c.ackArmed = true
			c.ackFire.Reset(left)
		} else {
			overdue = true
		}
	}
	c.mu.Unlock()
	if overdue {
		c.closeWith(fmt.Errorf("nodeipc: net.Native handle not acknowledged within %v: %w", c.cfg.AckTimeout, ErrAckTimeout))
	}
}

// pipedAck is handleAck for a piped handle (c.mu held; it unlocks). It runs in the reader.
func (c *Channel) pipedAck(ok bool) {
	if ok {
		c.inflight, c.piped = false, pipedHandle{}
		c.mu.Unlock()
		c.releaseTurn(true)
		return
	}
	c.piped.attempts++
	ph := c.piped
	if ph.attempts > c.cfg.MaxResends {
		c.inflight, c.piped = false, pipedHandle{}
		c.mu.Unlock()
		c.releaseTurn(true)
		c.log.Warn("nodeipc: child NACKed a handle on every attempt", "type", "net.Native", "attempts", ph.attempts)
		c.rejectNewconn(ph.seq)
		return
	}
	c.armAckLocked()
	c.mu.Unlock()
	c.log.Warn("nodeipc: child NACKed a handle, resending", "type", "net.Native", "attempt", ph.attempts)
	// Not from the reader itself: a write may wait (up to the ACK timeout) for room in
	// the socket, and the reader must keep reading meanwhile.
	go func() {
		if err := c.writeLine(ph.line, ph.conn); err != nil {
			c.abandonPiped(ph.seq)
		}
	}()
}

// onNewconnReply makes f take the worker's newconn answers (see replyTo).
func (c *Channel) onNewconnReply(f func(seq int, accepted bool) bool) { c.replyTo.Store(&f) }

// rejectNewconn answers newconn seq on the worker's behalf, as not accepted (the handle
// never reached it): Primary passes the answer to the Deliver waiting for it.
func (c *Channel) rejectNewconn(seq int) {
	if f := c.replyTo.Load(); f != nil && (*f)(seq, false) {
		return
	}
	line := strconv.AppendInt([]byte(`{"cmd":"NODE_CLUSTER","ack":`), int64(seq), 10)
	line = append(line, `,"accepted":false}`...)
	m, err := parseMessage(line)
	if err != nil {
		return
	}
	c.enqueue(m)
}

// handleCache holds the bytes of the NODE_HANDLE lines Primary sends for every handoff
// (newconn, sticky:connection) up to the one field that changes (seq, connectionId), made
// once by encoding/json so that the fast lines are byte for byte what json.Marshal writes.
type handleCache struct {
	newconn newconnMsg // with Seq 0: the fields the prefix was made for
	newTyp  string
	newPre  []byte        // ...,"seq":
	sticky  stickyConnMsg // with ConnectionID ""
	stTyp   string
	stPre   []byte // ...,"connectionId":"
}

func isFastHandleMsg(msg any) bool {
	switch msg.(type) {
	case newconnMsg, stickyConnMsg:
		return true
	}
	return false
}

// appendLine appends the NODE_HANDLE line for msg (a newconnMsg or a stickyConnMsg) to dst.
func (hc *handleCache) appendLine(dst []byte, typ string, msg any) ([]byte, error) {
	switch m := msg.(type) {
	case newconnMsg:
		seq := m.Seq
		m.Seq = 0
		if hc.newPre == nil || hc.newconn != m || hc.newTyp != typ {
			pre, err := cachedPrefix(typ, m, `"seq":0}}`, `"seq":`)
			if err != nil {
				return dst, err
			}
			hc.newconn, hc.newTyp, hc.newPre = m, typ, pre
		}
		dst = append(dst, hc.newPre...)
		dst = strconv.AppendInt(dst, int64(seq), 10)
		return append(dst, "}}\n"...), nil
	case stickyConnMsg:
		id := m.ConnectionID
		if !plainJSONString(id) {
			return marshalLine(handleEnvelope{Cmd: "NODE_HANDLE", Type: typ, Msg: msg})
		}
		m.ConnectionID = ""
		if hc.stPre == nil || hc.sticky != m || hc.stTyp != typ {
			pre, err := cachedPrefix(typ, m, `"connectionId":""}}`, `"connectionId":"`)
			if err != nil {
				return dst, err
			}
			hc.sticky, hc.stTyp, hc.stPre = m, typ, pre
		}
		dst = append(dst, hc.stPre...)
		dst = append(dst, id...)
		return append(dst, "\"}}\n"...), nil
	}
	return marshalLine(handleEnvelope{Cmd: "NODE_HANDLE", Type: typ, Msg: msg})
}

// cachedPrefix encodes the envelope of msg and cuts it where the variable field's value
// starts: the line must end with tail, of which keep stays in the prefix.
func cachedPrefix(typ string, msg any, tail, keep string) ([]byte, error) {
	b, err := json.Marshal(handleEnvelope{Cmd: "NODE_HANDLE", Type: typ, Msg: msg})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadMessage, err)
	}
	if !bytes.HasSuffix(b, []byte(tail)) {
		// The field order of the message types is fixed, so this is a programming error.
		return nil, fmt.Errorf("%w: %s does not end with %s", ErrBadMessage, b, tail)
	}
	return b[:len(b)-len(tail)+len(keep)], nil
}

// plainJSONString reports whether s encodes in JSON as itself between quotes (printable
// ASCII without '"', '\\' or the characters json.Marshal escapes for HTML).
func plainJSONString(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

func marshalLine(msg any) ([]byte, error) {
	b, err := json.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadMessage, err)
	}
	return append(b, '\n'), nil
}

// writeLine writes one line, with conn's fd attached to its first byte when conn is non-nil.
// A failed write closes the channel (the stream position is unknown, or the child is gone or
// not reading); an unusable conn closes nothing.
func (c *Channel) writeLine(line []byte, conn syscall.Conn) error {
	return c.writeLineWithin(line, conn, c.cfg.AckTimeout)
}

// writeLineWithin is writeLine with its own bound on the write.
func (c *Channel) writeLineWithin(line []byte, conn syscall.Conn, timeout time.Duration) error {
	var rc syscall.RawConn
	if conn != nil {
		var err error
		if rc, err = conn.SyscallConn(); err != nil {
			return fmt.Errorf("nodeipc: handle: %w", err)
		}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return c.sendErr()
	default:
	}
	if err := c.setWriteDeadline(timeout); err != nil {
		return c.sendErr()
	}
	var (
		n    int
		werr error
	)
	if rc != nil {
		// The fd is valid only inside the callback, so sendmsg happens there; never File().
		// The callback and its control message are the channel's, built once (under wmu).
		c.wline = line
		cerr := rc.Control(c.sendFD)
		n, werr = c.wn, c.werr
		c.wline, c.werr = nil, nil
		if cerr != nil {
			return fmt.Errorf("nodeipc: handle: %w", cerr)
		}
	} else {
		n, werr = c.uc.Write(line)
	}
	if werr == nil && n < len(line) {
		// A stream socket may take a long line in parts; the fd went with the first part.
		_, werr = c.uc.Write(line[n:])
	}
	if werr != nil {
		err := fmt.Errorf("nodeipc: write to child: %w", werr)
		c.closeWith(err)
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return nil
}

// setWriteDeadline bounds the next write by about timeout (wmu held). The deadline is moved
// only when the one set before is less than half of it away, or further than it: a new
// deadline per write would reset a runtime timer every handoff, and each reset may wake
// the runtime's poller.
func (c *Channel) setWriteDeadline(timeout time.Duration) error {
	now := time.Now()
	if left := c.wdeadline.Sub(now); left >= timeout/2 && left <= timeout {
		return nil
	}
	c.wdeadline = now.Add(timeout)
	return c.uc.SetWriteDeadline(c.wdeadline)
}

// readLoop reads the child's lines, consumes NODE_HANDLE_ACK/NACK, queues everything else and
// closes the channel when the child goes away or the stream is corrupt.
//
// pending is fed first, as if just read. When stopReader sets a past read deadline, the
// reader returns its incomplete line in c.leftover instead of closing the channel.
func readLoop(c *Channel, done chan struct{}, pending []byte) {
	defer close(done)
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	lr := lineReader{max: c.cfg.MaxLine}
	var cause error
	if len(pending) > 0 {
		cause = lr.push(pending, c.handleLine)
	}
	// The reads happen inside one RawRead: a read that returns less than the buffer and
	// no descriptor has drained the socket, so the reader waits for the poller at once
	// instead of trying again for EAGAIN (one system call less each time the worker
	// writes: most wake-ups are one ACK or one answer). Readiness that comes meanwhile is
	// not lost: the poller records it from the start of RawRead on.
	var (
		n, oobn, flags int
		err            error
	)
	read := func(fd uintptr) bool {
		c.readerBusy.Store(true)
		defer c.readerBusy.Store(false)
		for {
			n, oobn, flags, err = platform.RecvmsgNow(int(fd), buf, oob)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN || err == unix.EWOULDBLOCK:
				err = nil
				return false
			case err != nil || n == 0:
				return true
			}
			if oobn > 0 || flags&unix.MSG_CTRUNC != 0 {
				c.dropFDs(oob[:oobn], flags)
			}
			if perr := lr.push(buf[:n], c.handleLine); perr != nil {
				cause = perr
				return true
			}
			if n < len(buf) && oobn == 0 {
				return false
			}
		}
	}
	for cause == nil {
		n, oobn, flags, err = 0, 0, 0, nil
		var rerr error
		if c.ucRaw == nil {
			rerr = net.ErrClosed
		} else {
			rerr = c.ucRaw.Read(read)
		}
		if cause != nil {
			break
		}
		if rerr != nil {
			err = rerr
		} else if err != nil {
			err = os.NewSyscallError("recvmsg", err)
		}
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && c.stopping.Load() {
			c.mu.Lock()
			c.stopped = true
			c.leftover = append([]byte(nil), lr.buf...)
			c.mu.Unlock()
			return
		}
		switch {
		case errors.Is(err, io.EOF) || (err == nil && n == 0):
			cause = io.EOF
		case err != nil:
			cause = fmt.Errorf("nodeipc: read from child: %w", err)
		}
	}
	if errors.Is(cause, ErrLineTooLong) || errors.Is(cause, ErrBadMessage) {
		c.log.Error("nodeipc: closing channel", "err", cause)
	}
	c.closeWith(cause)
	c.mu.Lock()
	if c.inflight {
		c.inflight = false
	}
	// A piped handle's Deliver sees the channel closed; its turn is never given back
	// (every later send fails on Done).
	c.piped = pipedHandle{}
	if c.ackFire != nil {
		c.ackFire.Stop()
		c.ackArmed = false
	}
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// dropFDs closes every fd the child sent us: the parent accepts no handles.
func (c *Channel) dropFDs(oob []byte, flags int) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err == nil {
		for i := range msgs {
			fds, err := unix.ParseUnixRights(&msgs[i])
			if err != nil {
				continue
			}
			for _, fd := range fds {
				unix.Close(fd)
			}
			if len(fds) > 0 {
				c.log.Warn("nodeipc: child sent a handle; the parent does not accept handles, closed it", "fds", len(fds))
			}
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		c.log.Warn("nodeipc: control data truncated (MSG_CTRUNC) on the channel")
	}
}

// handleLine is called by the reader for every complete line.
func (c *Channel) handleLine(line []byte) error {
	// Node writes its ACK and NACK as exactly these bytes (JSON.stringify): one per handle,
	// so they skip decoding.
	switch {
	case bytes.Equal(line, ackLine[:len(ackLine)-1]):
		c.handleAck("NODE_HANDLE_ACK")
		return nil
	case bytes.Equal(line, nackLine):
		c.handleAck("NODE_HANDLE_NACK")
		return nil
	}
	if f := c.replyTo.Load(); f != nil {
		if seq, accepted, ok := parseNewconnReply(line); ok && (*f)(seq, accepted) {
			return nil
		}
	}
	m, err := parseMessage(line)
	if err != nil {
		return err
	}
	if m.Raw == nil { // blank line
		return nil
	}
	switch m.Cmd {
	case "NODE_HANDLE_ACK", "NODE_HANDLE_NACK":
		c.handleAck(m.Cmd)
		return nil
	case "NODE_HANDLE":
		// The child sent us a handle (its fd, if any, was closed in dropFDs). ACK it so that
		// the child's own one-handle-in-flight queue moves on, then pass the message up.
		if err := c.writeAck(); err != nil {
			return nil // the channel is closed; the loop ends on the next read
		}
	}
	c.enqueue(m)
	return nil
}

// parseNewconnReply recognises a worker's answer to newconn exactly as Node's cluster
// child writes it — {"cmd":"NODE_CLUSTER","ack":<seq>,"accepted":<bool>,"seq":<n>} — and
// nothing else (any other spelling takes the general path).
func parseNewconnReply(line []byte) (seq int, accepted bool, ok bool) {
	const pre = `{"cmd":"NODE_CLUSTER","ack":`
	if !bytes.HasPrefix(line, []byte(pre)) {
		return 0, false, false
	}
	p := line[len(pre):]
	i := 0
	for i < len(p) && i < 15 && p[i] >= '0' && p[i] <= '9' {
		seq = seq*10 + int(p[i]-'0')
		i++
	}
	if i == 0 || (i > 1 && p[0] == '0') {
		return 0, false, false
	}
	p = p[i:]
	switch {
	case bytes.HasPrefix(p, []byte(`,"accepted":true`)):
		accepted, p = true, p[len(`,"accepted":true`):]
	case bytes.HasPrefix(p, []byte(`,"accepted":false`)):
		p = p[len(`,"accepted":false`):]
	default:
		return 0, false, false
	}
	if bytes.HasPrefix(p, []byte(`,"seq":`)) {
		p = p[len(`,"seq":`):]
		j := 0
		for j < len(p) && j < 15 && p[j] >= '0' && p[j] <= '9' {
			j++
		}
		if j == 0 {
			return 0, false, false
		}
		p = p[j:]
	}
	if len(p) != 1 || p[0] != '}' {
		return 0, false, false
	}
	return seq, accepted, true
}

var (
	ackLine  = []byte(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
	nackLine = []byte(`{"cmd":"NODE_HANDLE_NACK"}`)
)

// handleAck passes an ACK or NACK to the handle in flight.
func (c *Channel) handleAck(cmd string) {
	c.mu.Lock()
	if c.piped.active {
		c.pipedAck(cmd == "NODE_HANDLE_ACK")
		return
	}
	inflight := c.inflight
	c.inflight = false
	c.mu.Unlock()
	if !inflight {
		c.log.Warn("nodeipc: unexpected handle acknowledgement", "cmd", cmd)
		return
	}
	c.ack <- cmd == "NODE_HANDLE_ACK" // capacity 1, one value per handle in flight
}

func (c *Channel) writeAck() error {
	return c.writeLine(ackLine, nil)
}

// parseMessage decodes one line. A blank line gives a zero Message and no error.
func parseMessage(line []byte) (Message, error) {
	if m, ok := parseMessageFast(line); ok {
		return m, nil
	}
	return parseMessageSlow(line)
}

// parseMessageSlow is parseMessage by encoding/json alone; parseMessageFast must agree with it.
func parseMessageSlow(line []byte) (Message, error) {
	i := 0
	for i < len(line) && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r') {
		i++
	}
	if i == len(line) {
		return Message{}, nil
	}
	if !json.Valid(line) {
		return Message{}, fmt.Errorf("%w: line of %d bytes is not JSON", ErrBadMessage, len(line))
	}
	m := Message{Raw: json.RawMessage(append([]byte(nil), line...))}
	if line[i] != '{' {
		return m, nil
	}
	var h struct {
		Cmd, Act, Type, Data, Seq, Ack json.RawMessage
	}
	if err := json.Unmarshal(line, &h); err != nil {
		return m, nil
	}
	m.Cmd = rawString(h.Cmd)
	m.Act = rawString(h.Act)
	m.Type = rawString(h.Type)
	m.Data = rawString(h.Data)
	m.Seq = rawInt(h.Seq)
	m.Ack = rawInt(h.Ack)
	return m, nil
}

func rawString(r json.RawMessage) string {
	if len(r) == 0 || r[0] != '"' {
		return ""
	}
	var s string
	if json.Unmarshal(r, &s) != nil {
		return ""
	}
	return s
}

func rawInt(r json.RawMessage) *int {
	if len(r) == 0 {
		return nil
	}
	var f float64
	if json.Unmarshal(r, &f) != nil || f < -(1<<53) || f > 1<<53 || f != float64(int(f)) {
		return nil
	}
	v := int(f)
	return &v
}

// tryTurn takes the turn if nobody holds it (no write in progress, no handle in flight).
func (c *Channel) tryTurn() bool {
	select {
	case <-c.done:
		return false
	default:
	}
	select {
	case c.turn <- struct{}{}:
		return true
	default:
		return false
	}
}

// stopReader stops the reader goroutine without closing the socket and returns the bytes of
// the incomplete line it held. Messages it completed stay in the queue. It fails (with the
// reader gone and the channel closed) when the channel closed first.
func (c *Channel) stopReader() ([]byte, error) {
	c.mu.Lock()
	rd := c.readerDone
	c.stopped, c.leftover = false, nil
	c.mu.Unlock()
	c.stopping.Store(true)
	c.uc.SetReadDeadline(time.Unix(1, 0)) // wakes the blocked read; fails only once closed
	<-rd
	c.stopping.Store(false)
	c.mu.Lock()
	stopped, pending := c.stopped, c.leftover
	c.stopped, c.leftover = false, nil
	c.mu.Unlock()
	if !stopped {
		return nil, c.sendErr()
	}
	if err := c.uc.SetReadDeadline(time.Time{}); err != nil {
		c.closeWith(fmt.Errorf("nodeipc: clearing the read deadline: %w", err))
		return nil, c.sendErr()
	}
	return pending, nil
}

// restartReader undoes stopReader.
func (c *Channel) restartReader(pending []byte) {
	done := make(chan struct{})
	c.mu.Lock()
	c.readerDone = done
	c.mu.Unlock()
	go readLoop(c, done, pending)
}

// parseMessageFast decodes the lines a Node worker sends all the time — JSON objects whose
// keys are plain and whose cmd/act/type/data/seq/ack values are plain strings and integers —
// without reflection, with the same result as parseMessageSlow. ok is false for anything
// else (not an object, an escaped or differently cased key, a string with escapes or
// non-ASCII bytes), which then takes the general path. Invalid JSON is never ok.
func parseMessageFast(line []byte) (m Message, ok bool) {
	i := skipSpace(line, 0)
	if i == len(line) || line[i] != '{' || !json.Valid(line) {
		return Message{}, false
	}
	var raw [6][]byte // cmd, act, type, data, seq, ack; the last of a repeated key wins, as in encoding/json
	i = skipSpace(line, i+1)
	for i < len(line) && line[i] != '}' {
		// A key: the input is valid JSON, so it is a string here.
		ks := i + 1
		ke := ks
		for line[ke] != '"' {
			if line[ke] == '\\' || line[ke] >= 0x80 {
				return Message{}, false
			}
			ke++
		}
		key := line[ks:ke]
		i = skipSpace(line, ke+1) + 1 // past ':'
		vs := skipSpace(line, i)
		ve := skipValue(line, vs)
		f := -1
		switch string(key) {
		case "cmd":
			f = 0
		case "act":
			f = 1
		case "type":
			f = 2
		case "data":
			f = 3
		case "seq":
			f = 4
		case "ack":
			f = 5
		default:
			// encoding/json matches field names case-insensitively.
			for _, n := range [...]string{"cmd", "act", "type", "data", "seq", "ack"} {
				if bytes.EqualFold(key, []byte(n)) {
					return Message{}, false
				}
			}
		}
		if f >= 0 {
			raw[f] = line[vs:ve]
		}
		i = skipSpace(line, ve)
		if line[i] == ',' {
			i = skipSpace(line, i+1)
		}
	}
	var strs [4]string
	for f := range strs {
		s, ok := plainString(raw[f])
		if !ok {
			return Message{}, false
		}
		strs[f] = s
	}
	var ints *[2]int // one allocation for seq and ack
	for f := 4; f < 6; f++ {
		if raw[f] == nil {
			continue
		}
		v, ok := plainInt(raw[f])
		if !ok {
			return Message{}, false
		}
		if ints == nil {
			ints = new([2]int)
		}
		ints[f-4] = v
		if f == 4 {
			m.Seq = &ints[0]
		} else {
			m.Ack = &ints[1]
		}
	}
	m.Raw = json.RawMessage(bytes.Clone(line))
	m.Cmd, m.Act, m.Type, m.Data = strs[0], strs[1], strs[2], strs[3]
	return m, true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}

// skipValue returns the end of the JSON value starting at b[i]; b is valid JSON.
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		for i++; b[i] != '"'; i++ {
			if b[i] == '\\' {
				i++
			}
		}
		return i + 1
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = skipValue(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return i
	}
	for i < len(b) && !bytes.ContainsRune([]byte(",}] \t\r\n"), rune(b[i])) {
		i++
	}
	return i
}

// plainString is rawString for a value without escapes or non-ASCII bytes (absent or not a
// string: ""); the values Node sends every handoff come back without allocating.
func plainString(r []byte) (string, bool) {
	if len(r) == 0 || r[0] != '"' {
		return "", true
	}
	s := r[1 : len(r)-1]
	for _, c := range s {
		if c == '\\' || c >= 0x80 {
			return "", false
		}
	}
	switch string(s) {
	case "NODE_CLUSTER":
		return "NODE_CLUSTER", true
	case "NODE_HANDLE":
		return "NODE_HANDLE", true
	case "":
		return "", true
	}
	return string(s), true
}

// plainInt is rawInt for an integer of at most 15 digits (exact in a float64).
func plainInt(r []byte) (int, bool) {
	d := r
	neg := len(d) > 0 && d[0] == '-'
	if neg {
		d = d[1:]
	}
	if len(d) == 0 || len(d) > 15 {
		return 0, false
	}
	v := 0
	for _, c := range d {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + int(c-'0')
	}
	if neg {
		v = -v
	}
	return v, true
}
