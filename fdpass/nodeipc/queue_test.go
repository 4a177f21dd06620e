//go:build unix

package nodeipc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newFakePrimary is a Primary on a fake channel whose app server is listening, as after
// queryServer and "listening".
func newFakePrimary(t *testing.T, cfg Config) (*Primary, *fakePeer) {
	t.Helper()
	ch, peer := newFakeChannel(t, cfg)
	p := &Primary{Channel: ch}
	p.init()
	p.mu.Lock()
	p.appKey, p.appListening = "::3000:4:-1", true
	p.mu.Unlock()
	p.style.Store(int32(StyleListen))
	return p, peer
}

// newFakeHandoff is newFakePrimary with a connection to hand over (b; a is its other end,
// to see that the caller's connection is untouched).
func newFakeHandoff(t *testing.T, cfg Config) (p *Primary, peer *fakePeer, a, b *net.UnixConn) {
	t.Helper()
	p, peer = newFakePrimary(t, cfg)
	a, b = unixPair(t)
	t.Cleanup(func() {
		a.Close()
		b.Close()
	})
	return p, peer, a, b
}

// results collects DeliverFunc answers and fails the test on a second answer to one handoff.
type results struct {
	t  *testing.T
	mu sync.Mutex
	m  map[int]error
	ch chan int
}

func newResults(t *testing.T) *results {
	return &results{t: t, m: map[int]error{}, ch: make(chan int, 2048)}
}

func (r *results) done(i int) func(error) {
	return func(err error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		if _, dup := r.m[i]; dup {
			r.t.Errorf("handoff %d answered twice (%v)", i, err)
		}
		r.m[i] = err
		r.ch <- i
	}
}

// deliver starts handoffs 0..n-1 of conn with DeliverFunc.
func (r *results) deliver(p *Primary, conn syscall.Conn, n int) {
	r.t.Helper()
	for i := range n {
		if err := p.DeliverFunc(conn, r.done(i)); err != nil {
			r.t.Fatalf("handoff %d: %v", i, err)
		}
	}
}

