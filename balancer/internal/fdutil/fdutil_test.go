//go:build unix

package fdutil

import (
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestPeekStates(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "end")
		defer f.Close() // FileConn holds its own duplicate
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	mine, peer := conn(fds[0]), conn(fds[1])
	defer mine.Close()
	want := func(what string, want int) {
		t.Helper()
		if got, err := PeekConn(mine); got != want {
			t.Fatalf("%s: state %d (%v), want %d", what, got, err, want)
		}
	}
	want("nothing sent", PeekEmpty)
	rc, _ := mine.(syscall.Conn).SyscallConn()
	mine.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := WaitReadable(rc); err == nil {
		t.Fatal("WaitReadable on an empty socket returned before its deadline")
	}
	mine.SetReadDeadline(time.Time{})
	peer.Write([]byte("x"))
	want("a byte sent", PeekData)
	want("peeked again: nothing consumed", PeekData)
	buf := make([]byte, 1)
	mine.Read(buf)
	peer.Close()
	if state, err := WaitReadable(rc); state != PeekEOF || err != nil {
		t.Fatalf("after the peer closed: %d %v, want PeekEOF", state, err)
	}
	if state, _ := PeekConn(struct{}{}); state != PeekError {
		t.Fatalf("no socket: %d, want PeekError", state)
	}
}
