//go:build unix

package nodeipc

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Handing a worker over to the next edge image (an in-place upgrade: the edge execve()s a new
// binary, keeping its pid, so the Node workers stay its children and never notice).
//
//	st, err := primary.Detach()       // ErrBusy: retry; nothing changed
//	fds, err := shared.Detach()       // the app's SharedListeners, once all its Primaries detached
//	... serialise st and fds (JSON), execve ...
//	shared := new(nodeipc.SharedListeners); shared.Adopt(fds)
//	p, err := nodeipc.ResumePrimary(st, cfg)
//	p.Shared, p.OnQueryServer, p.Logger = shared, choose, log
//	go p.Run(ctx)
//
// Every descriptor in the state is a plain descriptor owned by the state: marked to survive
// execve, not close-on-exec, owned by no Go object. If the exec does not happen, resume in
// this process the same way (or close them).

// PrimaryState is what a Primary hands to the next edge image. JSON-serialisable.
type PrimaryState struct {
	FD           int               // the channel's descriptor, marked to survive execve
	Pending      []byte            // bytes read from the channel but not yet consumed as a complete line
	Queued       []json.RawMessage `json:",omitempty"` // complete lines received but not yet handled, in order
	Seq          int64             // the primary's next seq number
	Style        Style
	AppKey       string
	AppListening bool
	Ready        bool       // Ready() was closed
	OwnShared    []SharedFD `json:",omitempty"` // the Primary's own shared listeners (Primary.Shared was nil)
	WebSockets   int64      `json:",omitempty"` // the last count the preload reported
}

// SharedFD is one listening socket of a SharedListeners handed to the next edge image.
type SharedFD struct {
	Key     string // Node's handle key
	FD      int    // marked to survive execve
	Network string // "tcp", "tcp6" or "unix" (informational; the socket says what it is)
	Addr    string // its address, for logs
}

type detachRequest struct {
	reply chan detachResult // capacity 1
}

type detachResult struct {
	st  PrimaryState
	err error
}

// Detach stops Run and the channel's reader goroutine without closing the socket, and
// returns the state for ResumePrimary. Messages the child sent that Run has not handled yet
// travel in the state (Queued, and Pending for an incomplete line), so nothing is lost.
//
// It fails with ErrBusy, leaving everything running, if a handle is in flight (a Deliver
// or a shared listener waiting for its ACK), another write is in progress, or a newconn
// reply is pending; with an error wrapping ErrClosed if the channel is closed (the worker
// went away) or was already detached. After a successful Detach, Run returns ErrDetached,
// Deliver and the Channel's methods fail with ErrClosed (wrapping ErrDetached), and the
// Primary and its Channel must not be used; Close on the Channel is harmless. Events
// already queued in Events() can still be read.
//
// When the Primary used its own SharedListeners (Shared was nil when Run started), they are
// detached too, into OwnShared. A SharedListeners the caller set is not touched: detach it
// with SharedListeners.Detach once every Primary using it is detached.
func (p *Primary) Detach() (PrimaryState, error) {
	p.init()
	if p.Channel == nil {
		return PrimaryState{}, errors.New("nodeipc: Detach: no Channel")
	}
	// Fail fast while a handle waits for its ACK: Run may be inside such a send itself
	// (a shared listener), and would pause only after the ACK.
	p.Channel.mu.Lock()
	inflight := p.Channel.inflight
	p.Channel.mu.Unlock()
	if inflight {
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: a handle is in flight: %w", ErrBusy)
	}
	for {
		p.mu.Lock()
		if p.detached {
			p.mu.Unlock()
			return PrimaryState{}, fmt.Errorf("nodeipc: Detach: %w: %w", ErrClosed, ErrDetached)
		}
		if p.detachReq != nil {
			p.mu.Unlock()
			return PrimaryState{}, fmt.Errorf("nodeipc: Detach: another Detach is in progress: %w", ErrBusy)
		}
		runGone := false
		select {
		case <-p.runDone:
			runGone = true
		default:
		}
		if !p.started || runGone {
			// Nobody consumes the queue: detach here, holding mu so that Run cannot start.
			st, err := p.detachLocked()
			p.mu.Unlock()
			return st, err
		}
		req := &detachRequest{reply: make(chan detachResult, 1)}
		p.detachReq = req
		p.mu.Unlock()
		select {
		case p.wake <- struct{}{}:
		default:
		}
		timer := time.NewTimer(p.Channel.cfg.AckTimeout)
		select {
		case r := <-req.reply:
			timer.Stop()
			return r.st, r.err
		case <-p.runDone:
			timer.Stop()
		case <-timer.C:
		}
		// Run did not pause (it returned, or it is busy with a message).
		p.mu.Lock()
		if p.detachReq != req { // Run took it after all
			p.mu.Unlock()
			r := <-req.reply
			return r.st, r.err
		}
		p.detachReq = nil
		p.mu.Unlock()
		select {
		case <-p.runDone: // Run returned: detach here
			continue
		default:
		}
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: Run did not pause within %v: %w", p.Channel.cfg.AckTimeout, ErrBusy)
	}
}

// servePause runs in Run's goroutine, between two messages, when Detach woke it. It reports
// whether the Primary is now detached (Run returns).
func (p *Primary) servePause() bool {
	p.mu.Lock()
	req := p.detachReq
	p.detachReq = nil
	if req == nil {
		p.mu.Unlock()
		return false
	}
	st, err := p.detachLocked()
	p.mu.Unlock()
	req.reply <- detachResult{st, err}
	return err == nil
}

// detachLocked does the work, with p.mu held and no goroutine handling messages.
func (p *Primary) detachLocked() (PrimaryState, error) {
	c := p.Channel
	p.pmu.Lock()
	waiting := len(p.pending)
	p.pmu.Unlock()
	if waiting > 0 {
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: %d newconn repl(ies) pending: %w", waiting, ErrBusy)
	}
	if !c.tryTurn() {
		select {
		case <-c.done:
			return PrimaryState{}, fmt.Errorf("nodeipc: Detach: %w", c.sendErr())
		default:
		}
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: a handle is in flight or a write in progress: %w", ErrBusy)
	}
	// From here on nobody writes but the reader (ACKs of handles the child sends).
	pending, err := c.stopReader()
	if err != nil {
		c.release()
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: %w", err)
	}
	fd, err := inheritableDup(c.uc)
	if err != nil {
		c.restartReader(pending)
		c.release()
		return PrimaryState{}, fmt.Errorf("nodeipc: Detach: channel descriptor: %w", err)
	}
	own := p.ownShared
	if own == nil {
		own = p.adoptedOwn
	}
	var ownFDs []SharedFD
	if own != nil {
		if ownFDs, err = own.Detach(); err != nil {
			unix.Close(fd)
			c.restartReader(pending)
			c.release()
			return PrimaryState{}, fmt.Errorf("nodeipc: Detach: own shared listeners: %w", err)
		}
		p.adoptedOwn = nil
	}

	c.mu.Lock()
	var queued []json.RawMessage
	for _, m := range c.queue[c.head:] {
		queued = append(queued, m.Raw)
	}
	c.queue, c.head = nil, 0
	c.mu.Unlock()

	ready := false
	select {
	case <-p.ready:
		ready = true
	default:
	}
	st := PrimaryState{
		FD:           fd,
		Pending:      pending,
		Queued:       queued,
		Seq:          p.seq.Load(),
		Style:        p.Style(),
		AppKey:       p.appKey,
		AppListening: p.appListening,
		Ready:        ready,
		OwnShared:    ownFDs,
		WebSockets:   p.ws.Load(),
	}
	p.detached = true
	// Closes the Go side's descriptor (its duplicate fd is in st) and fails later sends. The
	// turn is never released: nothing may write on this Channel again.
	c.closeWith(ErrDetached)
	return st, nil
}

// ResumePrimary continues a detached primary in this (or a freshly exec'd) process: it wraps
// st.FD (non-blocking and close-on-exec again), creates the Channel with cfg, queues
// st.Queued and feeds st.Pending in front of what it reads next, and returns a Primary whose
// OnQueryServer/Shared/Logger the caller sets BEFORE calling Run. Ready() is closed at once
// when the state says the worker was ready.
//
// It takes ownership of every descriptor in st, also on error (they are closed then).
// st.OwnShared become the Primary's own SharedListeners if the caller leaves Shared nil; if
// it sets Shared, they are closed when Run starts (the worker keeps its copies).
func ResumePrimary(st PrimaryState, cfg Config) (*Primary, error) {
	closeAll := func() {
		if st.FD >= 0 {
			unix.Close(st.FD)
		}
		for _, s := range st.OwnShared {
			if s.FD >= 0 {
				unix.Close(s.FD)
			}
		}
	}
	if st.FD < 0 {
		closeAll()
		return nil, fmt.Errorf("nodeipc: ResumePrimary: bad descriptor %d", st.FD)
	}
	queued := make([]Message, 0, len(st.Queued))
	for _, raw := range st.Queued {
		m, err := parseMessage(raw)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("nodeipc: ResumePrimary: queued message: %w", err)
		}
		if m.Raw != nil {
			queued = append(queued, m)
		}
	}
	uc, err := wrapUnixConn(st.FD)
	if err != nil {
		st.FD = -1 // wrapUnixConn closed it
		closeAll()
		return nil, fmt.Errorf("nodeipc: ResumePrimary: %w", err)
	}
	var own *SharedListeners
	if len(st.OwnShared) > 0 {
		own = new(SharedListeners)
		if err := own.Adopt(st.OwnShared); err != nil {
			own.Close()
			uc.Close()
			return nil, fmt.Errorf("nodeipc: ResumePrimary: %w", err)
		}
	}
	p := &Primary{Channel: newChannel(uc, cfg, st.Pending, queued)}
	p.init()
	p.seq.Store(st.Seq)
	p.style.Store(int32(st.Style))
	p.appKey, p.appListening = st.AppKey, st.AppListening
	p.adoptedOwn = own
	p.ws.Store(st.WebSockets)
	if st.Ready {
		p.setReady()
	}
	return p, nil
}