func (r *results) wait(n int) map[int]error {
	r.t.Helper()
	for range n {
		select {
		case <-r.ch:
		case <-time.After(10 * time.Second):
			r.t.Fatalf("only %d of %d handoffs answered", len(r.m), n)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m
}

// seqOf is the seq of a newconn NODE_HANDLE line.
func seqOf(t *testing.T, line string) int {
	t.Helper()
	var seq int
	i := strings.LastIndex(line, `"seq":`)
	if i < 0 {
		t.Fatalf("no seq in %q", line)
	}
	if _, err := fmt.Sscanf(line[i:], `"seq":%d}}`, &seq); err != nil {
		t.Fatalf("seq of %q: %v", line, err)
	}
	return seq
}

// A burst of handoffs is queued at once and goes out one handle at a time, each after the
// ACK of the one before, in order; the worker's answers (one refusal among them) reach the
// right callers once each; a plain message waiting meanwhile is not held back until the
// queue is empty.
func TestDeliverFuncBurstKeepsOneHandleInFlight(t *testing.T) {
	checkFDs(t)
	p, peer, a, b := newFakeHandoff(t, Config{})
	const n = 6
	r := newResults(t)
	r.deliver(p, b, n)
	plain := make(chan error, 1)
	var lines []string
	last := -1
	for len(lines) < n+1 {
		line, _, err := peer.readLine(5 * time.Second)
		if err != nil {
			t.Fatalf("after %q: %v", lines, err)
		}
		lines = append(lines, line)
		if line == `{"plain":true}` {
			continue
		}
		seq := seqOf(t, line)
		if seq <= last {
			t.Fatalf("handle %q after seq %d", line, last)
		}
		last = seq
		if extra, _, err := peer.readLine(50 * time.Millisecond); err == nil {
			t.Fatalf("%q written while handle %d waited for its ACK", extra, seq)
		}
		if len(lines) == 1 {
			go func() { plain <- p.Channel.Send(map[string]bool{"plain": true}) }()
			for p.Channel.plainWaiting.Load() == 0 { // Send is blocked on the turn
				time.Sleep(time.Millisecond)
			}
		}
		accepted := seq != 2
		peer.write(fmt.Sprintf("{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_CLUSTER\",\"ack\":%d,\"accepted\":%v,\"seq\":%d}\n", seq, accepted, 100+seq))
	}
	if err := <-plain; err != nil {
		t.Fatal(err)
	}
	if peer.fds != n { // each with its line: a read stops after the message that carries one
		t.Fatalf("%d descriptors for %d handles", peer.fds, n)
	}
	if i := indexOf(lines, `{"plain":true}`); i < 0 || i > 3 {
		t.Fatalf("plain message at %d of %q: held back behind the queue", i, lines)
	}
	got := r.wait(n)
	for i := range n {
		if (i == 2) != errors.Is(got[i], ErrRejected) || (i != 2 && got[i] != nil) {
			t.Fatalf("handoff %d: %v", i, got[i])
		}
	}
	if _, err := a.Write([]byte("x")); err != nil { // the conn is untouched
		t.Fatal(err)
	}
}

func indexOf(s []string, v string) int {
	for i := range s {
		if s[i] == v {
			return i
		}
	}
	return -1
}

// A Deliver whose context ends while its handle still waits for the turn is withdrawn:
// it fails with the context's error and the worker never sees that handle.
func TestDeliverWithdrawnWhileQueued(t *testing.T) {
	checkFDs(t)
	p, peer, _, b := newFakeHandoff(t, Config{})
	r := newResults(t)
	if err := p.DeliverFunc(b, r.done(0)); err != nil {
		t.Fatal(err)
	}
	first, _, err := peer.readLine(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.Deliver(ctx, b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("queued Deliver: %v, want its context's deadline", err)
	}
	seq := seqOf(t, first)
	peer.write(fmt.Sprintf("{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_CLUSTER\",\"ack\":%d,\"accepted\":true}\n", seq))
	if err := r.wait(1)[0]; err != nil {
		t.Fatal(err)
	}
	if err := p.Channel.Send("after"); err != nil {
		t.Fatal(err)
	}
	if line, _, err := peer.readLine(5 * time.Second); err != nil || line != `"after"` {
		t.Fatalf("after the ACK: %q, %v (want no withdrawn handle)", line, err)
	}
}

// A worker slow to take connections: a handoff that waited its turn longer than
// AckTimeout fails with a deadline (the edge tries another worker) and is never sent,
// while the ones that went out in time complete and the channel stays open.
func TestDeliverFuncQueueWaitBounded(t *testing.T) {
	checkFDs(t)
	const timeout = 300 * time.Millisecond
	p, peer, _, b := newFakeHandoff(t, Config{AckTimeout: timeout})
	r := newResults(t)
	r.deliver(p, b, 3)
	var sent []int
	for {
		line, _, err := peer.readLine(3 * timeout)
		if err != nil {
			break // nothing more comes
		}
		seq := seqOf(t, line)
		sent = append(sent, seq)
		time.Sleep(2 * timeout / 3) // a slow worker: each handle takes 200 ms
		peer.write(fmt.Sprintf("{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_CLUSTER\",\"ack\":%d,\"accepted\":true}\n", seq))
	}
	got := r.wait(3)
	if len(sent) != 2 || got[0] != nil || got[1] != nil || !errors.Is(got[2], context.DeadlineExceeded) {
		t.Fatalf("sent %v; answers %v", sent, got)
	}
	select {
	case <-p.Channel.Done():
		t.Fatalf("channel closed: %v", p.Channel.Err())
	default:
	}
}

// The worker dies with one handle in flight and more queued: every handoff is answered
// once with the channel's error, and none is left waiting.
func TestDeliverFuncWorkerDiesWithQueue(t *testing.T) {
	checkFDs(t)
	p, peer, _, b := newFakeHandoff(t, Config{AckTimeout: 30 * time.Second})
	r := newResults(t)
	r.deliver(p, b, 4)
	if _, _, err := peer.readLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	peer.uc.Close()
	for i, err := range r.wait(4) {
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("handoff %d: %v, want ErrClosed", i, err)
		}
	}
	if err := p.DeliverFunc(b, r.done(9)); !errors.Is(err, ErrClosed) {
		t.Fatalf("DeliverFunc after the worker died: %v", err)
	}
}

// A worker that stops taking handles: past maxQueuedHandles a handoff fails at once with
// ErrBacklog instead of queueing without bound.
func TestDeliverFuncBacklogBounded(t *testing.T) {
	checkFDs(t)
	p, peer, _, b := newFakeHandoff(t, Config{AckTimeout: 30 * time.Second})
	r := newResults(t)
	r.deliver(p, b, maxQueuedHandles+1) // one in flight, the rest queued
	if err := p.DeliverFunc(b, r.done(-1)); !errors.Is(err, ErrBacklog) {
		t.Fatalf("one more: %v, want ErrBacklog", err)
	}
	peer.uc.Close()
	if got := r.wait(maxQueuedHandles + 1); len(got) != maxQueuedHandles+1 {
		t.Fatalf("%d answers", len(got))
	}
}

// A worker that keeps sending answers to newconns the edge never sent (a buggy or hostile
// app) while the edge detaches for an upgrade: Detach must not wait on the reader that
// handles them while the reader waits on Detach.
func TestDetachWhileWorkerSendsStrayAnswers(t *testing.T) {
	checkFDs(t)
	p, peer := newFakePrimary(t, Config{})
	stop := make(chan struct{})
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := 1000; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			peer.uc.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := fmt.Fprintf(peer.uc, "{\"cmd\":\"NODE_CLUSTER\",\"ack\":%d,\"accepted\":true}\n", i); err != nil {
				return
			}
		}
	}()
	detached := make(chan error, 1)
	var st PrimaryState
	go func() {
		var err error
		for try := 0; try < 100; try++ { // ErrBusy is fine: the stray answers may hold the turn
			if st, err = p.Detach(); !errors.Is(err, ErrBusy) {
				break
			}
		}
		detached <- err
	}()
	select {
	case err := <-detached:
		close(stop)
		<-wrote
		if err != nil {
			t.Fatal(err)
		}
		syscall.Close(st.FD)
	case <-time.After(10 * time.Second):
		close(stop)
		t.Fatal("Detach hung while the worker sent answers nobody waited for")
	}
}

