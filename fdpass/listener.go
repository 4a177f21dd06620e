//go:build unix

package fdpass

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

// Environment variables through which the edge tells a worker where its channel is.
const (
	// EnvFD names an inherited descriptor: the worker's end of a SEQPACKET socketpair.
	EnvFD = "STICKYD_FD"
	// EnvControl names the edge's control socket path (sidecar mode).
	EnvControl = "STICKYD_CONTROL"
	// EnvWorkerID is the worker's slot, for logs and pages.
	EnvWorkerID = "STICKYD_WORKER_ID"
)

// ErrNoChannel means the process was not started by stickyd and no control path was given.
var ErrNoChannel = errors.New("fdpass: no stickyd channel: set " + EnvFD + " (inherited socket) or " + EnvControl + " (control socket path); run the worker under `stickyd run` or `stickyd serve`")

// Conn is a connection handed off by the edge. Reads return the bytes the edge had
// already consumed before anything new from the socket; RemoteAddr and LocalAddr are
// the client-side addresses the edge saw.
type Conn struct {
	net.Conn
	meta    Meta
	pending []byte
}

func newConn(c net.Conn, m Meta) *Conn {
	return &Conn{Conn: c, meta: m, pending: m.Consumed}
}

func (c *Conn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			c.pending = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// RemoteAddr is the client's address as the edge saw it (the socket's own peer for a
// TCP connection, which is the same; for a virtual connection, the edge's socketpair).
func (c *Conn) RemoteAddr() net.Addr {
	if c.meta.Remote.IsValid() {
		return net.TCPAddrFromAddrPort(c.meta.Remote)
	}
	return c.Conn.RemoteAddr()
}

// LocalAddr is the address the client connected to.
func (c *Conn) LocalAddr() net.Addr {
	if c.meta.Local.IsValid() {
		return net.TCPAddrFromAddrPort(c.meta.Local)
	}
	return c.Conn.LocalAddr()
}

// Meta returns the metadata the edge sent with the connection.
func (c *Conn) Meta() Meta { return c.meta }

// NetConn returns the underlying socket.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// CloseWrite lets net/http half-close before closing, so an error response is not lost
// to a reset when the client still has unread input.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// Listener is a net.Listener whose connections come from the stickyd edge. Accept reads
// the channel itself: no goroutine sits between the socket and the server's accept loop.
type Listener struct {
	uc   *net.UnixConn
	done chan struct{}
	once sync.Once

	recvMu sync.Mutex // one Accept reads the channel at a time
	buf    []byte     // Accept's receive buffer

	mu  sync.Mutex
	err error // why the channel stopped
}

// Listen connects a Go worker to the edge that started it ($STICKYD_FD) or, in sidecar
// mode, to the edge's control socket ($STICKYD_CONTROL), announces the worker, and returns
// a listener for the connections the edge hands over.
func Listen() (*Listener, error) {
	if s := os.Getenv(EnvFD); s != "" {
		fd, err := strconv.Atoi(s)
		if err != nil || fd < 3 {
			return nil, fmt.Errorf("fdpass: %s=%q is not an inherited descriptor number", EnvFD, s)
		}
		f := os.NewFile(uintptr(fd), "stickyd-channel")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("fdpass: %s=%d: %w", EnvFD, fd, err)
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			return nil, fmt.Errorf("fdpass: %s=%d is not a Unix socket", EnvFD, fd)
		}
		os.Unsetenv(EnvFD) // children of the worker must not think they own the channel
		return NewListener(uc)
	}
	if path := os.Getenv(EnvControl); path != "" {
		return Dial(path)
	}
	return nil, ErrNoChannel
}

// Dial connects to an edge's control socket at path (sidecar mode).
func Dial(path string) (*Listener, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("fdpass: dial control socket %s: %w (is `stickyd serve -control %s` running, and may this user open it?)", path, err, path)
	}
	return NewListener(c)
}

