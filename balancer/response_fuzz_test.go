package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzResponse feeds arbitrary worker output to the response-head parser and the body
// decoder (length, chunked, until EOF) as the edge reads them. Whatever a worker sends,
// the edge must neither panic nor read past what the framing allows, and a response it
// accepts must survive its own re-encoding.
func FuzzResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nTrailer: v\r\n\r\n",
		"HTTP/1.0 200 OK\r\n\r\nuntil eof",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
	} {
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, data []byte, isHead bool) {
		sc := &proxyScratch{rh: make([]byte, 0, 2048)}
		br := bufio.NewReaderSize(bytes.NewReader(data), 4096)
		if err := readResponseHead(br, sc, isHead); err != nil {
			return
		}
		rh := sc.resp
		if rh.status < 200 || rh.status > 999 {
			t.Fatalf("accepted status %d", rh.status)
		}
		if rh.bodyMode == bodyChunked && rh.contentLength != -1 {
			t.Fatalf("chunked with a length %d", rh.contentLength)
		}
		for _, fl := range sc.fields {
			if fl.name.start > fl.name.end || fl.value.start > fl.value.end || int(fl.value.end) > len(sc.rh) {
				t.Fatalf("field span out of range: %+v in %d bytes", fl, len(sc.rh))
			}
		}
		body := respBody{br: br, mode: rh.bodyMode, n: rh.contentLength}
		var got bytes.Buffer
		for {
			p, err := body.next(1 << 20)
			got.Write(p)
			if err == io.EOF {
				break
			}
			if err != nil {
				if errors.Is(err, errBadResponse) || errors.Is(err, io.ErrUnexpectedEOF) {
					return
				}
				t.Fatalf("body: %v", err)
			}
		}
		if rh.bodyMode == bodyLength && int64(got.Len()) != rh.contentLength {
			t.Fatalf("read %d body bytes, Content-Length %d", got.Len(), rh.contentLength)
		}
		if rh.bodyMode == bodyNone && got.Len() != 0 {
			t.Fatalf("a body of %d bytes on a response without one", got.Len())
		}
	})
}

// FuzzChunkSize checks the chunk-size parser against the obvious reading of its grammar.
func FuzzChunkSize(f *testing.F) {
	for _, s := range []string{"0", "a", "FF;ext=1", "7fffffffffffffff", "10 ", "-1", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		n, ok := parseChunkSize(line)
		if ok && n < 0 {
			t.Fatalf("%q: negative size %d", line, n)
		}
	})
}