// A worker that does not read its channel while the reader sends the next queued handle:
// the reader must not wait for room in the socket (it would stop reading the worker's
// messages); the handle goes out from a goroutine once the worker reads again.
func TestReaderSendsHandleToFullSocketWithoutBlocking(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	// Fill the socket from the edge's side with lines the worker will read first.
	raw, err := ch.uc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	filler := []byte(strings.Repeat(`"filler"`+"\n", 512))
	filled := 0
	raw.Write(func(fd uintptr) bool {
		for {
			n, err := unix.Write(int(fd), filler)
			if err != nil {
				return true // EAGAIN: full
			}
			filled += n
		}
	})
	if filled == 0 {
		t.Fatal("could not fill the socket")
	}
	if !ch.tryTurn() {
		t.Fatal("turn taken")
	}
	returned := make(chan error, 1)
	go func() {
		returned <- ch.startNewconn(queuedNewconn{typ: "net.Native", msg: newconnFor(3), seq: 3, conn: b}, true)
	}()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the reader's send waited for room in a full socket")
	}
	// The worker reads again: the filler, then the handle with its descriptor.
	got := 0
	for {
		line, _, err := peer.readLine(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d filler bytes: %v", got, err)
		}
		if line == `"filler"` {
			got += len(line) + 1
			continue
		}
		if seqOf(t, line) != 3 || peer.fds != 1 || got != filled {
			t.Fatalf("%q with %d descriptors after %d of %d filler bytes", line, peer.fds, got, filled)
		}
		break
	}
}

// A worker that ACKs a handle and dies at once, with another handle queued: the reader
// sends the queued one from inside its read, the write fails, and the channel closes —
// from inside the read whose end the socket's Close waits for. Every handoff must still
// be answered (the reader hung before).
func TestWorkerDiesRightAfterACKWithHandleQueued(t *testing.T) {
	checkFDs(t)
	p, peer, _, b := newFakeHandoff(t, Config{AckTimeout: 30 * time.Second})
	r := newResults(t)
	r.deliver(p, b, 2)
	if _, _, err := peer.readLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
	peer.uc.Close()
	for i, err := range r.wait(2) {
		if err == nil {
			t.Fatalf("handoff %d succeeded on a dead worker", i)
		}
	}
	select {
	case <-p.Channel.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed")
	}
}
