//go:build linux

package workers

import (
	"maps"
	"net"
	"os"
	"strconv"
	"testing"
)

// TestListeningTCPMatchesProc: the netlink answer is the same as /proc/net/tcp's list of
// listening sockets, including one this test opens (IPv4 and IPv6).
func TestListeningTCPMatchesProc(t *testing.T) {
	var want []string
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		want = append(want, ln.Addr().String())
	}
	got, proc := listeningTCP(), listeningFromProc()
	if !maps.Equal(got, proc) {
		t.Errorf("netlink and /proc differ:\nnetlink %v\n/proc   %v", got, proc)
	}
	mine := socketInodes(os.Getpid())
	found := map[string]bool{}
	for ino, addr := range got {
		if mine[ino] {
			found[addr] = true
		}
	}
	for _, w := range want {
		if !found[w] {
			t.Errorf("listener %s (this process) not in %v", w, got)
		}
	}
	t.Logf("%d listening sockets; pid %s", len(got), strconv.Itoa(os.Getpid()))
}
