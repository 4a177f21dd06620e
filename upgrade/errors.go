package upgrade

import (
	"errors"
	"net/http"
)

// Sentinel errors. Rejections are returned as [*Error] values that unwrap to
// one of these; test with errors.Is.
var (
	// ErrIncomplete means the buffer does not hold a complete head yet. It is
	// not a client error by itself: read more bytes and parse again.
	ErrIncomplete = errors.New("upgrade: incomplete request head")
	// ErrHeadTooLarge: no head end within the size cap, or more than
	// MaxFields fields (431).
	ErrHeadTooLarge = errors.New("upgrade: request head too large")
	// ErrBadRequest: generic malformed head (400).
	ErrBadRequest = errors.New("upgrade: bad request")
	// ErrSmuggling: framing a proxy and a server could disagree on (400):
	// Content-Length with Transfer-Encoding, duplicate or invalid
	// Content-Length, Transfer-Encoding other than exactly "chunked" (or in
	// HTTP/1.0), duplicate Host.
	ErrSmuggling = errors.New("upgrade: ambiguous request framing")
	// ErrBareLF: a line ended with LF without CR (400).
	ErrBareLF = errors.New("upgrade: bare LF in request head")
	// ErrVersion: protocol other than HTTP/1.0 or HTTP/1.1, including the
	// HTTP/2 connection preface (505).
	ErrVersion = errors.New("upgrade: unsupported HTTP version")
	// ErrMethod: CONNECT; the edge is not a forward proxy (405).
	ErrMethod = errors.New("upgrade: method not allowed")
	// ErrTLS: the bytes look like a TLS ClientHello (0x16 0x03). Close the
	// connection without an HTTP answer and log "TLS is not enabled on this
	// port". StatusOf reports 400.
	ErrTLS = errors.New("upgrade: TLS handshake on a plain HTTP port")
	// ErrTimeout: the read deadline passed before a complete head (408).
	ErrTimeout = errors.New("upgrade: timeout reading request head")
)

// Error is a rejected head; Status is the HTTP status to answer with and Err
// is one of the package's sentinel errors.
//
// Errors returned by this package may be shared values: do not modify them.
type Error struct {
	Status int
	Reason string
	Err    error
}

func (e *Error) Error() string { return "upgrade: " + e.Reason }

// Unwrap returns the sentinel.
func (e *Error) Unwrap() error { return e.Err }

// StatusOf returns the HTTP status for err: Error.Status for an [*Error], the
// sentinel's status for a bare sentinel, and 400 otherwise (including
// ErrIncomplete and ErrTLS).
func StatusOf(err error) int {
	var e *Error
	if errors.As(err, &e) && e.Status != 0 {
		return e.Status
	}
	switch {
	case errors.Is(err, ErrHeadTooLarge):
		return http.StatusRequestHeaderFieldsTooLarge
	case errors.Is(err, ErrVersion):
		return http.StatusHTTPVersionNotSupported
	case errors.Is(err, ErrMethod):
		return http.StatusMethodNotAllowed
	case errors.Is(err, ErrTimeout):
		return http.StatusRequestTimeout
	}
	return http.StatusBadRequest
}

func bad(reason string) *Error { return &Error{http.StatusBadRequest, reason, ErrBadRequest} }
func smuggle(reason string) *Error {
	return &Error{http.StatusBadRequest, reason, ErrSmuggling}
}

// Preallocated rejections: the reject path does not allocate.
var (
	errTooLarge      = &Error{http.StatusRequestHeaderFieldsTooLarge, "request head too large", ErrHeadTooLarge}
	errTooManyFields = &Error{http.StatusRequestHeaderFieldsTooLarge, "too many header fields", ErrHeadTooLarge}
	errBareLF        = &Error{http.StatusBadRequest, "bare LF in request head", ErrBareLF}
	errVersion       = &Error{http.StatusHTTPVersionNotSupported, "unsupported HTTP version", ErrVersion}
	errConnect       = &Error{http.StatusMethodNotAllowed, "CONNECT is not supported", ErrMethod}
	errTLS           = &Error{http.StatusBadRequest, "TLS is not enabled on this port", ErrTLS}
	errTimeout       = &Error{http.StatusRequestTimeout, "timeout reading request head", ErrTimeout}

	errMethod       = bad("invalid method")
	errRequestLine  = bad("malformed request line")
	errTarget       = bad("invalid request target")
	errProto        = bad("malformed HTTP version")
	errObsFold      = bad("obsolete line folding or whitespace before field")
	errSpaceColon   = bad("whitespace between field name and colon")
	errFieldName    = bad("invalid field name")
	errFieldValue   = bad("invalid character in field value")
	errNoHost       = bad("missing Host in HTTP/1.1 request")
	errHost         = bad("invalid Host")
	errAsteriskForm = bad("asterisk-form target is only allowed with OPTIONS")

	errDupCL   = smuggle("duplicate Content-Length")
	errBadCL   = smuggle("invalid Content-Length")
	errCLTE    = smuggle("Content-Length with Transfer-Encoding")
	errTE      = smuggle("unsupported Transfer-Encoding")
	errTE10    = smuggle("Transfer-Encoding in HTTP/1.0 request")
	errDupHost = smuggle("duplicate Host")
	errDupTE   = smuggle("duplicate Transfer-Encoding")
)
