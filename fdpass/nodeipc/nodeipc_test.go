package nodeipc

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestListenAppTCP(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000")
	w.waitReady(t)
	if s := w.p.Style(); s != StyleListen {
		t.Fatalf("style = %v, want listen", s)
	}
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatalf("Deliver: %v", err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(client, "GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "hello /tcp from ") {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}
