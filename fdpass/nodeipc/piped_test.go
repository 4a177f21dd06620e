//go:build unix

package nodeipc

import (
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func newconnFor(seq int) newconnMsg {
	return newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "::3000:4:-1", Seq: seq}
}

// A newconn handle does not wait for its ACK, but nothing else is written to the worker
// until the ACK comes (Node's one handle in flight), and the turn then passes on.
func TestNewconnACKPipelined(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{AckTimeout: 5 * time.Second})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	returned := make(chan error, 1)
	go func() { returned <- ch.SendHandle(context.Background(), "net.Native", newconnFor(7), b) }()
	line, nfd, err := peer.readLine(5 * time.Second)
	if err != nil || nfd != 1 || !strings.Contains(line, `"act":"newconn"`) || !strings.HasSuffix(line, `"seq":7}}`) {
		t.Fatalf("peer: %q, %d fds, %v", line, nfd, err)
	}
	// SendHandle returns with the ACK still outstanding (the peer has not answered).
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SendHandle of a newconn waited for the ACK")
	}
	// A plain message waits for the ACK.
	sent := make(chan error, 1)
	go func() { sent <- ch.Send(map[string]bool{"plain": true}) }()
	if extra, _, err := peer.readLine(200 * time.Millisecond); err == nil {
		t.Fatalf("line written while a handle was in flight: %q", extra)
	}
	select {
	case err := <-sent:
		t.Fatalf("Send returned before the ACK: %v", err)
	default:
	}
	peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
	if line, _, err := peer.readLine(5 * time.Second); err != nil || line != `{"plain":true}` {
		t.Fatalf("after the ACK: %q, %v", line, err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
}

// A NACKed newconn is resent with the same descriptor; after MaxResends NACKs the worker's
// answer is made up as "not accepted", so that Deliver fails at once and the caller keeps
// the connection — and the channel stays usable.
func TestNewconnNACKResentThenRejected(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{MaxResends: 2})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	if err := ch.SendHandle(context.Background(), "net.Native", newconnFor(9), b); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		line, nfd, err := peer.readLine(5 * time.Second)
		if err != nil || nfd != 1 || !strings.HasSuffix(line, `"seq":9}}`) {
			t.Fatalf("attempt %d: %q, %d fds, %v", i+1, line, nfd, err)
		}
		peer.write(`{"cmd":"NODE_HANDLE_NACK"}` + "\n")
	}
	m, err := ch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if m.Cmd != "NODE_CLUSTER" || m.Ack == nil || *m.Ack != 9 || !strings.Contains(string(m.Raw), `"accepted":false`) {
		t.Fatalf("made-up answer %+v (%s), want newconn 9 not accepted", m, m.Raw)
	}
	if err := ch.Send(map[string]string{"after": "nack"}); err != nil {
		t.Fatalf("Send after NACKs: %v", err)
	}
	if line, _, err := peer.readLine(5 * time.Second); err != nil || line != `{"after":"nack"}` {
		t.Fatalf("after NACKs: %q, %v", line, err)
	}
	if _, err := a.Write([]byte("x")); err != nil { // the caller's conn is intact
		t.Fatal(err)
	}
}

// No ACK within AckTimeout: the channel closes with ErrAckTimeout, and later sends fail.
func TestNewconnACKTimeoutClosesChannel(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{AckTimeout: 100 * time.Millisecond})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	if err := ch.SendHandle(context.Background(), "net.Native", newconnFor(1), b); err != nil {
		t.Fatal(err)
	}
	if _, _, err := peer.readLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("channel still open long after the ACK timeout")
	}
	if err := ch.Err(); !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("Err = %v, want ErrAckTimeout", err)
	}
	if err := ch.SendHandle(context.Background(), "net.Native", newconnFor(2), b); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("SendHandle after the timeout: %v", err)
	}
}

// An ACK that comes in time does not let the timer close the channel later.
func TestNewconnACKStopsTimer(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{AckTimeout: 100 * time.Millisecond})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	for seq := 1; seq <= 3; seq++ {
		if err := ch.SendHandle(context.Background(), "net.Native", newconnFor(seq), b); err != nil {
			t.Fatal(err)
		}
		if _, _, err := peer.readLine(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
	}
	if err := ch.Send("sync"); err != nil { // taken only after the last ACK
		t.Fatal(err)
	}
	select {
	case <-ch.Done():
		t.Fatalf("channel closed after every handle was acknowledged: %v", ch.Err())
	case <-time.After(300 * time.Millisecond):
	}
}

