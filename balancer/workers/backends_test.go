//go:build unix

package workers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestParseBackend(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want BackendSpec
		bad  bool
	}{
		{in: "127.0.0.1:3000", want: BackendSpec{Network: "tcp", Address: "127.0.0.1:3000"}},
		{in: ":3000", want: BackendSpec{Network: "tcp", Address: "127.0.0.1:3000"}},
		{in: "[::1]:3000", want: BackendSpec{Network: "tcp", Address: "[::1]:3000"}},
		{in: "app:80", want: BackendSpec{Network: "tcp", Address: "app:80"}},
		{in: "unix:/run/app.sock", want: BackendSpec{Network: "unix", Address: "/run/app.sock"}},
		{in: "dns:app.default.svc:3000", want: BackendSpec{DNSName: "app.default.svc", DNSPort: "3000"}},
		{in: "unix:", bad: true},
		{in: "app", bad: true},
		{in: "dns:app", bad: true},
		{in: "dns::3000", bad: true},
		{in: "dns:app:http", bad: true},
	} {
		got, err := ParseBackend(tt.in)
		if tt.bad {
			if !errors.Is(err, ErrBadBackend) {
				t.Errorf("ParseBackend(%q) = %+v, %v; want ErrBadBackend", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseBackend(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
}

func quietLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// routedAddrs lists the backends in routing by slot.
func (e *fakeEdge) routedAddrs() map[int]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[int]string{}
	for slot, w := range e.routed {
		out[slot] = w.Channel().(*BackendChannel).Address
	}
	return out
}

func (e *fakeEdge) worker(slot int) *Worker {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.routed[slot]
}

// eventually polls cond (routing changes have no signal of their own) for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// acceptAll accepts and closes connections on ln until it is closed.
func acceptAll(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

// loopbackSamePort listens on 127.0.0.1, .2 and .3 with one port: three DNS "records".
func loopbackSamePort(t *testing.T) (port string, lns []net.Listener) {
	t.Helper()
	for range 20 {
		first, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ = net.SplitHostPort(first.Addr().String())
		lns = []net.Listener{first}
		for _, h := range []string{"127.0.0.2", "127.0.0.3"} {
			ln, err := net.Listen("tcp", net.JoinHostPort(h, port))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		if len(lns) == 3 {
			for _, ln := range lns {
				go acceptAll(ln)
				t.Cleanup(func() { ln.Close() })
			}
			return port, lns
		}
		for _, ln := range lns {
			ln.Close()
		}
	}
	t.Fatal("no port free on 127.0.0.1-3")
	return "", nil
}

// TestBackendsDNSReResolution: every record of a dns: backend is a backend; a record that
// disappears takes only its own slot out, a new one is routed, a failed lookup changes
// nothing.
func TestBackendsDNSReResolution(t *testing.T) {
	port, _ := loopbackSamePort(t)
	var mu sync.Mutex
	records := []string{"127.0.0.1", "127.0.0.2"}
	var fail atomic.Bool
	lookups := make(chan struct{}, 100)
	e := newFakeEdge(quietLog(t))
	bs := &Backends{Edge: e, Addrs: []string{"dns:app.test:" + port}, ResolveInterval: 10 * time.Millisecond,
		HealthInterval: 50 * time.Millisecond, Logger: quietLog(t),
		Lookup: func(_ context.Context, host string) ([]netip.Addr, error) {
			defer func() {
				select {
				case lookups <- struct{}{}:
				default:
				}
			}()
			if host != "app.test" {
				return nil, errors.New("unexpected name " + host)
			}
			if fail.Load() {
				return nil, errors.New("no such host")
			}
			mu.Lock()
			defer mu.Unlock()
			var out []netip.Addr
			for _, r := range records {
				out = append(out, netip.MustParseAddr(r))
			}
			return out, nil
		}}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); bs.Wait() }()
	if err := bs.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-bs.Settled()
	a1, a2, a3 := net.JoinHostPort("127.0.0.1", port), net.JoinHostPort("127.0.0.2", port), net.JoinHostPort("127.0.0.3", port)
	eventually(t, "both records routed", func() bool {
		r := e.routedAddrs()
		return len(r) == 2 && r[0] == a1 && r[1] == a2
	})
	w0 := e.worker(0)

	// The second record goes away: its slot leaves routing, the first keeps its worker.
	mu.Lock()
	records = []string{"127.0.0.1"}
	mu.Unlock()
	eventually(t, "the gone record's backend out of routing", func() bool { return len(e.routedAddrs()) == 1 })
	if e.worker(0) != w0 {
		t.Fatalf("the remaining backend's worker was replaced: its sessions would be lost")
	}

	// A lookup that fails keeps what there is.
	fail.Store(true)
	for range 3 {
		<-lookups
	}
	if r := e.routedAddrs(); len(r) != 1 || r[0] != a1 {
		t.Fatalf("after failed lookups: %v", r)
	}
	fail.Store(false)

	// A new record is routed, in the lowest free slot.
	mu.Lock()
	records = []string{"127.0.0.3", "127.0.0.1"}
	mu.Unlock()
	eventually(t, "the new record routed", func() bool {
		r := e.routedAddrs()
		return len(r) == 2 && r[1] == a3
	})
	if e.worker(0) != w0 {
		t.Fatalf("the first backend's worker was replaced")
	}
}

// TestBackendsPassiveHealth: a refused connection takes the backend out at once (its
// sessions with it); once it listens again a probe puts it back.
func TestBackendsPassiveHealth(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	go acceptAll(ln)
	e := newFakeEdge(quietLog(t))
	bs := &Backends{Edge: e, Addrs: []string{addr}, HealthInterval: time.Hour, Logger: quietLog(t)}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); bs.Wait() }()
	if err := bs.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-bs.Settled()
	w := e.worker(0)
	if w == nil {
		t.Fatalf("backend not routed after its first probe")
	}
	c, err := w.DialVirtual(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*net.TCPConn); !ok {
		t.Fatalf("DialVirtual gave a %T, want the TCP connection itself (io.Copy splices between two)", c)
	}
	c.Close()

	ln.Close()
	_, err = w.DialVirtual(context.Background())
	if !errors.Is(err, ErrBackendDown) {
		t.Fatalf("dial to a closed port: %v, want ErrBackendDown", err)
	}
	if e.worker(0) != nil || w.State() != StateGone {
		t.Fatalf("a refused dial left the backend in routing (state %v)", w.State())
	}
	select {
	case <-w.Channel().Done():
	default:
		t.Fatal("the ejected backend's channel is not done")
	}

	// Back on the same port: the probes (backing off from 100 ms) put it in again.
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	defer ln2.Close()
	go acceptAll(ln2)
	eventually(t, "the backend routed again", func() bool { return e.worker(0) != nil })
	if e.worker(0) == w {
		t.Fatal("the returned backend reuses its old worker; it needs a fresh one (the old one is gone)")
	}
}

// TestBackendsActiveHealth: -health-path fails Fall times in a row → out; passes Rise
// times → in again.
func TestBackendsActiveHealth(t *testing.T) {
	var status atomic.Int32
	status.Store(200)
	var checks atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" || r.Header.Get("User-Agent") != "stickyd-health" {
			w.WriteHeader(404)
			return
		}
		checks.Add(1)
		w.WriteHeader(int(status.Load()))
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	e := newFakeEdge(quietLog(t))
	bs := &Backends{Edge: e, Addrs: []string{ln.Addr().String()}, HealthPath: "healthz",
		HealthInterval: 20 * time.Millisecond, Rise: 2, Fall: 3, Logger: quietLog(t)}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); bs.Wait() }()
	if err := bs.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-bs.Settled()
	if e.worker(0) == nil {
		t.Fatal("healthy backend not routed")
	}
	status.Store(503)
	before := checks.Load()
	eventually(t, "a failing backend out of routing", func() bool { return e.worker(0) == nil })
	if n := checks.Load() - before; n < 3 {
		t.Errorf("out after %d failed checks, want Fall = 3", n)
	}
	status.Store(204)
	eventually(t, "a passing backend back in routing", func() bool { return e.worker(0) != nil })
	if bs.Routable() != 1 {
		t.Errorf("Routable = %d, want 1", bs.Routable())
	}
}

