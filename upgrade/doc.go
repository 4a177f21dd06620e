// Package upgrade is stickyd's HTTP/1.x wire code: it reads, validates and
// classifies the request head that starts every client connection of the
// edge, recognises engine.io handshakes, and reads the workers' responses
// (status line, fields, Content-Length and chunked bodies) for the
// per-request proxy. It is pure: no sockets of its own, no goroutines.
//
// The package does no I/O beyond the connection it is handed.
//
// # Parsing
//
// [Parse] and [ParseInto] implement a strict subset of RFC 9112: anything a
// front end and a back end could disagree on (CL+TE, duplicate or malformed
// Content-Length, Transfer-Encoding other than a single "chunked", duplicate
// Host, bare LF, obs-fold, whitespace before the colon, ...) is rejected with
// an [*Error] that carries the HTTP status to answer with and unwraps to one
// of the sentinel errors (ErrSmuggling, ErrBareLF, ...). Parsers never panic.
//
// # Aliasing
//
// [ParseInto] and [PeekInto] are the hot path: every string in the resulting
// [Head] (Method, Target, Path, Fields, Host, ...) points into the byte slice
// that was parsed. The Head is valid only while those bytes are unchanged;
// reusing or pooling the buffer invalidates it. Call [Head.Clone] to keep a
// Head longer. [Parse] and [Peek] return a Head that owns its memory.
//
// # Peeking
//
// [Peek] waits, inside the Go poller, until the socket's receive queue holds a
// complete request head, using recvfrom(MSG_PEEK) so nothing is consumed: the
// worker that later receives the file descriptor reads the same bytes.
package upgrade