// A real Node worker that dies with a handoff in flight and more waiting: every Deliver
// returns an error (none hangs), the callers keep their connections, and no descriptor
// is left behind in the edge.
func TestNodeWorkerDiesWithHandlesInFlight(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{cfg: Config{AckTimeout: 30 * time.Second}}, "listen.js", "3000")
	w.waitReady(t)
	// One handoff first, to see the worker take them.
	{
		a, b := unixPair(t)
		if err := w.p.Deliver(context.Background(), b); err != nil {
			t.Fatal(err)
		}
		b.Close()
		a.Close()
	}
	// Stop the worker so that handles stay in flight, hand it several, then kill it.
	if err := w.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	const n = 4
	errs := make(chan error, n)
	var conns []*struct{ a, b interface{ Close() error } }
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		a, b := unixPair(t)
		conns = append(conns, &struct{ a, b interface{ Close() error } }{a, b})
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- w.p.Deliver(context.Background(), b)
		}()
	}
	// The first Deliver is written (its ACK never comes); the others wait for the turn.
	deadline := time.Now().Add(5 * time.Second)
	for {
		w.ch.mu.Lock()
		inflight := w.ch.piped.active
		w.ch.mu.Unlock()
		if inflight {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no handle went out to the stopped worker")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := w.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Deliver hung after the worker died")
	}
	close(errs)
	for err := range errs {
		if err == nil || !errors.Is(err, ErrClosed) {
			t.Errorf("Deliver to a dead worker: %v, want an error wrapping ErrClosed", err)
		}
	}
	for _, c := range conns { // still the callers' to close
		c.a.Close()
		c.b.Close()
	}
}

func TestParseNewconnReply(t *testing.T) {
	for _, tc := range []struct {
		line     string
		seq      int
		accepted bool
		ok       bool
	}{
		{`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":9}`, 5, true, true},
		{`{"cmd":"NODE_CLUSTER","ack":12,"accepted":false,"seq":13}`, 12, false, true},
		{`{"cmd":"NODE_CLUSTER","ack":0,"accepted":true}`, 0, true, true},
		{`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":9,"x":1}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","ack":05,"accepted":true}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","ack":5.5,"accepted":true}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","ack":5,"accepted":"yes"}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","ack":1234567890123456,"accepted":true}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","act":"listening","ack":5}`, 0, false, false},
		{`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":}`, 0, false, false},
		{` {"cmd":"NODE_CLUSTER","ack":5,"accepted":true}`, 0, false, false},
	} {
		seq, acc, ok := parseNewconnReply([]byte(tc.line))
		if ok != tc.ok || ok && (seq != tc.seq || acc != tc.accepted) {
			t.Errorf("%s: %d %v %v, want %d %v %v", tc.line, seq, acc, ok, tc.seq, tc.accepted, tc.ok)
		}
		if !ok {
			continue
		}
		// Whatever it takes, the general decoder reads the same.
		m, err := parseMessageSlow([]byte(tc.line))
		if err != nil || m.Ack == nil || *m.Ack != seq || strings.Contains(tc.line, `"accepted":true`) != acc {
			t.Errorf("%s: general decoder disagrees: %+v %v", tc.line, m, err)
		}
	}
}

// With a reply taker set (Primary sets one), the reader hands it the newconn answers it
// knows — they never reach the queue — and queues the rest.
func TestNewconnReplyTakenByReader(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{MaxResends: -1})
	got := make(chan [2]int, 4)
	ch.onNewconnReply(func(seq int, accepted bool) bool {
		if seq != 5 {
			return false
		}
		a := 0
		if accepted {
			a = 1
		}
		got <- [2]int{seq, a}
		return true
	})
	peer.write(`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":2}` + "\n" + `{"cmd":"NODE_CLUSTER","ack":6,"accepted":true,"seq":3}` + "\n")
	select {
	case g := <-got:
		if g != [2]int{5, 1} {
			t.Fatalf("taker got %v", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("reply not taken")
	}
	m, err := ch.Recv()
	if err != nil || m.Ack == nil || *m.Ack != 6 {
		t.Fatalf("Recv: %+v, %v; want the reply the taker did not know", m, err)
	}
	// The made-up rejection after the last NACK goes the same way.
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	if err := ch.SendHandle(context.Background(), "net.Native", newconnFor(5), b); err != nil {
		t.Fatal(err)
	}
	if _, _, err := peer.readLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	peer.write(`{"cmd":"NODE_HANDLE_NACK"}` + "\n")
	select {
	case g := <-got:
		if g != [2]int{5, 0} {
			t.Fatalf("taker got %v after the NACK, want 5 not accepted", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("rejection not taken")
	}
}
