//go:build unix

package workers

import (
	"context"
	"errors"
	"testing"
	"time"
)

func gateWorker(slot int) *Worker { return newWorker(slot, 0, nil, time.Second) }

// acquireAsync starts an Acquire and returns where its result arrives, once it waits.
func acquireAsync(t *testing.T, g *Gate, ctx context.Context) <-chan *Worker {
	t.Helper()
	before, _ := g.Waiting()
	out := make(chan *Worker, 1)
	go func() {
		w, err := g.Acquire(ctx, nil)
		if err != nil {
			w = nil
		}
		out <- w
	}()
	deadline := time.Now().Add(5 * time.Second)
	for n, _ := g.Waiting(); n != before+1; n, _ = g.Waiting() {
		if time.Now().After(deadline) {
			t.Fatal("request never queued")
		}
		time.Sleep(time.Millisecond)
	}
	return out
}

func TestGateConcurrencyAndFIFO(t *testing.T) {
	g := &Gate{Name: "p", Concurrency: 2, MaxQueue: 3, Timeout: time.Minute}
	w := gateWorker(1)
	g.Join(w)
	ctx := context.Background()
	for range 2 {
		if got, err := g.Acquire(ctx, nil); got != w || err != nil {
			t.Fatalf("Acquire with room: %v, %v", got, err)
		}
	}
	first := acquireAsync(t, g, ctx)
	second := acquireAsync(t, g, ctx)
	third := acquireAsync(t, g, ctx)
	if _, err := g.Acquire(ctx, nil); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("over the queue: %v, want ErrQueueFull", err)
	}
	g.Release(w)
	select {
	case got := <-first:
		if got != w {
			t.Fatalf("first waiter got %v", got)
		}
	case <-second:
		t.Fatal("the second waiter overtook the first")
	case <-time.After(5 * time.Second):
		t.Fatal("release woke nobody")
	}
	if w.InFlight() != 2 {
		t.Fatalf("in flight %d after a handover of room, want 2", w.InFlight())
	}
	// A new worker takes the rest of the queue at once.
	w2 := gateWorker(2)
	g.Join(w2)
	for _, ch := range []<-chan *Worker{second, third} {
		if got := <-ch; got != w2 {
			t.Fatalf("queued request went to %v, want the joining worker", got)
		}
	}
	if n, _ := g.Waiting(); n != 0 || w2.InFlight() != 2 {
		t.Fatalf("waiting %d, new worker in flight %d", n, w2.InFlight())
	}
}

func TestGateTimeoutAndCancel(t *testing.T) {
	g := &Gate{Name: "p", Concurrency: 1, Timeout: 50 * time.Millisecond}
	w := gateWorker(1)
	g.Join(w)
	g.Acquire(context.Background(), nil)
	if _, err := g.Acquire(context.Background(), nil); !errors.Is(err, ErrQueueTimeout) {
		t.Fatalf("wait past the timeout: %v", err)
	}
	g.Timeout = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	ch := acquireAsync(t, g, ctx)
	cancel()
	if got := <-ch; got != nil {
		t.Fatalf("cancelled wait got %v", got)
	}
	if n, _ := g.Waiting(); n != 0 {
		t.Fatalf("%d still waiting after cancel", n)
	}
	g.Release(w)
	if w.InFlight() != 0 {
		t.Fatalf("in flight %d after release with nobody waiting", w.InFlight())
	}
}

func TestGateAnyWorkerAndSkip(t *testing.T) {
	g := &Gate{Name: "p", Concurrency: 1, Timeout: time.Minute}
	got := make(chan *Worker, 1)
	go func() { w, _ := g.AcquireAny(context.Background(), nil); got <- w }()
	deadline := time.Now().Add(5 * time.Second)
	for n, _ := g.Waiting(); n != 1; n, _ = g.Waiting() {
		if time.Now().After(deadline) {
			t.Fatal("WebSocket never queued")
		}
		time.Sleep(time.Millisecond)
	}
	if all, forRoom := g.Waiting(); all != 1 || forRoom != 0 {
		t.Fatalf("waiting %d (for room %d), want 1 (0): a WebSocket needs a worker, not room", all, forRoom)
	}
	w1 := gateWorker(1)
	w1.BeginRequest() // full: a WebSocket still gets it
	g.Join(w1)
	if w := <-got; w != w1 || w1.InFlight() != 1 {
		t.Fatalf("WebSocket got %v (in flight %d)", w, w1.InFlight())
	}
	w1.EndRequest()
	w2 := gateWorker(2)
	g.Join(w2)
	for range 10 {
		w, err := g.Acquire(context.Background(), func(w *Worker) bool { return w == w1 })
		if err != nil || w != w2 {
			t.Fatalf("skip: got %v, %v; want the other worker", w, err)
		}
		g.Release(w)
	}
	w1.SetState(StateDraining)
	if w, _ := g.Acquire(context.Background(), nil); w != w2 {
		t.Fatalf("a draining worker was picked")
	}
}

// A request retried after failing on a worker (its skip excludes that worker) does not
// hold up the queue behind it when that worker is the one with room.
func TestGateRetriedRequestDoesNotBlockTheQueue(t *testing.T) {
	g := &Gate{Name: "p", Concurrency: 1, Timeout: time.Minute}
	w1 := gateWorker(1)
	g.Join(w1)
	g.Acquire(context.Background(), nil) // w1 full
	retried := make(chan *Worker, 1)
	go func() {
		w, _ := g.Acquire(context.Background(), func(w *Worker) bool { return w == w1 })
		retried <- w
	}()
	deadline := time.Now().Add(5 * time.Second)
	for n, _ := g.Waiting(); n != 1; n, _ = g.Waiting() {
		if time.Now().After(deadline) {
			t.Fatal("retried request never queued")
		}
		time.Sleep(time.Millisecond)
	}
	behind := acquireAsync(t, g, context.Background())
	g.Release(w1)
	select {
	case w := <-behind:
		if w != w1 {
			t.Fatalf("the request behind got %v", w)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the request behind the retried one was held up")
	}
	w2 := gateWorker(2)
	g.Join(w2)
	if w := <-retried; w != w2 {
		t.Fatalf("the retried request got %v, want the other worker", w)
	}
}
