//go:build unix

package workers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stickyd/stickyd/fdpass"
)

// Dialer is a Channel that reaches its worker by dialing an address instead of handing it
// descriptors: a backend of `stickyd proxy`, a server that listens on its own address.
// Worker.DialVirtual dials it, so proxied requests reuse keep-alive connections to the
// backend from the worker's pool exactly as they reuse socketpairs to a child; the edge
// tunnels WebSocket upgrades to it (it cannot take the client's descriptor).
type Dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
}

var (
	// ErrNoDescriptors is Deliver's answer on a backend: it cannot take a descriptor;
	// the edge tunnels the connection to it instead.
	ErrNoDescriptors = errors.New("workers: a backend reached by address cannot take a connection's descriptor; the edge must tunnel to it")
	// ErrBadBackend names a -backend address stickyd cannot use.
	ErrBadBackend = errors.New("workers: bad backend address")
	// ErrBackendDown is wrapped by a dial that failed: the backend refused or could not be
	// reached.
	ErrBackendDown = errors.New("workers: backend unreachable")
)

// backendDialTimeout bounds one connect to a backend when the caller's context has no
// earlier deadline: a backend that does not answer SYNs is treated like a worker that
// does not take connections (ErrWorkerTimeout: no new sessions for a while).
const backendDialTimeout = 3 * time.Second

// ParseBackendAddr splits a -backend address: "host:port" (TCP) or "unix:/path". DNS
// backends ("dns:NAME:PORT") are expanded by Backends, not here.
func ParseBackendAddr(s string) (network, address string, err error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutPrefix(s, "unix:"); ok {
		if p == "" {
			return "", "", fmt.Errorf("%w %q: want unix:/path/to/socket", ErrBadBackend, s)
		}
		return "unix", p, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || port == "" {
		return "", "", fmt.Errorf("%w %q: want host:port, unix:/path or dns:NAME:PORT", ErrBadBackend, s)
	}
	if host == "" {
		host = "127.0.0.1" // ":3000" means this machine, as for -listen's clients
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// BackendChannel is the Channel of a backend: every connection to it is a dial.
type BackendChannel struct {
	Network, Address string

	// OnDialError, if set, is told of every failed dial (passive health).
	OnDialError func(err error)

	tunnels atomic.Int64
	done    chan struct{}
	once    sync.Once
}

// NewBackendChannel returns the channel of the backend at network/address.
func NewBackendChannel(network, address string, onDialError func(error)) *BackendChannel {
	return &BackendChannel{Network: network, Address: address, OnDialError: onDialError, done: make(chan struct{})}
}

// Dial connects to the backend. A refusal or an unreachable address wraps ErrBackendDown;
// a connect that does not finish in time wraps ErrWorkerTimeout.
func (c *BackendChannel) Dial(ctx context.Context) (net.Conn, error) {
	select {
	case <-c.done:
		return nil, fmt.Errorf("%w: %s left routing", ErrBackendDown, c)
	default:
	}
	d := net.Dialer{Timeout: backendDialTimeout}
	conn, err := d.DialContext(ctx, c.Network, c.Address)
	if err != nil {
		switch {
		case LocalDialError(err):
			// The edge is out of descriptors or ports: nothing to hold against the
			// backend (ejecting it would forget every session it holds).
			return nil, fmt.Errorf("connect to %s: %w", c, err)
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || isTimeoutErr(err):
			err = fmt.Errorf("%w: connect to %s: %v", ErrWorkerTimeout, c, err)
		default:
			err = fmt.Errorf("%w: %s: %v", ErrBackendDown, c, err)
		}
		// A caller that gave up (its client left) says nothing about the backend.
		if c.OnDialError != nil && !errors.Is(ctx.Err(), context.Canceled) {
			c.OnDialError(err)
		}
		return nil, err
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	return conn, nil
}

// LocalDialError reports whether a failed connect is the edge's own shortage (descriptors,
// ephemeral ports, kernel memory), which says nothing about the backend.
func LocalDialError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.EADDRNOTAVAIL) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TunnelOpened counts a tunnel to the backend until the returned function is called: the
// backend's WebSockets, which the edge knows exactly since it holds every one.
func (c *BackendChannel) TunnelOpened() (closed func()) {
	c.tunnels.Add(1)
	var once sync.Once
	return func() { once.Do(func() { c.tunnels.Add(-1) }) }
}

func (c *BackendChannel) String() string {
	if c.Network == "unix" {
		return "unix:" + c.Address
	}
	return c.Address
}

// Deliver always fails: a backend has no descriptor channel.
func (c *BackendChannel) Deliver(context.Context, syscall.Conn, fdpass.Meta) error {
	return ErrNoDescriptors
}

// CanReplay is false: the edge writes what it read into the tunnel itself.
func (c *BackendChannel) CanReplay() bool { return false }

// Done is closed when the backend leaves routing (removed, or ejected as unhealthy).
func (c *BackendChannel) Done() <-chan struct{} { return c.done }

// WebSockets is the number of tunnels the edge holds to the backend.
func (c *BackendChannel) WebSockets() int64 { return c.tunnels.Load() }

// Close marks the backend gone; connections already open stay.
func (c *BackendChannel) Close() error {
	c.once.Do(func() { close(c.done) })
	return nil
}

var _ Dialer = (*BackendChannel)(nil)
