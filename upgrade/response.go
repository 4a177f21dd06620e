package upgrade

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"unsafe"
)

// Limits on a response head.
const (
	maxResponseHead   = 64 << 10 // bytes of status line and fields
	maxResponseFields = 256
	max1xxResponses   = 5
	maxTrailerLines   = 100
)

// Errors of ReadResponseHead and Body.
var (
	ErrBadResponse    = errors.New("upgrade: malformed response")
	ErrTooMany1xx     = errors.New("upgrade: too many 1xx responses")
	ErrResponseTooBig = errors.New("upgrade: response head too large")
)

// parseContentLengthBounded is parseContentLength held to 18 digits, as a response's
// Content-Length is: more than an exabyte is a broken server.
func parseContentLengthBounded(v string) (int64, bool) {
	if len(v) > 18 {
		return 0, false
	}
	return parseContentLength(v)
}

// ParseChunkSize parses a chunk-size line (hex digits, optional extensions, which are
// dropped).
func ParseChunkSize(line []byte) (int64, bool) {
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		line = line[:i]
	}
	line = bytes.TrimRight(line, " \t")
	if len(line) == 0 || len(line) > 15 {
		return 0, false
	}
	var n int64
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		n = n<<4 | int64(d)
	}
	return n, true
}

// Response body framings.
const (
	BodyNone = iota
	BodyLength
	BodyChunked
	BodyUntilEOF
)

// Response is a response head as the proxy needs it. Its lines are copied into Raw,
// so they stay valid while the body is read through the same reader; fields are
// offsets into Raw. Reuse one Response: ReadResponseHead keeps its buffers.
type Response struct {
	Raw           []byte
	Fields        []RespField
	Status        int
	StatusText    Span // "200 OK": code and reason as sent
	ContentLength int64
	CLValue       Span // the Content-Length value as sent (HEAD answers)
	BodyMode      int
	Close         bool // the server closes the connection after this response
	HasConnection bool
}

// Span is a byte range of Response.Raw.
type Span struct{ Start, End int32 }

// RespField is a field of a Response, as spans of Raw.
type RespField struct{ Name, Value Span }

// Str returns the text of s, aliasing Raw: valid until the next ReadResponseHead.
func (r *Response) Str(s Span) string { return bstr(r.Raw[s.Start:s.End]) }

// bstr views b as a string without copying; only for use while b is unchanged.
func bstr(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

// NamedByConnection reports whether the response's Connection fields list name.
func (r *Response) NamedByConnection(name string) bool {
	for _, f := range r.Fields {
		if n := r.Str(f.Name); len(n) == 10 && equalFold(n, "Connection") && HasToken(r.Str(f.Value), name) {
			return true
		}
	}
	return false
}

// ReadResponseHead reads a status line and fields into rh, skipping interim (1xx)
// responses. Anything malformed is an error (ErrBadResponse, ErrTooMany1xx,
// ErrResponseTooBig, or the reader's): the caller closes the connection.
func ReadResponseHead(br *bufio.Reader, rh *Response, isHead bool) error {
	for n1xx := 0; ; n1xx++ {
		if n1xx > max1xxResponses {
			return ErrTooMany1xx
		}
		*rh = Response{Raw: rh.Raw[:0], Fields: rh.Fields[:0], ContentLength: -1}
		line, err := readRespLine(br, rh)
		if err != nil {
			if n1xx == 0 && len(rh.Raw) == 0 && err == io.EOF {
				return io.EOF
			}
			return err
		}
		// HTTP/1.x SP 3DIGIT [SP reason]
		l := rh.Raw[line.Start:line.End]
		if len(l) < 12 || string(l[:7]) != "HTTP/1." || (l[7] != '0' && l[7] != '1') || l[8] != ' ' ||
			(len(l) > 12 && l[12] != ' ') {
			return ErrBadResponse
		}
		minor := int(l[7] - '0')
		status := 0
		for _, c := range l[9:12] {
			if c < '0' || c > '9' {
				return ErrBadResponse
			}
			status = status*10 + int(c-'0')
		}
		if status < 100 {
			return ErrBadResponse
		}
		for _, c := range l[12:] {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return ErrBadResponse
			}
		}
		rh.Status = status
		rh.StatusText = Span{line.Start + 9, line.End}
		var nCL, nTE int
		var connClose, connKeep bool
		for {
			fl, err := readRespLine(br, rh)
			if err != nil {
				return err
			}
			if fl.Start == fl.End {
				break
			}
			f := rh.Raw[fl.Start:fl.End]
			if f[0] == ' ' || f[0] == '\t' {
				return ErrBadResponse // obs-fold
			}
			colon := bytes.IndexByte(f, ':')
			if colon <= 0 {
				return ErrBadResponse
			}
			for _, c := range f[:colon] {
				if !isTchar[c] {
					return ErrBadResponse
				}
			}
			vs, ve := colon+1, len(f)
			for vs < ve && (f[vs] == ' ' || f[vs] == '\t') {
				vs++
			}
			for ve > vs && (f[ve-1] == ' ' || f[ve-1] == '\t') {
				ve--
			}
			for _, c := range f[vs:ve] {
				if (c < ' ' && c != '\t') || c == 0x7f {
					return ErrBadResponse
				}
			}
			if len(rh.Fields) == maxResponseFields {
				return ErrResponseTooBig
			}
			rf := RespField{Span{fl.Start, fl.Start + int32(colon)}, Span{fl.Start + int32(vs), fl.Start + int32(ve)}}
			rh.Fields = append(rh.Fields, rf)
			name, value := bstr(f[:colon]), bstr(f[vs:ve])
			switch len(name) {
			case 10:
				if equalFold(name, "Connection") {
					rh.HasConnection = true
					connClose = connClose || HasToken(value, "close")
					connKeep = connKeep || HasToken(value, "keep-alive")
				}
			case 14:
				if equalFold(name, "Content-Length") {
					n, ok := parseContentLengthBounded(value)
					if !ok || (nCL > 0 && n != rh.ContentLength) {
						return ErrBadResponse
					}
					nCL++
					rh.ContentLength = n
					rh.CLValue = rf.Value
				}
			case 17:
				if equalFold(name, "Transfer-Encoding") {
					if nTE++; nTE > 1 || !equalFold(value, "chunked") {
						return ErrBadResponse // net/http supports exactly one "chunked"
					}
				}
			}
		}
		if status < 200 {
			if status == 101 {
				return ErrBadResponse // no upgrade was asked for
			}
			continue // 100 Continue and other interim answers: the client does not see them
		}
		rh.Close = connClose || (minor == 0 && !connKeep)
		switch {
		case isHead || status == 204 || status == 304:
			rh.BodyMode = BodyNone
		case nTE > 0:
			rh.BodyMode = BodyChunked
			rh.ContentLength = -1
		case nCL > 0:
			rh.BodyMode = BodyLength
		default:
			rh.BodyMode = BodyUntilEOF
			rh.Close = true
		}
		if nTE > 0 {
			rh.ContentLength = -1
		}
		return nil
	}
}

