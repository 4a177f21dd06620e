//go:build unix

package fdpass

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

// testEdge is a minimal edge: it accepts TCP connections on loopback and hands each one
// to the worker's listener with its addresses, as the real edge's fast path does.
type testEdge struct {
	addr string
	ln   *Listener
}

// newTestListener is a worker's Listener on a control socket whose edge end is edge, with
// the worker's hello already read.
func newTestListener(t *testing.T) (edge *net.UnixConn, ln *Listener) {
	t.Helper()
	edge, worker := seqpair(t)
	ln, err := NewListener(worker)
	if err != nil {
		t.Fatal(err)
	}
	if _, hello, err := Recv(edge); err != nil || hello.Kind != KindHello {
		t.Fatalf("hello = %+v, %v", hello, err)
	}
	return edge, ln
}

func startTestEdge(t *testing.T) *testEdge {
	t.Helper()
	edge, ln := newTestListener(t)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			m := Meta{Kind: KindConn,
				Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(),
				Local:  c.LocalAddr().(*net.TCPAddr).AddrPort()}
			if err := Send(edge, c.(*net.TCPConn), m); err != nil {
				t.Errorf("edge: send: %v", err)
			}
			c.Close() // the edge keeps nothing
		}
	}()
	t.Cleanup(func() {
		tl.Close()
		wg.Wait()
		ln.Close()
		edge.Close()
	})
	return &testEdge{addr: tl.Addr().String(), ln: ln}
}

// handOff sends server's descriptor with m through a fresh listener and returns what Accept
// gives the worker.
func handOff(t *testing.T, server *net.TCPConn, m Meta) net.Conn {
	t.Helper()
	edge, worker := seqpair(t)
	ln, err := NewListener(worker)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close(); edge.Close() })
	if _, _, err := Recv(edge); err != nil {
		t.Fatal(err)
	}
	if err := Send(edge, server, m); err != nil {
		t.Fatal(err)
	}
	server.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAcceptedConnIsNotFileConn(t *testing.T) {
	checkNoLeak(t)
	client, srv := tcpPair(t)
	c := handOff(t, srv, Meta{Kind: KindConn})
	defer c.Close()
	if _, ok := c.(*Conn).NetConn().(*sockConn); !ok {
		t.Fatalf("accepted %T, want the dup-free *sockConn", c.(*Conn).NetConn())
	}
	// Close-on-exec, so a worker's children never inherit client sockets.
	rc, err := c.(*Conn).NetConn().(*sockConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fdfl, fl int
	rc.Control(func(fd uintptr) {
		fdfl, _ = unix.FcntlInt(fd, unix.F_GETFD, 0)
		fl, _ = unix.FcntlInt(fd, unix.F_GETFL, 0)
	})
	if fdfl&unix.FD_CLOEXEC == 0 {
		t.Error("received descriptor is not close-on-exec")
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Error("received descriptor is blocking")
	}
	// What code that used to assert *net.TCPConn calls.
	type tcpOpts interface {
		SetNoDelay(bool) error
		SetKeepAlive(bool) error
	}
	o, ok := c.(*Conn).NetConn().(tcpOpts)
	if !ok {
		t.Fatal("no SetNoDelay/SetKeepAlive")
	}
	if err := o.SetNoDelay(false); err != nil {
		t.Error(err)
	}
	if err := o.SetKeepAlive(false); err != nil {
		t.Error(err)
	}
	var nodelay, keepalive int
	rc.Control(func(fd uintptr) {
		nodelay, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY)
		keepalive, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	})
	if nodelay != 0 || keepalive != 0 {
		t.Errorf("after SetNoDelay(false), SetKeepAlive(false): TCP_NODELAY %d, SO_KEEPALIVE %d", nodelay, keepalive)
	}
	_ = client
}