// TestLocalDialErrorIsNotTheBackends: the edge running out of descriptors or ports must
// not eject a backend (that would forget every session it holds); a refusal must.
func TestLocalDialErrorIsNotTheBackends(t *testing.T) {
	wrap := func(e error) error {
		return fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", e)})
	}
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.EADDRNOTAVAIL} {
		if !LocalDialError(wrap(e)) {
			t.Errorf("%v: not taken for the edge's own shortage", e)
		}
	}
	if LocalDialError(wrap(syscall.ECONNREFUSED)) {
		t.Error("ECONNREFUSED taken for a local shortage")
	}
}

// TestBackendsErrorBurst: a burst of 5xx answers since the last look gives the backend no
// new sessions for a while; it stays in routing with its sessions. (The watch loop looks
// once per health interval; the test looks itself, at chosen points.)
func TestBackendsErrorBurst(t *testing.T) {
	e := newFakeEdge(quietLog(t))
	bs := &Backends{Edge: e, Logger: quietLog(t)}
	bs.defaults()
	b := &backend{slot: 0, address: "127.0.0.1:1"}
	w := NewWorker(0, 0, NewBackendChannel("tcp", b.address, nil), 0)
	e.AddWorker(w)
	m := e.settings.Metrics
	var seen answerCounts
	// A few errors among many answers: no burst.
	w.Pool().Requests(m, 200).Add(100)
	w.Pool().Requests(m, 502).Add(5)
	bs.checkAnswers(b, w, &seen)
	if !w.TakesNew(time.Now()) {
		t.Fatal("5 errors in 105 answers made the backend stuck")
	}
	// Errors below the burst size: no burst either.
	w.Pool().Requests(m, 503).Add(burst5xx - 1)
	bs.checkAnswers(b, w, &seen)
	if !w.TakesNew(time.Now()) {
		t.Fatalf("%d errors made the backend stuck", burst5xx-1)
	}
	w.Pool().Requests(m, 502).Add(30)
	w.Pool().Requests(m, 200).Add(10)
	bs.checkAnswers(b, w, &seen)
	if w.TakesNew(time.Now()) {
		t.Fatal("30 errors in 40 answers did not stop new sessions to the backend")
	}
	if e.worker(0) != w || w.State() != StateReady {
		t.Fatalf("an error burst removed the backend (state %v): its sessions would be lost", w.State())
	}
}
