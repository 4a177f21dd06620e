//go:build unix

package upgrade

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// tcpPair returns the server side of a loopback TCP connection and the
// client side.
func tcpPair(t *testing.T) (srv *net.TCPConn, cli net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cli, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); cli.Close() })
	return s.(*net.TCPConn), cli
}

type peekResult struct {
	h   Head
	n   int
	err error
	d   time.Duration
}

func peekAsync(t *testing.T, c *net.TCPConn, bufSize int, deadline time.Duration) <-chan peekResult {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(deadline))
	ch := make(chan peekResult, 1)
	go func() {
		start := time.Now()
		h, n, err := Peek(rc, make([]byte, bufSize))
		ch <- peekResult{h, n, err, time.Since(start)}
	}()
	return ch
}

func waitPeek(t *testing.T, ch <-chan peekResult) peekResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("Peek did not return")
	}
	return peekResult{}
}

// assertUnconsumed checks that a Read on c returns want: Peek left the bytes.
func assertUnconsumed(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("Read after Peek: %v", err)
	}
	if string(got) != want {
		t.Fatalf("Read after Peek = %q, want %q", got, want)
	}
}

func TestPeekWholeHead(t *testing.T) {
	srv, cli := tcpPair(t)
	msg := wsHead + "after"
	cli.Write([]byte(msg))
	r := waitPeek(t, peekAsync(t, srv, 4096, 10*time.Second))
	if r.err != nil {
		t.Fatal(r.err)
	}
	if !r.h.WebSocket || r.h.Size != len(wsHead) || r.n < r.h.Size {
		t.Fatalf("head %+v n=%d", r.h, r.n)
	}
	assertUnconsumed(t, srv, msg)
}

func TestPeekSplitWrites(t *testing.T) {
	srv, cli := tcpPair(t)
	ch := peekAsync(t, srv, 4096, 10*time.Second)
	for _, part := range []string{pollHead[:10], pollHead[10:70], pollHead[70:]} {
		time.Sleep(30 * time.Millisecond)
		cli.Write([]byte(part))
	}
	r := waitPeek(t, ch)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.h.Path != "/socket.io/" || r.h.Size != len(pollHead) {
		t.Fatalf("head %+v", r.h)
	}
	assertUnconsumed(t, srv, pollHead)
}

func TestPeekByteByByte(t *testing.T) {
	for _, pause := range []time.Duration{0, 100 * time.Microsecond, time.Millisecond} {
		srv, cli := tcpPair(t)
		cli.(*net.TCPConn).SetNoDelay(true)
		ch := peekAsync(t, srv, 4096, 20*time.Second)
		for i := 0; i < len(wsHead); i++ {
			if _, err := cli.Write([]byte{wsHead[i]}); err != nil {
				t.Fatal(err)
			}
			if pause > 0 {
				time.Sleep(pause)
			}
		}
		r := waitPeek(t, ch)
		if r.err != nil {
			t.Fatalf("pause %v: %v", pause, r.err)
		}
		if r.h.Size != len(wsHead) || !r.h.WebSocket {
			t.Fatalf("head %+v", r.h)
		}
		assertUnconsumed(t, srv, wsHead)
	}
}

func TestPeekDeadline(t *testing.T) {
	srv, cli := tcpPair(t)
	const part = "GET / HTTP/1.1\r\nHost: a\r\n"
	cli.Write([]byte(part))
	r := waitPeek(t, peekAsync(t, srv, 4096, 150*time.Millisecond))
	if !errors.Is(r.err, ErrTimeout) || StatusOf(r.err) != 408 {
		t.Fatalf("err %v, want 408 ErrTimeout", r.err)
	}
	if r.n != len(part) {
		t.Errorf("n = %d", r.n)
	}
	assertUnconsumed(t, srv, part)
}

func TestPeekDeadlineNoData(t *testing.T) {
	srv, _ := tcpPair(t)
	r := waitPeek(t, peekAsync(t, srv, 4096, 100*time.Millisecond))
	if !errors.Is(r.err, ErrTimeout) {
		t.Fatalf("err %v, want ErrTimeout", r.err)
	}
}