func TestAcceptedConnAddresses(t *testing.T) {
	checkNoLeak(t)
	// With the edge's metadata: those addresses, whatever the socket says.
	client, srv := tcpPair(t)
	remote := netip.MustParseAddrPort("192.0.2.7:4567")
	local := netip.MustParseAddrPort("198.51.100.1:443")
	c := handOff(t, srv, Meta{Kind: KindConn, Remote: remote, Local: local})
	defer c.Close()
	inner := c.(*Conn).NetConn()
	for _, x := range []net.Conn{c, inner} {
		if got := x.RemoteAddr().String(); got != remote.String() {
			t.Errorf("%T RemoteAddr = %s, want %s", x, got, remote)
		}
		if got := x.LocalAddr().String(); got != local.String() {
			t.Errorf("%T LocalAddr = %s, want %s", x, got, local)
		}
		if _, ok := x.RemoteAddr().(*net.TCPAddr); !ok {
			t.Errorf("%T RemoteAddr is %T, want *net.TCPAddr", x, x.RemoteAddr())
		}
	}
	_ = client

	// Without: the socket's own, as net.FileConn would have found them.
	client2, srv2 := tcpPair(t)
	c2 := handOff(t, srv2, Meta{Kind: KindConn})
	defer c2.Close()
	if got, want := c2.RemoteAddr().String(), client2.LocalAddr().String(); got != want {
		t.Errorf("RemoteAddr without metadata = %s, want the peer %s", got, want)
	}
	if got, want := c2.LocalAddr().String(), client2.RemoteAddr().String(); got != want {
		t.Errorf("LocalAddr without metadata = %s, want %s", got, want)
	}
}

func TestAcceptedConnDeadlinesAndErrors(t *testing.T) {
	checkNoLeak(t)
	client, srv := tcpPair(t)
	c := handOff(t, srv, Meta{Kind: KindConn, Remote: srv.RemoteAddr().(*net.TCPAddr).AddrPort()})

	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v (%T), want a net.Error timeout wrapping os.ErrDeadlineExceeded", err, err)
	}
	if _, ok := err.(net.Error); !ok { // net/http asserts without errors.As
		t.Fatalf("read timeout is %T, not a net.Error itself", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" || oe.Net != "tcp" || oe.Addr == nil {
		t.Errorf("read timeout = %#v, want a *net.OpError like a TCPConn's", err)
	}
	c.SetReadDeadline(time.Time{})

	// A write deadline ends a write the client does not read.
	c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	big := make([]byte, 1<<20)
	for err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		if _, err = c.Write(big); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("write: %v", err)
		}
	}
	c.SetDeadline(time.Time{})

	// A deadline wakes a blocked read.
	done := make(chan error, 1)
	go func() { _, err := c.Read(make([]byte, 1)); done <- err }()
	c.SetReadDeadline(time.Now())
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("blocked read woken by a deadline: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a deadline did not wake a blocked read")
	}

	// Close wakes a blocked read with net.ErrClosed, like a net.Conn.
	c.SetReadDeadline(time.Time{})
	go func() { _, err := c.Read(make([]byte, 1)); done <- err }()
	time.Sleep(10 * time.Millisecond) // let the read block (it also passes if it starts after Close)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed conn: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake a blocked read")
	}
	if err := c.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close: %v, want net.ErrClosed", err)
	}
	if err := c.SetDeadline(time.Now()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("SetDeadline after Close: %v, want net.ErrClosed", err)
	}
	_ = client
}

func TestAcceptedConnCloseWrite(t *testing.T) {
	checkNoLeak(t)
	client, srv := tcpPair(t)
	c := handOff(t, srv, Meta{Kind: KindConn})
	defer c.Close()
	if _, err := c.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(client) // ends at the half-close, not at a reset
	if err != nil || string(got) != "bye" {
		t.Fatalf("client read %q, %v; want \"bye\" then EOF", got, err)
	}
	// The other direction still works.
	if _, err := client.Write([]byte("still")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "still" {
		t.Fatalf("worker read %q, %v after its half-close", buf, err)
	}
	client.Close()
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after the client closed: %d, %v; want io.EOF", n, err)
	}
}

// A sender that hands over a blocking socket (not a Go edge) still gets a pollable conn:
// deadlines must work.
func TestAcceptedConnFromBlockingDescriptor(t *testing.T) {
	checkNoLeak(t)
	fds, err := platform.Socketpair(unix.SOCK_STREAM) // blocking, as a sender not written in Go may pass it
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	edge, worker := seqpair(t)
	defer edge.Close()
	ln, err := NewListener(worker)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, _, err := Recv(edge); err != nil {
		t.Fatal(err)
	}
	if err := TrySend(edge, fds[0], Meta{Kind: KindVirtual}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[0])
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	done := make(chan error, 1)
	go func() { _, err := c.Read(make([]byte, 1)); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read: %v, want a deadline error", err)
		}
	case <-time.After(5 * time.Second):
		unix.Close(fds[1]) // unblock the read so the test can end
		t.Fatal("deadline ignored: the descriptor was left blocking, outside the poller")
	}
	if _, ok := c.RemoteAddr().(*net.UnixAddr); !ok {
		t.Errorf("virtual conn RemoteAddr is %T, want *net.UnixAddr", c.RemoteAddr())
	}
}

