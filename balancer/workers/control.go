//go:build unix

package workers

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
	"github.com/stickyd/stickyd/fdpass/platform"
)

// ControlServer accepts Go workers started elsewhere (sidecar mode: another container
// sharing a volume) on a Unix SEQPACKET control socket. A worker's channel is the
// connection itself; it is routed once it announces itself and removed when it hangs up.
type ControlServer struct {
	Edge Edge // required
	// AllowUIDs lists peer uids allowed besides the edge's own (SO_PEERCRED is checked on
	// every connection).
	AllowUIDs    []int
	HelloTimeout time.Duration // 0: 10 s
	Logger       *slog.Logger  // nil: the Edge's

	mu     sync.Mutex
	slots  map[int]*Worker
	frozen bool
}

// ListenControl creates the control socket at path: its directory is created 0700 if
// missing, a stale socket left by a previous run is removed, and the socket is 0600.
func ListenControl(path string) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory %s: %w", dir, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket; remove it or choose another -control path", path)
		}
		// A live edge answers; only a dead one's socket may be removed.
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another stickyd is serving it", path)
		}
		os.Remove(path)
	}
	old := unix.Umask(0o177) // the socket is born 0600: no window with wider access
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return ln, nil
}

// Serve accepts workers until ln is closed.
func (s *ControlServer) Serve(ln *net.UnixListener) error {
	if s.Logger == nil {
		s.Logger = s.Edge.WorkerSettings().Logger
	}
	if s.HelloTimeout <= 0 {
		s.HelloTimeout = 10 * time.Second
	}
	s.mu.Lock()
	if s.slots == nil {
		s.slots = map[int]*Worker{}
	}
	s.mu.Unlock()
	var delay time.Duration
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
				return nil // closed, or frozen for an edge upgrade
			}
			if fdutil.TemporaryAccept(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		go s.admit(c)
	}
}

// admit checks the peer, waits for its hello and puts it into routing.
func (s *ControlServer) admit(c *net.UnixConn) {
	uid, pid, err := peerCred(c)
	if err != nil {
		s.Logger.Warn("control connection without peer credentials; closed", "err", err)
		c.Close()
		return
	}
	if uid != os.Getuid() && !slices.Contains(s.AllowUIDs, uid) {
		s.Logger.Warn("control connection from a uid that is not allowed; closed",
			"uid", uid, "pid", pid, "hint", "run the worker as the edge's user or add -allow-uid "+fmt.Sprint(uid))
		c.Close()
		return
	}
	ch := NewGoChannel(c, s.Edge.WorkerSettings().HandoffTimeout, nil)
	select {
	case <-ch.Hello():
	case <-ch.Done():
		return
	case <-time.After(s.HelloTimeout):
		s.Logger.Warn("control connection did not announce a worker in time; closed", "pid", pid)
		ch.Close()
		return
	}
	s.mu.Lock()
	slot := 0
	for s.slots[slot] != nil {
		slot++
	}
	w := newWorker(slot, pid, ch, s.Edge.WorkerSettings().WorkerIdle)
	s.slots[slot] = w
	s.mu.Unlock()
	s.serveWorker(w, ch)
}

// serveWorker keeps w in routing until its channel closes.
func (s *ControlServer) serveWorker(w *Worker, ch *GoChannel) {
	gauge := s.Edge.WorkerSettings().Metrics.WebSockets.WithLabelValues(w.label)
	ch.SetOnStats(func(n int64) { gauge.Set(float64(n)) })
	s.Edge.AddWorker(w)
	s.Logger.Info("worker connected", "worker", w.Slot, "pid", w.PID)
	<-ch.Done()
	s.mu.Lock()
	frozen := s.frozen
	if !frozen {
		delete(s.slots, w.Slot)
	}
	s.mu.Unlock()
	if frozen {
		return // handed to the next edge image
	}
	s.Edge.RemoveWorker(w)
	s.Logger.Warn("worker disconnected", "worker", w.Slot, "pid", w.PID)
}

// Freeze hands the connected workers to the next edge image: their channel descriptors,
// marked to survive the exec. The accept loop must be stopped by the caller (the
// control listener's descriptor is handed over separately).
func (s *ControlServer) Freeze() ([]HandoverWorker, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []HandoverWorker
	for slot, w := range s.slots {
		goch, ok := w.ch.(*GoChannel)
		if !ok {
			continue
		}
		fd, err := fdutil.Inherit(goch.uc)
		if err != nil {
			return nil, err
		}
		out = append(out, HandoverWorker{Slot: slot, PID: w.PID, Kind: "go", Channel: fd, Stdout: -1, Stderr: -1})
	}
	s.frozen = true
	return out, nil
}

// Thaw resumes after a failed edge upgrade.
func (s *ControlServer) Thaw() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frozen = false
	for _, w := range s.slots {
		if g, ok := w.ch.(*GoChannel); ok {
			fdutil.CloseOnExec(g.uc)
		}
	}
}

// Adopt routes the sidecar workers a previous edge image served.
func (s *ControlServer) Adopt(ws []HandoverWorker) {
	if s.Logger == nil {
		s.Logger = s.Edge.WorkerSettings().Logger
	}
	s.mu.Lock()
	if s.slots == nil {
		s.slots = map[int]*Worker{}
	}
	s.mu.Unlock()
	for _, hw := range ws {
		unix.SetNonblock(hw.Channel, true)
		unix.CloseOnExec(hw.Channel)
		f := os.NewFile(uintptr(hw.Channel), "channel")
		c, err := net.FileConn(f)
		f.Close()
		uc, ok := c.(*net.UnixConn)
		if err != nil || !ok {
			s.Logger.Warn("could not adopt a sidecar worker", "worker", hw.Slot, "pid", hw.PID, "err", err)
			continue
		}
		ch := NewGoChannel(uc, s.Edge.WorkerSettings().HandoffTimeout, nil)
		w := newWorker(hw.Slot, hw.PID, ch, s.Edge.WorkerSettings().WorkerIdle)
		s.mu.Lock()
		s.slots[hw.Slot] = w
		s.mu.Unlock()
		go s.serveWorker(w, ch)
	}
}

func peerCred(c *net.UnixConn) (uid, pid int, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cerr error
	err = raw.Control(func(fd uintptr) {
		uid, pid, cerr = platform.PeerCred(int(fd))
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return 0, 0, err
	}
	return uid, pid, nil
}
