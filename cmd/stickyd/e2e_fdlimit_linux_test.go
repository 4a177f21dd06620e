//go:build linux

package main

// The edge's descriptor limit is lowered from outside with prlimit(2), which only Linux
// has (and the test reads /proc).

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/gorilla/websocket"
)

// TestFDExhaustionBacksOffAndRecovers lowers the running edge's RLIMIT_NOFILE until its
// accept fails with EMFILE: the accept loop must back off (not spin, not exit) and serve
// again once descriptors are free.
func TestFDExhaustionBacksOffAndRecovers(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "1", "-head-timeout", "30s")
	pid := d.cmd.Process.Pid
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	var old syscall.Rlimit
	lim := &syscall.Rlimit{Cur: uint64(len(fds) + 10), Max: 20000}
	if err := prlimit(pid, lim, &old); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	t.Logf("edge fd limit lowered from %d to %d (it holds %d)", old.Cur, lim.Cur, len(fds))
	// Connections with half a head hold edge fds while it waits for the rest. (Ones that
	// send nothing at all never reach accept: the listener uses TCP_DEFER_ACCEPT.)
	var idle []net.Conn
	for range 30 {
		c, err := net.Dial("tcp", d.addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET / HTTP/1.1\r\n")
		idle = append(idle, c)
	}
	waitFor(t, "the accept loop to report EMFILE", 10*time.Second, func() bool {
		return strings.Contains(d.logs.String(), "accept failed; retrying")
	})
	for _, c := range idle {
		c.Close()
	}
	if err := prlimit(pid, &old, nil); err != nil {
		t.Fatal(err)
	}
	// Backlogged connections and new ones are served once fds are free.
	c, _, err := (&websocket.Dialer{HandshakeTimeout: 10 * time.Second}).Dial("ws://"+d.addr+"/ws", nil)
	if err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	c.Close()
	select {
	case <-d.exited:
		t.Fatal("the edge exited on EMFILE")
	default:
	}
}

func prlimit(pid int, lim, old *syscall.Rlimit) error {
	_, _, e := syscall.RawSyscall6(syscall.SYS_PRLIMIT64, uintptr(pid), uintptr(syscall.RLIMIT_NOFILE),
		uintptr(unsafe.Pointer(lim)), uintptr(unsafe.Pointer(old)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}
