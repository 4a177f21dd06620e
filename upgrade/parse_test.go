package upgrade

import (
	"errors"
	"strings"
	"testing"
)

const wsHead = "GET /chat?EIO=4&transport=websocket&sid=abcDEF123_-x HTTP/1.1\r\n" +
	"Host: example.com:8080\r\n" +
	"Connection: Upgrade\r\n" +
	"Upgrade: websocket\r\n" +
	"Sec-WebSocket-Version: 13\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
	"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" +
	"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n" +
	"Origin: http://example.com:8080\r\n" +
	"Cookie: io=abc; theme=dark\r\n" +
	"\r\n"

const pollHead = "GET /socket.io/?EIO=4&transport=polling&t=OqVx1kz HTTP/1.1\r\n" +
	"Host: localhost:8080\r\n" +
	"Connection: keep-alive\r\n" +
	"Accept: */*\r\n" +
	"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n" +
	"Referer: http://localhost:8080/\r\n" +
	"Accept-Encoding: gzip, deflate, br\r\n" +
	"Accept-Language: en-US,en;q=0.9\r\n" +
	"\r\n"

func TestParseAccept(t *testing.T) {
	h, err := Parse([]byte(wsHead+"extra"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if h.Size != len(wsHead) {
		t.Errorf("Size = %d, want %d", h.Size, len(wsHead))
	}
	if h.Method != "GET" || h.Target != "/chat?EIO=4&transport=websocket&sid=abcDEF123_-x" ||
		h.Proto != "HTTP/1.1" || h.ProtoMinor != 1 || h.Path != "/chat" ||
		h.RawQuery != "EIO=4&transport=websocket&sid=abcDEF123_-x" || h.Host != "example.com:8080" ||
		h.ContentLength != -1 || h.Chunked || h.Close || !h.WebSocket || len(h.Fields) != 9 {
		t.Errorf("unexpected head %+v", h)
	}
	if h.Fields[0] != (Field{"Host", "example.com:8080"}) {
		t.Errorf("Fields[0] = %+v", h.Fields[0])
	}
	if got := h.Header("sec-websocket-key"); got != "dGhlIHNhbXBsZSBub25jZQ==" {
		t.Errorf("Header = %q", got)
	}
	if got := h.Header("X-Missing"); got != "" {
		t.Errorf("Header(missing) = %q", got)
	}
}

type acceptCase struct {
	name, in string
	check    func(Head) bool
}

var acceptTests = []acceptCase{
	{"leading CRLF", "\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", func(h Head) bool { return h.Size == 29 && h.Path == "/" }},
	{"HTTP/1.0 no host", "GET / HTTP/1.0\r\n\r\n", func(h Head) bool { return h.Close && h.Host == "" && h.ProtoMinor == 0 }},
	{"HTTP/1.0 keep-alive", "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", func(h Head) bool { return !h.Close }},
	{"connection close list", "GET / HTTP/1.1\r\nHost: a\r\nConnection: foo , CLOSE\r\n\r\n", func(h Head) bool { return h.Close }},
	{"websocket lists", "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c, WebSocket\r\n\r\n", func(h Head) bool { return h.WebSocket }},
	{"websocket split fields", "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", func(h Head) bool { return h.WebSocket }},
	{"websocket needs GET", "POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n", func(h Head) bool { return !h.WebSocket }},
	{"websocket needs upgrade token", "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgraded\r\nUpgrade: websocket\r\n\r\n", func(h Head) bool { return !h.WebSocket }},
	{"content-length", "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0042\r\n\r\nbody", func(h Head) bool { return h.ContentLength == 42 && !h.Chunked }},
	{"content-length max", "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n", func(h Head) bool { return h.ContentLength == 1<<63-1 }},
	{"chunked", "POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChunKed \r\n\r\n", func(h Head) bool { return h.Chunked && h.ContentLength == -1 }},
	{"absolute-form", "GET http://Example.com:81/a/b?x=1 HTTP/1.1\r\nHost: other\r\n\r\n", func(h Head) bool {
		return h.Host == "Example.com:81" && h.Path == "/a/b" && h.RawQuery == "x=1"
	}},
	{"absolute-form https no path", "GET HTTPS://[::1]:8443?q HTTP/1.1\r\nHost: x\r\n\r\n", func(h Head) bool {
		return h.Host == "[::1]:8443" && h.Path == "/" && h.RawQuery == "q"
	}},
	{"asterisk", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", func(h Head) bool { return h.Path == "*" && h.Target == "*" }},
	{"OWS trimmed, empty value", "GET / HTTP/1.1\r\nHost:a\r\nX-Empty:\r\nX-Tab:\t v v \t\r\n\r\n", func(h Head) bool {
		return h.Host == "a" && h.Header("x-empty") == "" && h.Header("X-TAB") == "v v"
	}},
	{"empty host 1.1", "GET / HTTP/1.1\r\nHost: \r\n\r\n", func(h Head) bool { return h.Host == "" }},
	{"obs-text value", "GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n", func(h Head) bool { return h.Header("x") == "caf\xc3\xa9" }},
	{"joined header", "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: x\r\na: 2\r\nCookie: c=1\r\ncookie: d=2\r\n\r\n", func(h Head) bool {
		return h.Header("A") == "1, 2" && h.Header("Cookie") == "c=1; d=2"
	}},
	{"100 fields", "GET / HTTP/1.1\r\nHost: a\r\n" + strings.Repeat("X: y\r\n", 99) + "\r\n", func(h Head) bool { return len(h.Fields) == 100 }},
	{"method token", "M-SEARCH /x HTTP/1.1\r\nHost: a\r\n\r\n", func(h Head) bool { return h.Method == "M-SEARCH" }},
}

func TestParseAcceptTable(t *testing.T) {
	for _, tc := range acceptTests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := Parse([]byte(tc.in), 0)
			if err != nil {
				t.Fatalf("Parse(%q) error %v", tc.in, err)
			}
			if h.Size > len(tc.in) || h.Size <= 0 {
				t.Fatalf("Size %d", h.Size)
			}
			if !tc.check(h) {
				t.Errorf("Parse(%q) = %+v", tc.in, h)
			}
		})
	}
}

