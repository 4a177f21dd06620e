//go:build unix

package nodeipc

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// relayWorker is a Primary on a fake channel, taking part in a Relay.
type relayWorker struct {
	p    *Primary
	peer *fakePeer
	done chan struct{} // closed when Run returns
}

func startRelayWorker(t *testing.T, r *Relay, configure ...func(*Primary)) *relayWorker {
	t.Helper()
	return startRelayWorkerCfg(t, r, Config{}, configure...)
}

func startRelayWorkerCfg(t *testing.T, r *Relay, cfg Config, configure ...func(*Primary)) *relayWorker {
	t.Helper()
	ch, peer := newFakeChannel(t, cfg)
	w := &relayWorker{p: &Primary{Channel: ch, Relay: r}, peer: peer, done: make(chan struct{})}
	for _, f := range configure {
		f(w.p)
	}
	go func() {
		defer close(w.done)
		w.p.Run(context.Background())
	}()
	t.Cleanup(func() {
		ch.Close()
		<-w.done
	})
	return w
}

// adapterLine is a message as NodeClusterAdapter's process.send writes it in JSON mode.
func adapterLine(typ int, uid string, extra string) string {
	s := fmt.Sprintf(`{"type":%d,"uid":%q,"nsp":"/","source":"_sio_adapter"`, typ, uid)
	if extra != "" {
		s += "," + extra
	}
	return s + "}\n"
}

// expectLine reads the next line the worker receives and compares it.
func (w *relayWorker) expectLine(t *testing.T, want string) {
	t.Helper()
	got, _, err := w.peer.readLine(5 * time.Second)
	if err != nil {
		t.Fatalf("waiting for %q: %v", want, err)
	}
	if got+"\n" != want {
		t.Fatalf("worker got %q, want %q", got, want)
	}
}

// expectNothing checks that the worker receives nothing within d.
func (w *relayWorker) expectNothing(t *testing.T, d time.Duration) {
	t.Helper()
	if got, _, err := w.peer.readLine(d); err == nil {
		t.Fatalf("worker got %q, want nothing", got)
	}
}

