package upgrade

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
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
		var rh Response
		br := bufio.NewReaderSize(bytes.NewReader(data), 4096)
		if err := ReadResponseHead(br, &rh, isHead); err != nil {
			return
		}
		if rh.Status < 200 || rh.Status > 999 {
			t.Fatalf("accepted status %d", rh.Status)
		}
		if rh.BodyMode == BodyChunked && rh.ContentLength != -1 {
			t.Fatalf("chunked with a length %d", rh.ContentLength)
		}
		for _, fl := range rh.Fields {
			if fl.Name.Start > fl.Name.End || fl.Value.Start > fl.Value.End || int(fl.Value.End) > len(rh.Raw) {
				t.Fatalf("field span out of range: %+v in %d bytes", fl, len(rh.Raw))
			}
		}
		body := Body{R: br, Mode: rh.BodyMode, N: rh.ContentLength}
		var got bytes.Buffer
		for {
			p, err := body.Next(1 << 20)
			got.Write(p)
			if err == io.EOF {
				break
			}
			if err != nil {
				if errors.Is(err, ErrBadResponse) || errors.Is(err, io.ErrUnexpectedEOF) {
					return
				}
				t.Fatalf("body: %v", err)
			}
		}
		if rh.BodyMode == BodyLength && int64(got.Len()) != rh.ContentLength {
			t.Fatalf("read %d body bytes, Content-Length %d", got.Len(), rh.ContentLength)
		}
		if rh.BodyMode == BodyNone && got.Len() != 0 {
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
		n, ok := ParseChunkSize(line)
		if ok && n < 0 {
			t.Fatalf("%q: negative size %d", line, n)
		}
	})
}

func TestReadResponse(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		isHead   bool
		err      error
		status   int
		mode     int
		body     string
		close    bool
	}{
		{"length", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", false, nil, 200, BodyLength, "ok", false},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x\r\nok\r\n1\r\n!\r\n0\r\nT: v\r\n\r\n", false, nil, 200, BodyChunked, "ok!", false},
		{"until EOF", "HTTP/1.0 200 OK\r\n\r\nall of it", false, nil, 200, BodyUntilEOF, "all of it", true},
		{"interim skipped", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", false, nil, 204, BodyNone, "", false},
		{"HEAD has no body", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, nil, 200, BodyNone, "", false},
		{"connection close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false, nil, 200, BodyLength, "", true},
		{"CL conflict", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", false, ErrBadResponse, 0, 0, "", false},
		{"TE gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, ErrBadResponse, 0, 0, "", false},
		{"unasked 101", "HTTP/1.1 101 Switching Protocols\r\n\r\n", false, ErrBadResponse, 0, 0, "", false},
		{"obs-fold", "HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n", false, ErrBadResponse, 0, 0, "", false},
		{"bad status", "HTTP/1.1 2x0 OK\r\n\r\n", false, ErrBadResponse, 0, 0, "", false},
		{"many 1xx", strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 7), false, ErrTooMany1xx, 0, 0, "", false},
		{"huge head", "HTTP/1.1 200 OK\r\nA: " + strings.Repeat("x", 70<<10) + "\r\n\r\n", false, ErrResponseTooBig, 0, 0, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rh Response
			br := bufio.NewReaderSize(strings.NewReader(tc.in), 4096)
			err := ReadResponseHead(br, &rh, tc.isHead)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || rh.Status != tc.status || rh.BodyMode != tc.mode || rh.Close != tc.close {
				t.Fatalf("%v: status %d mode %d close %v", err, rh.Status, rh.BodyMode, rh.Close)
			}
			body, err := io.ReadAll(&Body{R: br, Mode: rh.BodyMode, N: rh.ContentLength})
			if err != nil || string(body) != tc.body {
				t.Fatalf("body %q %v, want %q", body, err, tc.body)
			}
		})
	}
}
