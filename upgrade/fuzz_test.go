package upgrade

import (
	"bufio"
	"bytes"
	"net/http"
	"slices"
	"testing"
)

func sameHead(a, b Head) bool {
	return a.Method == b.Method && a.Target == b.Target && a.Proto == b.Proto &&
		a.ProtoMinor == b.ProtoMinor && a.Path == b.Path && a.RawQuery == b.RawQuery &&
		slices.Equal(a.Fields, b.Fields) && a.Host == b.Host && a.ContentLength == b.ContentLength &&
		a.Chunked == b.Chunked && a.Close == b.Close && a.WebSocket == b.WebSocket && a.Size == b.Size
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(wsHead), 0)
	f.Add([]byte(pollHead+"GET / HTTP/1.1\r\n"), 0)
	f.Add([]byte("\r\nPOST http://h/x?y HTTP/1.0\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"), 64)
	f.Add([]byte("PUT /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"), 0)
	f.Add([]byte("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 30)
	for _, tc := range rejectTests {
		f.Add([]byte(tc.in), tc.max)
	}
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		max %= 1 << 16
		orig := bytes.Clone(b)
		h, err := Parse(b, max)
		var hi Head
		erri := ParseInto(&hi, b, max)
		if !bytes.Equal(b, orig) {
			t.Fatal("Parse modified its input")
		}
		if err != erri {
			t.Fatalf("Parse error %v, ParseInto error %v", err, erri)
		}
		if err != nil {
			if err != ErrIncomplete {
				if _, ok := err.(*Error); !ok {
					t.Fatalf("error %T %v is not *Error", err, err)
				}
				if s := StatusOf(err); s < 400 || s > 599 {
					t.Fatalf("status %d", s)
				}
			}
			return
		}
		if !sameHead(h, hi) {
			t.Fatalf("Parse %+v != ParseInto %+v", h, hi)
		}
		if h.Size <= 0 || h.Size > len(b) {
			t.Fatalf("Size %d, len %d", h.Size, len(b))
		}
		if max > 0 && h.Size > max || max <= 0 && h.Size > DefaultMaxHeadBytes {
			t.Fatalf("Size %d over max %d", h.Size, max)
		}
		if !bytes.HasSuffix(b[:h.Size], []byte("\r\n\r\n")) && h.Size >= 4 {
			t.Fatalf("head does not end with CRLFCRLF: %q", b[:h.Size])
		}
		if len(h.Fields) > MaxFields {
			t.Fatalf("%d fields", len(h.Fields))
		}
		if h.Chunked && h.ContentLength >= 0 {
			t.Fatal("chunked with Content-Length")
		}
		h2, err := Parse(b[:h.Size], max)
		if err != nil || !sameHead(h, h2) {
			t.Fatalf("re-parse of b[:Size]: %v\n%+v\n%+v", err, h, h2)
		}
		_ = h.Header("host")
		_ = h.Header("Cookie")

		// Differential: what we accept, net/http accepts too, with the same
		// framing (we are stricter, never looser).
		raw := bytes.TrimLeft(b[:h.Size], "\r\n")
		req, rerr := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if rerr != nil {
			t.Fatalf("accepted %q, net/http rejects: %v", raw, rerr)
		}
		if req.Method != h.Method || req.ProtoMinor != h.ProtoMinor || req.Host != h.Host {
			t.Fatalf("net/http disagrees on %q: %s %d %q", raw, req.Method, req.ProtoMinor, req.Host)
		}
		wantCL := h.ContentLength
		if wantCL < 0 && !h.Chunked && req.ContentLength == 0 {
			wantCL = 0
		}
		if req.ContentLength != wantCL || (len(req.TransferEncoding) > 0) != h.Chunked {
			t.Fatalf("net/http framing differs on %q: CL %d TE %v", raw, req.ContentLength, req.TransferEncoding)
		}
	})
}

func FuzzOpenPacketSID(f *testing.F) {
	f.Add([]byte(`0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000}`))
	f.Add([]byte("97:0{\"sid\":\"abc\",\"upgrades\":[]}2:40"))
	f.Add([]byte("\x00\x09\x07\xff0{\"sid\":\"abc\"}"))
	f.Add([]byte(`0{"a":[{"b":"}"},1,true,null],"sid":"x-y_z"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		sid, ok := OpenPacketSID(b)
		if !ok {
			if sid != "" {
				t.Fatalf("sid %q with ok false", sid)
			}
			return
		}
		if len(sid) == 0 || len(sid) > 256 {
			t.Fatalf("sid length %d", len(sid))
		}
		for i := 0; i < len(sid); i++ {
			if !isSIDChar[sid[i]] {
				t.Fatalf("sid %q has %q", sid, sid[i])
			}
		}
		if i := bytes.Index(b, []byte(sid)); i < 0 || i+len(sid) > 2048 {
			t.Fatalf("sid %q not within the first 2 KiB of body", sid)
		}
	})
}

func FuzzParseEngineIO(f *testing.F) {
	f.Add("EIO=4&transport=polling&sid=a%2Fb")
	f.Fuzz(func(t *testing.T, q string) {
		e, ok := ParseEngineIO(q)
		if !ok && e.EIO != "" {
			t.Fatal("EIO set without ok")
		}
	})
}
