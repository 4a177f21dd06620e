//go:build unix

package balancer

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestKeepAliveRequestSentBeforeItsAnswer: a client that sends its next request on a
// keep-alive connection while the last one is still in flight — after the edge read the
// first, so the second is not in the edge's buffer but in the socket — gets both
// answers, in order. The edge sends a keep-alive answer from inside its wait for the
// next request (flushAndWait), and readiness from before that wait is not seen by it:
// the request must still be found (by the idle park, at the end of the grace), never
// left waiting for the idle timeout. Rounds repeat it on one connection.
func TestKeepAliveRequestSentBeforeItsAnswer(t *testing.T) {
	e := startEdge(t, Config{IdleTimeout: time.Minute}, 1)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(c)
	w := e.b.worker(0)
	if w == nil {
		t.Fatal("no worker in slot 0")
	}
	for round := range 3 {
		io.WriteString(c, "GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\n\r\n")
		waitFor(t, "the first request in flight", 5*time.Second, func() bool { return w.InFlight() == 1 })
		io.WriteString(c, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
		for i, want := range []string{"slow", "{"} {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("round %d, answer %d: %v", round, i, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.HasPrefix(string(body), want) || resp.Close {
				t.Fatalf("round %d, answer %d: %d %q (close %v), want 200 starting with %q on a kept connection",
					round, i, resp.StatusCode, body, resp.Close, want)
			}
		}
	}
}

// TestKeepAliveAnswerThenClose: the edge leaves a keep-alive answer's end in its writer
// for the wait that follows (endResponse): a client that closes its sending side right
// after its request gets its answer whole, then the edge's close.
func TestKeepAliveAnswerThenClose(t *testing.T) {
	e := startEdge(t, Config{IdleTimeout: time.Minute}, 1)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	resp.Body.Close()
	// The next request, then no more: the answer comes, then the edge's close.
	io.WriteString(c, "GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\n\r\n")
	c.(*net.TCPConn).CloseWrite()
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("a client that half-closed after its request got no answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(string(body), "slow") {
		t.Fatalf("body %q", body)
	}
	if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the answer: %d bytes, %v; want the edge's close (EOF)", n, err)
	}
}