// wrapUnixConn turns an inherited descriptor into a *net.UnixConn. The descriptor is
// consumed (closed) in every case; the conn holds its own close-on-exec duplicate.
func wrapUnixConn(fd int) (*net.UnixConn, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("descriptor %d: %w", fd, os.NewSyscallError("fcntl", err))
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "nodeipc-parent")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("descriptor %d: %w", fd, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("descriptor %d is a %T, not a Unix socket", fd, c)
	}
	return uc, nil
}

// inheritableDup returns a duplicate of c's descriptor without close-on-exec (it survives
// execve) and owned by no Go object, taken on the raw fd inside Control (never File/Fd, which
// would put the socket in blocking mode). The original stays with c.
func inheritableDup(c syscall.Conn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := raw.Control(func(u uintptr) {
		fd, derr = unix.FcntlInt(u, unix.F_DUPFD, 0) // F_DUPFD: FD_CLOEXEC clear on the new fd
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl", derr)
	}
	return fd, nil
}

// Detach hands the listening sockets over to the next edge image: each is duplicated to a
// descriptor marked to survive execve (owned by the returned SharedFD), and s's own copies
// are closed (a Unix socket's path is not removed). s is unusable afterwards: later
// queries fail as after Close. On error nothing changed. Detach the Primaries that use s
// first; a worker that asks for a shared server after s is detached gets EINVAL.
func (s *SharedListeners) Detach() ([]SharedFD, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil
	}
	out := make([]SharedFD, 0, len(s.m))
	for key, ln := range s.m {
		sc, ok := ln.(syscall.Conn)
		var (
			fd  int
			err error
		)
		if !ok {
			err = fmt.Errorf("listener %T has no descriptor", ln)
		} else {
			fd, err = inheritableDup(sc)
		}
		if err != nil {
			for _, o := range out {
				unix.Close(o.FD)
			}
			return nil, fmt.Errorf("nodeipc: shared listener %s: %w", key, err)
		}
		out = append(out, SharedFD{Key: key, FD: fd, Network: ln.Addr().Network(), Addr: ln.Addr().String()})
	}
	s.closed = true
	for key, ln := range s.m {
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false) // the socket lives on in the next image
		}
		ln.Close()
		delete(s.m, key)
	}
	return out, nil
}