func TestAcceptedConnServesHTTP(t *testing.T) {
	checkNoLeak(t)
	e := startTestEdge(t)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "hello "+r.RemoteAddr)
		}),
		ReadHeaderTimeout: 200 * time.Millisecond,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(e.ln) }()

	tr := &http.Transport{}
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := 0; i < 5; i++ { // keep-alive: later requests reuse the handed-off conn
		resp, err := hc.Get("http://" + e.addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.HasPrefix(string(body), "hello 127.0.0.1:") {
			t.Fatalf("body %q", body)
		}
	}
	tr.CloseIdleConnections()

	// A client that stops halfway through its head is closed quietly at the header
	// timeout, as on a TCPConn: net/http answers "400 Bad Request" instead when the read
	// error is not a net.Error.
	raw, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n"))
	raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(raw)
	if err != nil || len(got) != 0 {
		t.Fatalf("slow client got %q, %v; want a quiet close", got, err)
	}

	// A request the server refuses still reaches the client (CloseWrite before close).
	raw2, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw2.Close()
	raw2.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"))
	raw2.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(raw2), nil)
	if err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("bad request: %v, %v", resp, err)
	}

	srv.Close()
	<-served
}

func TestAcceptedConnServesWebSocket(t *testing.T) {
	checkNoLeak(t)
	e := startTestEdge(t)
	up := websocket.Upgrader{}
	handlerDone := make(chan error, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			handlerDone <- err
			return
		}
		defer ws.Close()
		for {
			mt, msg, err := ws.ReadMessage()
			if err != nil {
				if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
					err = nil
				}
				handlerDone <- err
				return
			}
			if err := ws.WriteMessage(mt, append([]byte("echo "), msg...)); err != nil {
				handlerDone <- err
				return
			}
		}
	})}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(e.ln) }()

	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	ws, _, err := d.Dial("ws://"+e.addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := 0; i < 3; i++ {
		if err := ws.WriteMessage(websocket.TextMessage, []byte("hi")); err != nil {
			t.Fatal(err)
		}
		if _, msg, err := ws.ReadMessage(); err != nil || string(msg) != "echo hi" {
			t.Fatalf("echo %q, %v", msg, err)
		}
	}
	ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	select {
	case err := <-handlerDone:
		if err != nil {
			t.Fatalf("server side: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server side did not see the close")
	}
	ws.Close()
	srv.Close()
	<-served
}

// Many handoffs, every conn closed: the worker holds no descriptor afterwards.
func TestAcceptedConnsLeakNoFD(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	ln, err := NewListener(worker)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, _, err := Recv(edge); err != nil {
		t.Fatal(err)
	}
	client, srv := tcpPair(t)
	defer client.Close()
	for i := 0; i < 200; i++ {
		if err := Send(edge, srv, Meta{Kind: KindConn}); err != nil {
			t.Fatal(err)
		}
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			c.RemoteAddr() // the look-up path must not leak either
		}
		c.Close()
	}
}

// BenchmarkAccept: one handoff received by the worker, the old way (net.FileConn, kept
// as Recv) against the listener's sockConn. Same socket every time; the edge's sendmsg
// is included in both.
func BenchmarkAccept(b *testing.B) {
	a, bf, err := SocketPair(unix.SOCK_SEQPACKET)
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	bc, err := net.FileConn(bf)
	bf.Close()
	if err != nil {
		b.Fatal(err)
	}
	worker := bc.(*net.UnixConn)
	defer worker.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	srv := s.(*net.TCPConn)
	m := Meta{Kind: KindConn, Remote: srv.RemoteAddr().(*net.TCPAddr).AddrPort(), Local: srv.LocalAddr().(*net.TCPAddr).AddrPort()}
	buf := make([]byte, recvBufSize)
	for _, tc := range []struct {
		name string
		recv func() (net.Conn, Meta, error)
	}{
		{"filecon", func() (net.Conn, Meta, error) { return recvInto(worker, buf) }},
		{"sockconn", func() (net.Conn, Meta, error) { return acceptInto(worker, buf) }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := Send(a, srv, m); err != nil {
					b.Fatal(err)
				}
				c, _, err := tc.recv()
				if err != nil {
					b.Fatal(err)
				}
				c.RemoteAddr()
				c.Close()
			}
		})
	}
}