// TestRelayRoutesLikeSetupPrimary: broadcasts go to every other worker, byte for byte;
// FETCH_SOCKETS/SERVER_SIDE_EMIT responses go to the worker that sent the request's uid
// only; other processes' messages are not relayed.
func TestRelayRoutesLikeSetupPrimary(t *testing.T) {
	r := &Relay{}
	a, b, c := startRelayWorker(t, r), startRelayWorker(t, r), startRelayWorker(t, r)
	waitMembers(t, r, 3)

	// A Buffer in JSON mode, an odd key order and spacing: relayed as received.
	bcast := `{"source":"_sio_adapter","uid":"ua","nsp":"/","type":3,  "data":{"packet":{"type":2,"data":["x",{"type":"Buffer","data":[1,2]}],"nsp":"/"},"opts":{"rooms":[],"except":[],"flags":{}}}}` + "\n"
	a.peer.write(bcast)
	b.expectLine(t, bcast)
	c.expectLine(t, bcast)

	// b and c make themselves known (heartbeats), then a asks and both answer.
	hb := adapterLine(2, "ub", "")
	b.peer.write(hb)
	a.expectLine(t, hb)
	c.expectLine(t, hb)
	hc := adapterLine(2, "uc", "")
	c.peer.write(hc)
	a.expectLine(t, hc)
	b.expectLine(t, hc)

	fetch := adapterLine(7, "ua", `"data":{"requestId":"r1","opts":{"rooms":[],"except":[],"flags":{}}}`)
	a.peer.write(fetch)
	b.expectLine(t, fetch)
	c.expectLine(t, fetch)
	for _, typ := range []int{8, 10, 11, 12} {
		resp := adapterLine(typ, "ub", `"data":{"requestId":"r1"},"requesterUid":"ua"`)
		b.peer.write(resp)
		a.expectLine(t, resp)
	}
	// A response to an unknown requester goes nowhere.
	b.peer.write(adapterLine(8, "ub", `"data":{"requestId":"r2","sockets":[]},"requesterUid":"nobody"`))

	// Not the adapter's: stays with the worker's own primary (an Event), relayed to nobody.
	b.peer.write(`{"source":"other","type":3,"uid":"ub"}` + "\n")
	b.peer.write(`{"cmd":"app","text":"_sio_adapter"}` + "\n")
	marker := adapterLine(2, "ub", `"n":"marker"`)
	b.peer.write(marker)
	a.expectLine(t, marker) // nothing came before it
	c.expectLine(t, marker)
	for range 2 {
		select {
		case e := <-b.p.Events():
			if e.Kind != EventMessage {
				t.Errorf("event %v, want EventMessage", e.Kind)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("non-adapter message not passed up as an Event")
		}
	}
	b.expectNothing(t, 100*time.Millisecond)
	// The writers count a copy once written: the last count may trail the last read.
	deadline := time.Now().Add(5 * time.Second)
	for tot := r.Totals(); tot.Relayed != 2+2+2+2+4+2 || tot.Dropped != 1; tot = r.Totals() {
		if time.Now().After(deadline) {
			t.Fatalf("totals %+v, want 14 relayed, 1 dropped", tot)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitMembers(t *testing.T, r *Relay, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for r.Totals().Workers != n {
		if time.Now().After(deadline) {
			t.Fatalf("relay has %d workers, want %d", r.Totals().Workers, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRelayWorkerGoneClosesItsAdapters: when a worker's channel closes, the others get an
// ADAPTER_CLOSE for each of its uids, so their pending requests stop waiting for it; a
// worker that joins later takes part.
func TestRelayWorkerGoneClosesItsAdapters(t *testing.T) {
	r := &Relay{}
	a, b := startRelayWorker(t, r), startRelayWorker(t, r)
	waitMembers(t, r, 2)
	b.peer.write(adapterLine(1, "ub", ""))
	b.peer.write(adapterLine(2, "ub2", `"x":1`)) // a second namespace
	a.expectLine(t, adapterLine(1, "ub", ""))
	a.expectLine(t, adapterLine(2, "ub2", `"x":1`))
	b.peer.uc.Close() // the worker exited
	<-b.done
	got := map[string]bool{}
	for range 2 {
		line, _, err := a.peer.readLine(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var m struct {
			Type   int
			UID    string
			Nsp    string
			Source string
		}
		if err := json.Unmarshal([]byte(line), &m); err != nil || m.Type != 13 || m.Source != "_sio_adapter" || m.Nsp != "/" {
			t.Fatalf("got %q, want an ADAPTER_CLOSE", line)
		}
		got[m.UID] = true
	}
	if !got["ub"] || !got["ub2"] {
		t.Fatalf("ADAPTER_CLOSE for %v, want ub and ub2", got)
	}

	c := startRelayWorker(t, r) // a restarted worker
	waitMembers(t, r, 2)
	init := adapterLine(1, "uc", "")
	c.peer.write(init)
	a.expectLine(t, init)
	hb := adapterLine(2, "ua", "")
	a.peer.write(hb)
	c.expectLine(t, hb)
}

// TestRelaySlowWorkerDoesNotBlockOthers: a worker that stops reading its channel fills its
// own bounded queue; messages for it are then dropped (counted), and the sender's and the
// other workers' traffic keeps flowing. The stalled worker is not disconnected after the ACK
// timeout (a busy event loop is not a hung worker).
func TestRelaySlowWorkerDoesNotBlockOthers(t *testing.T) {
	var mu sync.Mutex
	dropped := 0
	r := &Relay{QueueLen: 8, QueueBytes: 1 << 20, Stats: func(_, d int) {
		mu.Lock()
		dropped += d
		mu.Unlock()
	}}
	cfg := Config{AckTimeout: 100 * time.Millisecond}
	a, b := startRelayWorkerCfg(t, r, cfg), startRelayWorkerCfg(t, r, cfg)
	slow := startRelayWorkerCfg(t, r, cfg) // never reads: its socket buffer fills, then its queue
	waitMembers(t, r, 3)
	stalled := time.Now()
	big := strings.Repeat("x", 64<<10)
	const n = 200
	for i := range n {
		// One message in flight to the reading worker: its own queue never fills (that
		// would drop for it too, rightly), while the stalled worker's does. A relay that
		// blocked on the stalled worker would stall this write, then the read below.
		a.peer.write(adapterLine(3, "ua", fmt.Sprintf(`"i":%d,"pad":%q`, i, big)))
		line, _, err := b.peer.readLine(10 * time.Second)
		if err != nil {
			t.Fatalf("message %d to the reading worker: %v", i, err)
		}
		if !strings.Contains(line, fmt.Sprintf(`"i":%d,`, i)) {
			t.Fatalf("message %d out of order: %.40q", i, line)
		}
	}
	mu.Lock()
	d := dropped
	mu.Unlock()
	if d == 0 {
		t.Fatal("no message dropped for the worker that does not read")
	}
	t.Logf("dropped for the slow worker: %d of %d", d, n)
	if time.Since(stalled) < 10*cfg.AckTimeout {
		time.Sleep(10*cfg.AckTimeout - time.Since(stalled))
	}
	if err := slow.p.Channel.Err(); err != nil {
		t.Errorf("the stalled worker's channel was closed: %v", err)
	}
}

// TestWebSocketsReportAndHandover: the preload's {"cmd":"STICKYD","act":"websockets","n":N}
// sets WebSockets and calls OnWebSockets; the count travels in the handover state; a
// detached worker leaves the relay without the others hearing that its adapter closed, and
// the resumed Primary relays again.
func TestWebSocketsReportAndHandover(t *testing.T) {
	r := &Relay{}
	got := make(chan int64, 4)
	a := startRelayWorker(t, r)
	b := startRelayWorker(t, r, func(p *Primary) { p.OnWebSockets = func(n int64) { got <- n } })
	waitMembers(t, r, 2)

	b.peer.write(`{"cmd":"STICKYD","act":"websockets","n":3}` + "\n")
	select {
	case n := <-got:
		if n != 3 || b.p.WebSockets() != 3 {
			t.Fatalf("OnWebSockets(%d), WebSockets() %d; want 3", n, b.p.WebSockets())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnWebSockets not called")
	}
	hello := adapterLine(1, "ub", "")
	b.peer.write(hello)
	a.expectLine(t, hello)

	st, err := b.p.Detach()
	if err != nil {
		t.Fatal(err)
	}
	<-b.done
	if st.WebSockets != 3 {
		t.Errorf("state WebSockets %d, want 3", st.WebSockets)
	}
	a.expectNothing(t, 200*time.Millisecond) // no ADAPTER_CLOSE: the worker lives on
	waitMembers(t, r, 1)

	p2, err := ResumePrimary(roundTrip(t, st), Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if p2.WebSockets() != 3 {
		t.Errorf("resumed WebSockets() %d, want 3", p2.WebSockets())
	}
	p2.Relay = r
	done := make(chan struct{})
	go func() {
		defer close(done)
		p2.Run(context.Background())
	}()
	t.Cleanup(func() {
		p2.Channel.Close()
		<-done
	})
	waitMembers(t, r, 2)
	hb := adapterLine(2, "ub", "")
	b.peer.write(hb)
	a.expectLine(t, hb)
	ha := adapterLine(2, "ua", "")
	a.peer.write(ha)
	b.expectLine(t, ha)
}

// TestRelayLegacyAdapter: @socket.io/cluster-adapter 0.2.x messages (no uid, their own type
// numbers) are routed as 0.2.x's setupPrimary does: responses to the worker whose
// cluster.worker.id is data.workerId, WORKER_EXIT when a worker goes away.
func TestRelayLegacyAdapter(t *testing.T) {
	r := &Relay{}
	a, b, c := startRelayWorker(t, r), startRelayWorker(t, r), startRelayWorker(t, r)
	waitMembers(t, r, 3)
	legacy := func(typ int, data string) string {
		return fmt.Sprintf(`{"type":%d,"data":%s,"nsp":"/","source":"_sio_adapter"}`, typ, data) + "\n"
	}
	for i, w := range []*relayWorker{a, b, c} {
		init := legacy(1, fmt.Sprint(i+1)) // WORKER_INIT, data: cluster.worker.id
		w.peer.write(init)
		for j, o := range []*relayWorker{a, b, c} {
			if j != i {
				o.expectLine(t, init)
			}
		}
	}
	// FETCH_SOCKETS (8 in 0.2.x) is a request: to everyone else.
	req := legacy(8, `{"requestId":"q","workerId":1,"opts":{}}`)
	a.peer.write(req)
	b.expectLine(t, req)
	c.expectLine(t, req)
	// FETCH_SOCKETS_RESPONSE (9) and SERVER_SIDE_EMIT_RESPONSE (11): to worker 1 only.
	for _, typ := range []int{9, 11} {
		resp := legacy(typ, `{"requestId":"q","workerId":1,"sockets":[]}`)
		c.peer.write(resp)
		a.expectLine(t, resp)
	}
	b.expectNothing(t, 100*time.Millisecond)

	c.peer.uc.Close() // worker 3 exits
	<-c.done
	exit := `{"source":"_sio_adapter","type":3,"data":3}` + "\n"
	a.expectLine(t, exit)
	b.expectLine(t, exit)
}
