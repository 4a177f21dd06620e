//go:build unix

package nodeipc

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
)

// SharedListeners owns the listening sockets of the servers an app listens on besides its app
// server (the one that receives the edge's traffic), e.g. an http-proxy front on 8000 whose
// target is the app's own server on 9000. Each is bound once, per Node handle key (address,
// port, address type and per-process server index, as Node's primary does), and handed to every
// worker that asks (Node's "shared handle" mode: the workers accept on it directly).
//
// The zero value is ready to use. One SharedListeners should be shared by all the Primaries of
// one app (set Primary.Shared); the balancer closes it when the app stops.
type SharedListeners struct {
	mu     sync.Mutex
	m      map[string]net.Listener
	closed bool
}

// errnoEINVAL is libuv's UV_EINVAL on Linux (libuv errors are negated errno values).
const errnoEINVAL = -int(syscall.EINVAL)

// listener returns the socket for q, binding it on first use. On failure errno is the libuv
// error code for the worker (e.g. -98 for EADDRINUSE).
func (s *SharedListeners) listener(q QueryServer) (ln net.Listener, errno int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errnoEINVAL, fmt.Errorf("nodeipc: shared listeners: %w", net.ErrClosed)
	}
	if ln := s.m[q.Key]; ln != nil {
		return ln, 0, nil
	}
	var network, addr string
	switch {
	case q.FD != nil:
		return nil, errnoEINVAL, fmt.Errorf("nodeipc: listen on an inherited fd is not supported")
	case q.AddressType == 4 || q.AddressType == 6:
		network = "tcp"
		if q.AddressType == 6 && q.Address != "" {
			network = "tcp6"
		}
		addr = net.JoinHostPort(q.Address, strconv.Itoa(q.Port))
	case q.AddressType == -1 && q.Address != "":
		network, addr = "unix", q.Address
	default:
		return nil, errnoEINVAL, fmt.Errorf("nodeipc: unsupported server address type %d", q.AddressType)
	}
	ln, err = net.Listen(network, addr)
	if err != nil {
		errno = errnoEINVAL
		var en syscall.Errno
		if errors.As(err, &en) {
			errno = -int(en)
		}
		return nil, errno, fmt.Errorf("nodeipc: shared listener: %w", err)
	}
	if s.m == nil {
		s.m = make(map[string]net.Listener)
	}
	s.m[q.Key] = ln
	return ln, 0, nil
}

// Addrs returns the addresses of the sockets bound so far.
func (s *SharedListeners) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, 0, len(s.m))
	for _, ln := range s.m {
		out = append(out, ln.Addr())
	}
	return out
}

// Close closes the edge's copies of every socket. Workers keep serving on theirs until they
// exit; later queries fail.
func (s *SharedListeners) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	var errs []error
	for k, ln := range s.m {
		if err := ln.Close(); err != nil {
			errs = append(errs, err)
		}
		delete(s.m, k)
	}
	return errors.Join(errs...)
}