type rejectCase struct {
	name, in string
	max      int
	want     error
	status   int
}

var rejectTests = []rejectCase{
	// request line
	{"lowercase proto", "GET / http/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"no version", "GET /\r\n\r\n", 0, ErrBadRequest, 400},
	{"double SP", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"trailing SP", "GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"SP in target", "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"tab separator", "GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"bad method char", "GE(T / HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"ctl in target", "GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"non-ascii target", "GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"bad percent", "GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"short percent", "GET /a% HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"percent in authority", "GET http://a%41/ HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"fragment", "GET /#x HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"relative target", "GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"asterisk with GET", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"absolute-form userinfo", "GET http://u@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"absolute-form empty host", "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"ftp scheme", "GET ftp://h/ HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0, ErrVersion, 505},
	{"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 0, ErrVersion, 505},
	{"HTTP/0.9 style version", "GET / HTTP/0.9\r\n\r\n", 0, ErrVersion, 505},
	{"HTTP/10.0", "GET / HTTP/10.0\r\n\r\n", 0, ErrBadRequest, 400},
	{"CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 0, ErrMethod, 405},
	{"two leading empty lines bare", "\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBareLF, 400},
	{"leading CR junk", "\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	// bare LF
	{"bare LF request line", "GET / HTTP/1.1\nHost: a\r\n\r\n", 0, ErrBareLF, 400},
	{"bare LF field", "GET / HTTP/1.1\r\nHost: a\n\r\n", 0, ErrBareLF, 400},
	{"bare LF end", "GET / HTTP/1.1\r\nHost: a\r\n\n", 0, ErrBareLF, 400},
	{"bare LF first", "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, ErrBareLF, 400},
	{"bare CR end", "GET / HTTP/1.1\r\nHost: a\r\n\rX", 0, ErrBadRequest, 400},
	// fields
	{"obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 0, ErrBadRequest, 400},
	{"whitespace before first field", "GET / HTTP/1.1\r\n\tHost: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"space before colon", "GET / HTTP/1.1\r\nHost : a\r\n\r\n", 0, ErrBadRequest, 400},
	{"tab before colon", "GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 0, ErrBadRequest, 400},
	{"name not token", "GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n", 0, ErrBadRequest, 400},
	{"empty name", "GET / HTTP/1.1\r\nHost: a\r\n: z\r\n\r\n", 0, ErrBadRequest, 400},
	{"no colon", "GET / HTTP/1.1\r\nHost: a\r\nFoo\r\n\r\n", 0, ErrBadRequest, 400},
	{"NUL in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 0, ErrBadRequest, 400},
	{"CTL in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n", 0, ErrBadRequest, 400},
	{"DEL in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", 0, ErrBadRequest, 400},
	{"CR in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 0, ErrBadRequest, 400},
	{"101 fields", "GET / HTTP/1.1\r\nHost: a\r\n" + strings.Repeat("X: y\r\n", 100) + "\r\n", 0, ErrHeadTooLarge, 431},
	// Host
	{"no Host 1.1", "GET / HTTP/1.1\r\n\r\n", 0, ErrBadRequest, 400},
	{"no Host absolute-form", "GET http://h/ HTTP/1.1\r\n\r\n", 0, ErrBadRequest, 400},
	{"two Host", "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 0, ErrSmuggling, 400},
	{"bad Host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 0, ErrBadRequest, 400},
	{"Host userinfo", "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 0, ErrBadRequest, 400},
	// framing
	{"CL and TE", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE and CL", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 0, ErrSmuggling, 400},
	{"duplicate CL equal", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL sign", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL negative", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL empty", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 0, ErrSmuggling, 400},
	{"CL hex", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL inner space", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL overflow", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n", 0, ErrSmuggling, 400},
	{"CL huge", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE gzip", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE list", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE chunked twice", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE two fields", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE identity", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE xchunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 0, ErrSmuggling, 400},
	{"TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 0, ErrSmuggling, 400},
	// size and TLS
	{"too large", "GET /" + strings.Repeat("a", 100) + " HTTP/1.1\r\nHost: a\r\n\r\n", 64, ErrHeadTooLarge, 431},
	{"too large fields", "GET / HTTP/1.1\r\nHost: a\r\nX: " + strings.Repeat("a", 100), 64, ErrHeadTooLarge, 431},
	{"long target", "GET /" + strings.Repeat("a", 2*DefaultMaxHeadBytes), 0, ErrHeadTooLarge, 431},
	{"TLS 2 bytes", "\x16\x03", 0, ErrTLS, 400},
	{"TLS hello", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 0, ErrTLS, 400},
	{"0x16 not TLS", "\x16\x01", 0, ErrBadRequest, 400},
	// early rejection of partial request lines
	{"garbage prefix", "\x00\x01\x02", 0, ErrBadRequest, 400},
	{"partial bad target", "GET /a\x01", 0, ErrBadRequest, 400},
	{"partial bad proto", "GET / HTTX", 0, ErrBadRequest, 400},
	{"partial SSH", "SSH-2.0-OpenSSH_9.6\r", 0, ErrBadRequest, 400},
}

func TestParseRejectTable(t *testing.T) {
	for _, tc := range rejectTests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.in), tc.max)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Parse(%q) error %v, want %v", tc.in, err, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %T is not *Error", err)
			}
			if e.Status != tc.status || StatusOf(err) != tc.status {
				t.Errorf("status %d / StatusOf %d, want %d", e.Status, StatusOf(err), tc.status)
			}
			if !strings.HasPrefix(err.Error(), "upgrade: ") {
				t.Errorf("Error() = %q", err.Error())
			}
		})
	}
}

func TestParseIncomplete(t *testing.T) {
	for _, full := range []string{wsHead, pollHead, "\r\nGET / HTTP/1.0\r\n\r\n", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"} {
		for i := 0; i < len(full); i++ {
			_, err := Parse([]byte(full[:i]), 0)
			if err != ErrIncomplete {
				t.Fatalf("Parse(%q) = %v, want ErrIncomplete", full[:i], err)
			}
		}
		if _, err := Parse([]byte(full), len(full)); err != nil {
			t.Fatalf("Parse at exact max: %v", err)
		}
		if _, err := Parse([]byte(full), len(full)-1); !errors.Is(err, ErrHeadTooLarge) {
			t.Fatalf("Parse over max: %v", err)
		}
	}
	if _, err := Parse([]byte{0x16}, 0); err != ErrIncomplete {
		t.Errorf("single 0x16: %v", err)
	}
}

func TestStatusOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{ErrHeadTooLarge, 431}, {ErrVersion, 505}, {ErrMethod, 405}, {ErrTimeout, 408},
		{ErrSmuggling, 400}, {ErrTLS, 400}, {ErrIncomplete, 400}, {errors.New("x"), 400},
		{&Error{Status: 418, Reason: "teapot", Err: ErrBadRequest}, 418},
	} {
		if got := StatusOf(tc.err); got != tc.want {
			t.Errorf("StatusOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestParseIntoAliasesAndCloneOwns(t *testing.T) {
	b := []byte(wsHead)
	var h Head
	if err := ParseInto(&h, b, 0); err != nil {
		t.Fatal(err)
	}
	c := h.Clone()
	p, _ := Parse(b, 0)
	for i := range b {
		b[i] = 'X'
	}
	if h.Method == "GET" {
		t.Error("ParseInto head does not alias b (expected it to)")
	}
	for _, g := range []Head{c, p} {
		if g.Method != "GET" || g.Host != "example.com:8080" || g.Header("Upgrade") != "websocket" || g.Path != "/chat" {
			t.Errorf("owned head changed with b: %+v", g)
		}
	}
}

func TestParseIntoNoAlloc(t *testing.T) {
	for _, in := range []string{wsHead, pollHead} {
		b := []byte(in)
		h := Head{Fields: make([]Field, 0, 32)}
		allocs := testing.AllocsPerRun(100, func() {
			if err := ParseInto(&h, b, 0); err != nil {
				t.Fatal(err)
			}
			_ = h.Header("Host")
		})
		if allocs != 0 {
			t.Errorf("ParseInto allocs = %v", allocs)
		}
	}
	b := []byte(rejectTests[0].in)
	var h Head
	if a := testing.AllocsPerRun(100, func() { _ = ParseInto(&h, b, 0) }); a != 0 {
		t.Errorf("rejecting ParseInto allocs = %v", a)
	}
}