// NewListener serves connections arriving on uc and announces this worker to the edge.
func NewListener(uc *net.UnixConn) (*Listener, error) {
	l := &Listener{uc: uc, done: make(chan struct{})}
	uc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	err := Send(uc, nil, Meta{Kind: KindHello, Value: uint64(os.Getpid())})
	uc.SetWriteDeadline(time.Time{})
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("fdpass: announce worker: %w", err)
	}
	// Until the server calls Accept, nothing reads the channel, and that is the point:
	// a worker that does not accept fills its channel and the edge routes elsewhere.
	// Done must still report an edge that went away, so watch for the hang-up.
	go l.watchHangup()
	return l, nil
}

// watchHangup closes Done when the edge closes the channel even while nobody calls
// Accept (a worker draining its WebSockets must still learn the edge is gone).
func (l *Listener) watchHangup() {
	raw, err := l.uc.SyscallConn()
	if err != nil {
		return
	}
	for {
		fds := []unix.PollFd{{Events: platform.PollRDHUP}}
		var n int
		var perr error
		cerr := raw.Control(func(fd uintptr) {
			fds[0].Fd = int32(fd)
			n, perr = unix.Poll(fds, 1000)
		})
		select {
		case <-l.done:
			return
		default:
		}
		if cerr != nil {
			return
		}
		if perr == nil && n > 0 && fds[0].Revents&(platform.PollRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
			l.stop(os.ErrClosed)
			return
		}
	}
}

func (l *Listener) stop(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
	}
	l.mu.Unlock()
	l.Close()
}

// Accept waits for the next connection from the edge. Once the edge closes the channel
// Accept returns an error wrapping net.ErrClosed, which ends http.Server.Serve.
func (l *Listener) Accept() (net.Conn, error) {
	l.recvMu.Lock()
	defer l.recvMu.Unlock()
	if l.buf == nil {
		l.buf = make([]byte, recvBufSize)
	}
	for {
		select {
		case <-l.done:
			return nil, l.closedErr()
		default:
		}
		c, _, err := acceptInto(l.uc, l.buf)
		if err != nil {
			if errors.Is(err, ErrTruncated) || errors.Is(err, ErrBadMeta) || errors.Is(err, ErrNoFD) {
				continue // one lost connection; the channel itself is fine
			}
			l.stop(err)
			return nil, l.closedErr()
		}
		if c != nil {
			return c, nil
		}
	}
}

func (l *Listener) closedErr() error {
	l.mu.Lock()
	err := l.err
	l.mu.Unlock()
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("fdpass: channel to the edge: %v: %w", err, net.ErrClosed)
	}
	return net.ErrClosed
}

// Close stops accepting and closes the channel; connections already accepted stay open.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.uc.Close()
	})
	return nil
}

// Done is closed when the listener stops, by Close or because the edge went away.
func (l *Listener) Done() <-chan struct{} { return l.done }

// Addr names the channel; a worker fed by the edge has no TCP address of its own.
func (l *Listener) Addr() net.Addr { return channelAddr }

var channelAddr = &net.UnixAddr{Name: "stickyd-channel", Net: "unixpacket"}

// ReportWebSockets tells the edge how many WebSockets this worker holds (for metrics and
// load). It never blocks longer than a second.
func (l *Listener) ReportWebSockets(n int) error {
	l.uc.SetWriteDeadline(time.Now().Add(time.Second))
	defer l.uc.SetWriteDeadline(time.Time{})
	return Send(l.uc, nil, Meta{Kind: KindStats, Value: uint64(n)})
}

// ReportWebSocketsFrom tells the edge how many WebSockets this worker holds — count(),
// typically an wsworker.Tracker's Len — whenever the number changes, checking once a
// second, until ctx ends or the listener stops. Run it in its own goroutine.
func (l *Listener) ReportWebSocketsFrom(ctx context.Context, count func() int) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last := -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.done:
			return
		case <-tick.C:
			if n := count(); n != last && l.ReportWebSockets(n) == nil {
				last = n
			}
		}
	}
}