func TestPeekPeerClosesMidHead(t *testing.T) {
	const long = 30 * time.Second
	t.Run("after peek started", func(t *testing.T) {
		srv, cli := tcpPair(t)
		ch := peekAsync(t, srv, 4096, long)
		cli.Write([]byte("GET / HTTP/1.1\r\nHo"))
		time.Sleep(50 * time.Millisecond)
		cli.Close()
		r := waitPeek(t, ch)
		if r.err != io.ErrUnexpectedEOF || r.d > 5*time.Second {
			t.Fatalf("err %v after %v, want io.ErrUnexpectedEOF quickly", r.err, r.d)
		}
	})
	t.Run("before peek started", func(t *testing.T) {
		srv, cli := tcpPair(t)
		cli.Write([]byte("GET / HTTP/1.1\r\nHo"))
		cli.(*net.TCPConn).CloseWrite()
		time.Sleep(50 * time.Millisecond)
		r := waitPeek(t, peekAsync(t, srv, 4096, long))
		if r.err != io.ErrUnexpectedEOF || r.d > 5*time.Second {
			t.Fatalf("err %v after %v, want io.ErrUnexpectedEOF quickly", r.err, r.d)
		}
	})
	t.Run("complete head then half-close", func(t *testing.T) {
		srv, cli := tcpPair(t)
		ch := peekAsync(t, srv, 4096, long)
		cli.Write([]byte("GET / HTTP/1.0\r\n"))
		time.Sleep(20 * time.Millisecond)
		cli.Write([]byte("\r\n"))
		cli.(*net.TCPConn).CloseWrite()
		r := waitPeek(t, ch)
		if r.err != nil || r.h.Size != 18 {
			t.Fatalf("err %v head %+v", r.err, r.h)
		}
	})
}

func TestPeekEOF(t *testing.T) {
	srv, cli := tcpPair(t)
	ch := peekAsync(t, srv, 4096, 30*time.Second)
	time.Sleep(20 * time.Millisecond)
	cli.Close()
	r := waitPeek(t, ch)
	if r.err != io.EOF || r.n != 0 {
		t.Fatalf("err %v n %d, want io.EOF", r.err, r.n)
	}
}

func TestPeekTooLarge(t *testing.T) {
	srv, cli := tcpPair(t)
	ch := peekAsync(t, srv, 256, 10*time.Second)
	big := "GET /" + strings.Repeat("a", 200) + " HTTP/1.1\r\nHost: a\r\nX: " + strings.Repeat("b", 100)
	cli.Write([]byte(big))
	r := waitPeek(t, ch)
	if !errors.Is(r.err, ErrHeadTooLarge) || StatusOf(r.err) != 431 || r.n != 256 {
		t.Fatalf("err %v n %d, want 431 with 256 bytes", r.err, r.n)
	}
	assertUnconsumed(t, srv, big)
}

func TestPeekTLS(t *testing.T) {
	srv, cli := tcpPair(t)
	ch := peekAsync(t, srv, 4096, 30*time.Second)
	hello := "\x16\x03\x01\x00\xf8\x01\x00\x00\xf4\x03\x03"
	cli.Write([]byte(hello[:1]))
	time.Sleep(20 * time.Millisecond)
	cli.Write([]byte(hello[1:2])) // only 2 bytes so far: enough
	r := waitPeek(t, ch)
	if !errors.Is(r.err, ErrTLS) || r.d > 5*time.Second {
		t.Fatalf("err %v after %v, want ErrTLS", r.err, r.d)
	}
	assertUnconsumed(t, srv, hello[:2])
}

func TestPeekRejectsBadHead(t *testing.T) {
	srv, cli := tcpPair(t)
	in := "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
	cli.Write([]byte(in))
	r := waitPeek(t, peekAsync(t, srv, 4096, 10*time.Second))
	if !errors.Is(r.err, ErrSmuggling) {
		t.Fatalf("err %v", r.err)
	}
	assertUnconsumed(t, srv, in)
}

func TestPeekIntoAliases(t *testing.T) {
	srv, cli := tcpPair(t)
	cli.Write([]byte(wsHead))
	rc, _ := srv.SyscallConn()
	srv.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	var h Head
	n, err := PeekInto(rc, &h, buf)
	if err != nil || n != len(wsHead) || h.Method != "GET" {
		t.Fatalf("n %d err %v head %+v", n, err, h)
	}
	c := h.Clone()
	copy(buf, "XXX")
	if h.Method != "XXX" || c.Method != "GET" {
		t.Fatalf("aliasing: h.Method %q clone %q", h.Method, c.Method)
	}
}