// readRespLine appends one line of the worker's head (without its line end) to rh.Raw
// and returns where it is.
func readRespLine(br *bufio.Reader, rh *Response) (Span, error) {
	start := len(rh.Raw)
	for {
		frag, err := br.ReadSlice('\n')
		if len(rh.Raw)+len(frag) > maxResponseHead {
			return Span{}, ErrResponseTooBig
		}
		rh.Raw = append(rh.Raw, frag...)
		if err == nil {
			break
		}
		if err != bufio.ErrBufferFull {
			if err == io.EOF && len(rh.Raw) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return Span{}, err
		}
	}
	end := len(rh.Raw) - 1
	if end > start && rh.Raw[end-1] == '\r' {
		end--
	}
	return Span{int32(start), int32(end)}, nil
}

// Waiter is told before a body read that may block: the proxy flushes what its
// client has not been sent yet (so long-polls and streamed answers reach it at once)
// and bounds the wait; an error ends the body.
type Waiter interface{ WaitRead() error }

// Body reads a response body through R without copying: each piece is valid until
// the next call. Set R, Mode and N (ContentLength) from the Response.
type Body struct {
	R       *bufio.Reader
	Wait    Waiter // nil: reads block without notice
	Mode    int
	N       int64 // BodyLength: bytes left; BodyChunked: bytes left in this chunk
	started bool  // BodyChunked: a chunk's data was read (its CRLF follows)
	done    bool
}

// fill makes sure R holds at least one byte, telling Wait before it may block.
func (r *Body) fill() error {
	if r.R.Buffered() > 0 {
		return nil
	}
	if r.Wait != nil {
		if err := r.Wait.WaitRead(); err != nil {
			return err
		}
	}
	_, err := r.R.Peek(1)
	return err
}

// Next returns the next piece of the body, at most max bytes; io.EOF at its end.
func (r *Body) Next(max int) ([]byte, error) {
	if r.done {
		return nil, io.EOF
	}
	switch r.Mode {
	case BodyNone:
		r.done = true
		return nil, io.EOF
	case BodyLength:
		if r.N == 0 {
			r.done = true
			return nil, io.EOF
		}
		if err := r.fill(); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		return r.take(int(min(r.N, int64(max)))), nil
	case BodyUntilEOF:
		if err := r.fill(); err != nil {
			if err == io.EOF {
				r.done = true
			}
			return nil, err
		}
		return r.take(max), nil
	}
	if r.N == 0 {
		if r.started {
			if line, err := r.line(); err != nil {
				return nil, err
			} else if len(line) != 0 {
				return nil, ErrBadResponse
			}
		}
		line, err := r.line()
		if err != nil {
			return nil, err
		}
		size, ok := ParseChunkSize(line)
		if !ok {
			return nil, ErrBadResponse
		}
		if size == 0 {
			for i := 0; ; i++ { // trailer fields: dropped, as net/http's client drops them
				if i == maxTrailerLines {
					return nil, ErrBadResponse
				}
				line, err := r.line()
				if err != nil {
					return nil, err
				}
				if len(line) == 0 {
					break
				}
			}
			r.done = true
			return nil, io.EOF
		}
		r.N, r.started = size, true
	}
	if err := r.fill(); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return r.take(int(min(r.N, int64(max)))), nil
}

// take consumes up to max buffered bytes (at least one is buffered).
func (r *Body) take(max int) []byte {
	k := min(r.R.Buffered(), max)
	p, _ := r.R.Peek(k)
	r.R.Discard(k)
	if r.Mode != BodyUntilEOF {
		r.N -= int64(k)
	}
	return p
}

// line reads one line of chunked framing without its line end.
func (r *Body) line() ([]byte, error) {
	if buffered, _ := r.R.Peek(r.R.Buffered()); bytes.IndexByte(buffered, '\n') < 0 && r.Wait != nil {
		if err := r.Wait.WaitRead(); err != nil {
			return nil, err
		}
	}
	line, err := r.R.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull {
			return nil, ErrBadResponse
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	line = line[:len(line)-1]
	if len(line) > 0 && line[len(line)-1] == '\r' {
		line = line[:len(line)-1]
	}
	return line, nil
}

// Read lets the body be read like any reader.
func (r *Body) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	piece, err := r.Next(len(p))
	return copy(p, piece), err
}
