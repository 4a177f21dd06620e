//go:build unix

package fdpass

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A Go worker behind Handler sees the client's address on every request: per request on
// a virtual connection (two clients' requests on one socketpair), and the handed-over
// socket's own client on a TCP connection whose client lies in ClientAddrField.
func TestHandlerGivesTheClientAddress(t *testing.T) {
	checkNoLeak(t)
	edge, ln := newTestListener(t)
	defer edge.Close()
	srv := &http.Server{Handler: Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, ok := ClientAddr(r)
		fmt.Fprintf(w, "%s %q %v", r.RemoteAddr, r.Header.Get(ClientAddrField), ok)
	}))}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		srv.Close()
		<-served
	}()

	mine, theirs, err := SocketPair(unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	if err := Send(edge, theirs, Meta{Kind: KindVirtual}); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	br := bufio.NewReader(mine)
	for _, client := range []string{"198.51.100.7:4242", "[2001:db8::1]:80", "203.0.113.9:0"} {
		fmt.Fprintf(mine, "GET / HTTP/1.1\r\nHost: w\r\n%s: %s\r\n\r\n", ClientAddrField, client)
		if got := body(t, br, mine); got != client+` "" true` {
			t.Fatalf("proxied request from %s: worker saw %s", client, got)
		}
	}
	// A proxied request without the field (not from this edge's proxy path) keeps its
	// connection's address and reports none.
	fmt.Fprintf(mine, "GET / HTTP/1.1\r\nHost: w\r\n\r\n")
	if got := body(t, br, mine); !strings.HasSuffix(got, ` "" false`) {
		t.Fatalf("request without the field: worker saw %s", got)
	}

	client, srvSide := tcpPair(t)
	defer client.Close()
	peer := netip.MustParseAddrPort("192.0.2.1:5555")
	if err := Send(edge, srvSide, Meta{Kind: KindConn, Remote: peer}); err != nil {
		t.Fatal(err)
	}
	srvSide.Close()
	fmt.Fprintf(client, "GET / HTTP/1.1\r\nHost: w\r\n%s: 10.0.0.1:1\r\n\r\n", ClientAddrField)
	if got := body(t, bufio.NewReader(client), client); got != peer.String()+` "" true` {
		t.Fatalf("handed-over connection with a lying client: worker saw %s", got)
	}
}

func body(t *testing.T, br *bufio.Reader, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