// Adopt takes over sockets a previous SharedListeners detached (in this process or in the
// edge image before an exec). Call it on a fresh zero-value SharedListeners before any
// worker queries it. It consumes every descriptor in fds, also on error (the ones it could
// not adopt are closed and reported; the others are adopted).
func (s *SharedListeners) Adopt(fds []SharedFD) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, sf := range fds {
		if sf.FD < 0 {
			errs = append(errs, fmt.Errorf("nodeipc: adopt shared listener %s: bad descriptor %d", sf.Key, sf.FD))
			continue
		}
		if s.closed {
			unix.Close(sf.FD)
			errs = append(errs, fmt.Errorf("nodeipc: adopt shared listener %s: %w", sf.Key, net.ErrClosed))
			continue
		}
		if _, dup := s.m[sf.Key]; dup {
			unix.Close(sf.FD)
			errs = append(errs, fmt.Errorf("nodeipc: adopt shared listener %s: key already bound", sf.Key))
			continue
		}
		unix.CloseOnExec(sf.FD)
		f := os.NewFile(uintptr(sf.FD), "nodeipc-shared")
		ln, err := net.FileListener(f) // holds its own close-on-exec, non-blocking duplicate
		f.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("nodeipc: adopt shared listener %s: %w", sf.Key, err))
			continue
		}
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(true) // as the one net.Listen created would
		}
		if s.m == nil {
			s.m = make(map[string]net.Listener)
		}
		s.m[sf.Key] = ln
	}
	return errors.Join(errs...)
}
