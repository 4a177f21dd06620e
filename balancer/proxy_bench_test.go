//go:build unix

package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"strconv"
	"testing"

	"github.com/stickyd/stickyd/sticky"
	"github.com/stickyd/stickyd/upgrade"
)

// benchClient is one keep-alive client connection with an allocation-free response
// reader, so allocs/op of the edge runs count (almost only) the edge's allocations: the
// direct worker runs in another process.
type benchClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialBench(b *testing.B, addr string) *benchClient {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	return &benchClient{c: c, br: bufio.NewReaderSize(c, 16<<10)}
}

var errBenchResponse = errors.New("bench: malformed response")

// do sends req (a complete request) and reads one response; it returns the status and
// the first body bytes (valid until the next call).
func (bc *benchClient) do(req []byte) (int, []byte, error) {
	if _, err := bc.c.Write(req); err != nil {
		return 0, nil, err
	}
	line, err := bc.br.ReadSlice('\n')
	if err != nil {
		return 0, nil, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, nil, errBenchResponse
	}
	status, _ := strconv.Atoi(string(line[9:12])) // does not allocate: 3 bytes, no escape
	cl := int64(-1)
	chunked := false
	for {
		line, err = bc.br.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		if len(line) <= 2 {
			break
		}
		if i := bytes.IndexByte(line, ':'); i > 0 {
			name, value := line[:i], bytes.TrimSpace(line[i+1:])
			switch {
			case bytes.EqualFold(name, []byte("Content-Length")):
				cl = 0
				for _, c := range value {
					cl = cl*10 + int64(c-'0')
				}
			case bytes.EqualFold(name, []byte("Transfer-Encoding")):
				chunked = true
			}
		}
	}
	var first []byte
	switch {
	case chunked:
		for {
			line, err = bc.br.ReadSlice('\n')
			if err != nil {
				return 0, nil, err
			}
			n, err := strconv.ParseInt(string(bytes.TrimSpace(line)), 16, 64)
			if err != nil {
				return 0, nil, err
			}
			if n == 0 {
				_, err = bc.br.ReadSlice('\n')
				return status, first, err
			}
			if first == nil {
				first, _ = bc.br.Peek(int(min(n, 256)))
				first = append([]byte(nil), first...)
			}
			if _, err := bc.br.Discard(int(n) + 2); err != nil {
				return 0, nil, err
			}
		}
	case cl >= 0:
		p, err := bc.br.Peek(int(cl))
		if err != nil {
			return 0, nil, err
		}
		bc.br.Discard(int(cl))
		return status, p, nil
	}
	return 0, nil, errBenchResponse
}

const whoamiRequest = "GET /whoami HTTP/1.1\r\nHost: bench\r\nUser-Agent: stickybench\r\nAccept: */*\r\n\r\n"

// BenchmarkProxiedRequest compares keep-alive requests straight to one Go worker with
// the same requests through the edge (parse, route, pooled virtual connection, response
// rewritten for the client). Each parallel goroutine holds one client connection. The
// ratio edge/direct is the figure, as is allocs/op: the direct worker runs in another
// process, so the edge's allocs/op are (nearly) all the edge's own.
func BenchmarkProxiedRequest(b *testing.B) {
	targets := func(b *testing.B, run func(b *testing.B, addr string)) {
		b.Run("direct", func(b *testing.B) { run(b, directWorker(b)) })
		b.Run("edge", func(b *testing.B) {
			e := startEdge(b, Config{Rules: sticky.Rules{Sources: []sticky.Source{{Kind: sticky.KindSID}, {Kind: sticky.KindIP}}}}, 1)
			run(b, e.addr)
		})
	}
	b.Run("whoami", func(b *testing.B) {
		targets(b, func(b *testing.B, addr string) {
			req := []byte(whoamiRequest)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				bc := dialBench(b, addr)
				defer bc.c.Close()
				for pb.Next() {
					if status, _, err := bc.do(req); err != nil || status != 200 {
						b.Errorf("GET /whoami: %d %v", status, err)
						return
					}
				}
			})
		})
	})
	// engine.io long-polling as a socket.io client does it between its long polls: a
	// handshake, then per iteration one POST of a small packet and one GET (the stand-in
	// worker answers at once instead of holding the GET).
	b.Run("polling", func(b *testing.B) {
		targets(b, func(b *testing.B, addr string) {
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				bc := dialBench(b, addr)
				defer bc.c.Close()
				status, body, err := bc.do([]byte("GET /socket.io/?EIO=4&transport=polling&t=OqVx1kz HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n"))
				if err != nil || status != 200 {
					b.Errorf("handshake: %d %v", status, err)
					return
				}
				sid, ok := upgrade.OpenPacketSID(body)
				if !ok {
					b.Errorf("handshake body %q", body)
					return
				}
				q := "/socket.io/?EIO=4&transport=polling&t=OqVx1l0&sid=" + sid
				get := []byte("GET " + q + " HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n")
				const packet = `42["message","hello"]`
				post := []byte("POST " + q + " HTTP/1.1\r\nHost: bench\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: " +
					strconv.Itoa(len(packet)) + "\r\n\r\n" + packet)
				for pb.Next() {
					if status, _, err := bc.do(post); err != nil || status != 200 {
						b.Errorf("POST: %d %v", status, err)
						return
					}
					if status, _, err := bc.do(get); err != nil || status != 200 {
						b.Errorf("GET: %d %v", status, err)
						return
					}
				}
			})
		})
	})
}
