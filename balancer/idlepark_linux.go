//go:build linux

package balancer

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// idlePark holds keep-alive client connections between requests with no goroutine: a
// goroutine parked on the runtime's poller keeps its stack (4 KiB at least, most of what
// an idle connection cost). Each parked connection is in one epoll set of the edge's own,
// one-shot, watched by a single goroutine; when its next request arrives (or it closes) a
// goroutine is started to serve it, and its idle timeout is a runtime timer, not a
// goroutine. The connection's descriptor stays registered with the runtime's poller too:
// an epoll set may share a descriptor with another.
type idlePark struct {
	once sync.Once
	epfd int
	err  error
	// failed is set when the park cannot take connections (its epoll set could not be
	// made, or its poller failed): read without the once, on every keep-alive request.
	failed atomic.Bool
	mu     sync.Mutex
	conns  map[int32]*parkedIdle
}

type parkedIdle struct {
	cc    *clientConn
	fd    int32
	timer *time.Timer
}

func (p *idlePark) start() {
	p.epfd, p.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if p.err != nil {
		p.failed.Store(true)
		return
	}
	p.mu.Lock()
	p.conns = map[int32]*parkedIdle{}
	p.mu.Unlock()
}

// parkIdle parks cc, a plain-socket connection with nothing buffered between requests.
// It reports false when the connection cannot be parked (the caller then waits for it
// in its goroutine, as before). After true, the connection belongs to the park: resume
// (its next request, or its end) or the idle timeout (close and untrack) takes it over.
func (b *Balancer) parkIdle(cc *clientConn) bool {
	p := &b.idle
	p.once.Do(func() {
		p.start()
		if p.err == nil {
			go b.runIdlePark()
		}
	})
	if p.err != nil || p.failed.Load() || b.frozen() || b.isClosing() {
		return false
	}
	switch cc.c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return false // TLS keeps decrypted bytes of its own the socket does not show
	}
	rc, err := cc.c.(syscall.Conn).SyscallConn()
	if err != nil {
		return false
	}
	fd := int32(-1)
	rc.Control(func(s uintptr) { fd = int32(s) })
	if fd < 0 {
		return false
	}
	pi := &parkedIdle{cc: cc, fd: fd}
	pi.timer = time.AfterFunc(b.cfg.IdleTimeout, func() {
		if p.take(fd, pi) {
			cc.c.Close()
			b.untrack(cc)
		}
	})
	p.mu.Lock()
	p.conns[fd] = pi
	p.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: fd}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); err != nil {
		if p.take(fd, pi) {
			return false // the caller keeps it
		}
		return true // the timer took it already
	}
	if b.frozen() || b.isClosing() {
		// Shutdown or an edge upgrade began meanwhile and may have woken the others
		// already: this one wakes by itself, its deadline passed.
		if p.take(fd, pi) {
			cc.c.SetReadDeadline(time.Unix(1, 0))
			return false
		}
	}
	return true
}

// canParkIdle reports whether parkIdle can take c once it is idle: a plain socket, and
// the park's epoll set works (or is not made yet). The keep-alive wait (awaitRequest)
// holds the connection's buffers for parkAfter only when a longer wait will be parked
// without them.
func (b *Balancer) canParkIdle(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return false
	}
	return !b.idle.failed.Load()
}

// take removes fd's entry if it is still want (or any, with want nil) and reports whether
// it did: exactly one of the wake-up, the timeout and wakeParked gets each connection.
func (p *idlePark) take(fd int32, want *parkedIdle) bool {
	p.mu.Lock()
	pi := p.conns[fd]
	if pi == nil || (want != nil && pi != want) {
		p.mu.Unlock()
		return false
	}
	delete(p.conns, fd)
	p.mu.Unlock()
	unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	pi.timer.Stop()
	return true
}

func (b *Balancer) runIdlePark() {
	p := &b.idle
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			b.log.Error("idle keep-alive poller failed; idle connections are closed", "err", err)
			p.failed.Store(true) // nothing would wake connections parked from now on
			b.wakeParked()
			return
		}
		for _, ev := range events[:n] {
			p.mu.Lock()
			pi := p.conns[ev.Fd]
			p.mu.Unlock()
			if pi != nil && p.take(ev.Fd, pi) {
				go b.resumeIdle(pi.cc)
			}
		}
	}
}

// wakeParked resumes every parked connection now (shutdown, edge upgrade): each one's
// goroutine then does what an idle connection woken by a deadline does.
func (b *Balancer) wakeParked() {
	p := &b.idle
	p.mu.Lock()
	var all []*parkedIdle
	for _, pi := range p.conns {
		all = append(all, pi)
	}
	p.mu.Unlock()
	for _, pi := range all {
		if p.take(pi.fd, pi) {
			go b.resumeIdle(pi.cc)
		}
	}
}

// parkedIdleConns counts the parked connections (tests).
func (b *Balancer) parkedIdleConns() int {
	b.idle.mu.Lock()
	defer b.idle.mu.Unlock()
	return len(b.idle.conns)
}
