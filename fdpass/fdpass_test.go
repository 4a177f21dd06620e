//go:build unix

package fdpass

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// openFDs counts this process's descriptors. Go 1.26 keeps a couple of extra fds of its
// own, so tests compare against a baseline taken inside the test, never a constant.
func openFDs(t testing.TB) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(es) - 1 // ReadDir's own descriptor
}

func checkNoLeak(t *testing.T) {
	t.Helper()
	before := openFDs(t)
	t.Cleanup(func() {
		// Closed conns release their fds synchronously; give the runtime no excuse.
		if after := openFDs(t); after != before {
			t.Errorf("fd leak: %d open before the test, %d after", before, after)
		}
	})
}

func seqpair(t *testing.T) (edge, worker *net.UnixConn) {
	t.Helper()
	a, bf, err := SocketPair(unix.SOCK_SEQPACKET)
	if err != nil {
		t.Fatal(err)
	}
	bc, err := net.FileConn(bf)
	bf.Close()
	if err != nil {
		t.Fatal(err)
	}
	return a, bc.(*net.UnixConn)
}

// tcpPair returns both ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-registered first, so these close before checkNoLeak counts.
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func TestHandoffRoundTrip(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	defer worker.Close()
	client, srv := tcpPair(t)
	defer client.Close()

	remote := srv.RemoteAddr().(*net.TCPAddr).AddrPort()
	local := srv.LocalAddr().(*net.TCPAddr).AddrPort()
	meta := Meta{Kind: KindConn, ConnID: 42, Remote: remote, Local: local, Consumed: []byte("GET / HTTP/1.1\r\n")}
	if err := Send(edge, srv, meta); err != nil {
		t.Fatalf("Send: %v", err)
	}
	srv.Close() // the edge forgets the connection

	c, got, err := Recv(worker)
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	defer c.Close()
	if got.ConnID != 42 || got.Remote != remote || got.Local != local || got.Kind != KindConn {
		t.Fatalf("meta = %+v, want %+v", got, meta)
	}
	if c.RemoteAddr().String() != client.LocalAddr().String() {
		t.Errorf("RemoteAddr = %v, want the client's %v", c.RemoteAddr(), client.LocalAddr())
	}
	if _, err := client.Write([]byte("Host: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	want := "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != want {
		t.Fatalf("worker read %q, %v; want consumed bytes replayed then the socket: %q", buf, err, want)
	}
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, buf[:4]); err != nil || string(buf[:4]) != "pong" {
		t.Fatalf("client read %q, %v", buf[:4], err)
	}
}

func TestVirtualConnIsAStream(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	defer worker.Close()
	mine, theirs, err := SocketPair(unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	if err := Send(edge, theirs, Meta{Kind: KindVirtual, ConnID: 7}); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	c, m, err := Recv(worker)
	if err != nil || m.Kind != KindVirtual {
		t.Fatalf("Recv: %v %+v", err, m)
	}
	defer c.Close()
	mine.Write([]byte("abc"))
	b := make([]byte, 3)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "abc" {
		t.Fatalf("read %q %v", b, err)
	}
}

func TestMessagesWithoutFD(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	defer worker.Close()
	if err := Send(worker, nil, Meta{Kind: KindStats, Value: 9}); err != nil {
		t.Fatal(err)
	}
	c, m, err := Recv(edge)
	if err != nil || c != nil || m.Kind != KindStats || m.Value != 9 {
		t.Fatalf("Recv = %v %+v %v", c, m, err)
	}
	if err := Send(edge, nil, Meta{Kind: KindConn}); !errors.Is(err, ErrNoFD) {
		t.Fatalf("Send conn without fd: %v, want ErrNoFD", err)
	}
	// A hand-made conn message without the fd.
	payload, _ := AppendMeta(nil, Meta{Kind: KindConn, ConnID: 1})
	edge.Write(payload)
	if _, _, err := Recv(worker); !errors.Is(err, ErrNoFD) {
		t.Fatalf("Recv: %v, want ErrNoFD", err)
	}
}

// sendRaw sends payload with the given fds in one SCM_RIGHTS message.
func sendRaw(t *testing.T, uc *net.UnixConn, payload []byte, fds ...int) {
	t.Helper()
	if _, _, err := uc.WriteMsgUnix(payload, unix.UnixRights(fds...), nil); err != nil {
		t.Fatalf("WriteMsgUnix: %v", err)
	}
}

func pipeFDs(t *testing.T, n int) []int {
	var fds []int
	for range n {
		var p [2]int
		syscall.ForkLock.RLock() // pipe2(O_CLOEXEC) is not on macOS
		err := unix.Pipe(p[:])
		if err == nil {
			unix.CloseOnExec(p[0])
			unix.CloseOnExec(p[1])
		}
		syscall.ForkLock.RUnlock()
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, p[0], p[1])
	}
	return fds
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func TestReceiverClosesEveryStrayFD(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	defer worker.Close()
	payload, _ := AppendMeta(nil, Meta{Kind: KindConn, ConnID: 1})

	t.Run("extra fds", func(t *testing.T) {
		_, srv := tcpPair(t)
		raw, _ := srv.SyscallConn()
		extra := pipeFDs(t, 1)
		raw.Control(func(fd uintptr) { sendRaw(t, edge, payload, int(fd), extra[0], extra[1]) })
		closeFDs(extra)
		srv.Close()
		c, _, err := Recv(worker)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	})
	t.Run("not a socket", func(t *testing.T) {
		p := pipeFDs(t, 1)
		sendRaw(t, edge, payload, p[0])
		closeFDs(p)
		if _, _, err := Recv(worker); err == nil {
			t.Fatal("Recv accepted a pipe as a connection")
		}
	})
	t.Run("bad metadata", func(t *testing.T) {
		p := pipeFDs(t, 1)
		sendRaw(t, edge, []byte("garbage that is long enough to be a header"), p[0])
		closeFDs(p)
		if _, _, err := Recv(worker); !errors.Is(err, ErrBadMeta) {
			t.Fatalf("Recv: %v, want ErrBadMeta", err)
		}
	})
	t.Run("fd on a stats message", func(t *testing.T) {
		p := pipeFDs(t, 1)
		stats, _ := AppendMeta(nil, Meta{Kind: KindStats, Value: 1})
		sendRaw(t, edge, stats, p[0])
		closeFDs(p)
		if c, m, err := Recv(worker); err != nil || c != nil || m.Kind != KindStats {
			t.Fatalf("Recv: %v %v %+v", c, err, m)
		}
	})
	t.Run("control data truncated", func(t *testing.T) {
		// More fds than the receiver's control buffer holds: the kernel sets MSG_CTRUNC.
		p := pipeFDs(t, 20)
		sendRaw(t, edge, payload, p...)
		closeFDs(p)
		if _, _, err := Recv(worker); !errors.Is(err, ErrTruncated) {
			t.Fatalf("Recv: %v, want ErrTruncated", err)
		}
	})
	t.Run("payload truncated", func(t *testing.T) {
		p := pipeFDs(t, 1)
		sendRaw(t, edge, make([]byte, MaxMessage+100), p[0])
		closeFDs(p)
		if _, _, err := Recv(worker); !errors.Is(err, ErrTruncated) {
			t.Fatalf("Recv: %v, want ErrTruncated", err)
		}
	})
}

func TestSendHonoursWriteDeadline(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	defer worker.Close()
	_, srv := tcpPair(t)
	defer srv.Close()
	edge.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	var err error
	sent := 0
	for sent = 0; sent < 100000; sent++ {
		if err = Send(edge, srv, Meta{Kind: KindConn, Consumed: make([]byte, 1024)}); err != nil {
			break
		}
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after %d sends to a worker that never reads: %v, want a deadline error", sent, err)
	}
	t.Logf("%d handoffs queued before the deadline hit", sent)
	// Drain so the queued fds are closed before the leak check.
	worker.SetReadDeadline(time.Now().Add(2 * time.Second))
	for range sent {
		c, _, err := Recv(worker)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}

func TestListenerAcceptAndClose(t *testing.T) {
	checkNoLeak(t)
	edge, worker := seqpair(t)
	defer edge.Close()
	ln, err := NewListener(worker)
	if err != nil {
		t.Fatal(err)
	}
	_, hello, err := Recv(edge)
	if err != nil || hello.Kind != KindHello || hello.Value != uint64(os.Getpid()) {
		t.Fatalf("hello = %+v, %v", hello, err)
	}
	client, srv := tcpPair(t)
	defer client.Close()
	ap := netip.MustParseAddrPort("192.0.2.1:5555")
	if err := Send(edge, srv, Meta{Kind: KindConn, Remote: ap}); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if c.RemoteAddr().String() != ap.String() {
		t.Errorf("RemoteAddr = %v, want %v from the metadata", c.RemoteAddr(), ap)
	}
	c.Close()
	if err := ln.ReportWebSockets(3); err != nil {
		t.Fatal(err)
	}
	if _, m, _ := Recv(edge); m.Kind != KindStats || m.Value != 3 {
		t.Fatalf("stats = %+v", m)
	}
	// The edge going away ends Accept with net.ErrClosed.
	edge.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after the edge closed: %v, want net.ErrClosed", err)
	}
	ln.Close()
}

func TestMetaRoundTrip(t *testing.T) {
	cases := []Meta{
		{Kind: KindConn},
		{Kind: KindConn, ConnID: 1 << 60, Remote: netip.MustParseAddrPort("[2001:db8::1]:443"), Local: netip.MustParseAddrPort("127.0.0.1:8080"), Consumed: []byte("x")},
		{Kind: KindHello, Value: 12345},
		{Kind: KindVirtual, Remote: netip.MustParseAddrPort("[fe80::1%eth0]:1")},
	}
	for _, m := range cases {
		b, err := AppendMeta(nil, m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeMeta(b)
		if err != nil {
			t.Fatalf("DecodeMeta(%+v): %v", m, err)
		}
		m.Remote = netip.AddrPortFrom(m.Remote.Addr().WithZone(""), m.Remote.Port())
		if got.Kind != m.Kind || got.ConnID != m.ConnID || got.Value != m.Value || got.Remote != m.Remote || got.Local != m.Local || !bytes.Equal(got.Consumed, m.Consumed) {
			t.Errorf("round trip: got %+v, want %+v", got, m)
		}
	}
	if _, err := AppendMeta(nil, Meta{Kind: KindConn, Consumed: make([]byte, MaxConsumed+1)}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversize consumed: %v", err)
	}
}

func FuzzDecodeMeta(f *testing.F) {
	for _, m := range []Meta{{Kind: KindConn, Consumed: []byte("GET /")}, {Kind: KindHello, Value: 1}, {Kind: KindConn, Remote: netip.MustParseAddrPort("[::1]:80")}} {
		b, _ := AppendMeta(nil, m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if err != nil {
			return
		}
		// Whatever decodes must encode back to an equivalent record.
		b2, err := AppendMeta(nil, m)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", m, err)
		}
		m2, err := DecodeMeta(b2)
		if err != nil || m2.Kind != m.Kind || m2.ConnID != m.ConnID || m2.Remote != m.Remote || !bytes.Equal(m2.Consumed, m.Consumed) {
			t.Fatalf("unstable round trip: %+v vs %+v (%v)", m, m2, err)
		}
	})
}

func TestRightsMatchesUnixRights(t *testing.T) {
	var buf [24]byte
	if got, want := rights(buf[:0], 42), unix.UnixRights(42); !bytes.Equal(got, want) {
		t.Fatalf("rights = %x, unix.UnixRights = %x", got, want)
	}
	if n := testing.AllocsPerRun(100, func() { rights(buf[:0], 7) }); n != 0 {
		t.Errorf("rights allocates %v times", n)
	}
}
