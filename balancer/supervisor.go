package balancer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/nodeipc"
)

// Supervisor runs worker processes for a Balancer: it spawns them with their channel,
// puts them into routing once ready, takes them out the moment they exit, and restarts
// them with backoff.
type Supervisor struct {
	Balancer *Balancer
	Command  []string // the worker's argv; required
	Workers  int      // number of workers; 0: the number of CPUs
	// Node selects Node's IPC handle protocol; it is implied when Command[0] is "node".
	Node bool
	// AppPort chooses, for Node apps that listen on several ports, the one that gets the
	// edge's traffic; 0: the first server the app listens on.
	AppPort int
	Env     []string // extra environment for workers

	SpawnTimeout         time.Duration // a worker must be ready within this; 0: 30 s
	DrainGrace           time.Duration // a draining worker's sessions get this long; 0: 30 s
	GracePeriod          time.Duration // SIGTERM to SIGKILL on shutdown; 0: 30 s
	MaxRestartsPerMinute int           // then the slot is marked failed; 0: 10

	Stdout, Stderr io.Writer    // worker output, each line prefixed "[worker N] "; nil: os.Stdout/os.Stderr
	Logger         *slog.Logger // nil: the Balancer's

	slotEnv func(slot int) []string // per-slot environment (tests)

	mu       sync.Mutex
	procs    map[int]*proc
	ready    chan struct{} // closed when every slot has been ready once
	nReady   atomic.Int32
	preload  string
	shared   *nodeipc.SharedListeners
	failed   atomic.Int32
	restarts atomic.Int64
	changed  chan struct{} // closed and replaced whenever a worker becomes ready
	rolling  sync.Mutex    // one rolling restart at a time

	appLogged   sync.Once
	frozen      bool                   // handing the workers to the next edge image
	adopt       map[int]HandoverWorker // workers a previous edge image handed over
	adoptShared []nodeipc.SharedFD     // and the Node app's shared listeners
	detShared   []nodeipc.SharedFD     // shared listeners detached by Freeze (for Thaw)

	cluster nodeCluster // Node workers' cluster-adapter relay (nodecluster.go)
}

// ErrSpawnTimeout means a worker never became ready.
var ErrSpawnTimeout = errors.New("balancer: worker did not become ready in time")

type proc struct {
	slot      int
	kind      string // "go" or "node"
	process   *os.Process
	stdout    *os.File // read ends of the worker's output pipes
	stderr    *os.File
	pumps     sync.WaitGroup // the output pumps
	pumpsStop atomic.Bool
	ch        Channel
	w         *Worker
	exited    chan struct{}
	err       error       // set before exited closes
	asked     atomic.Bool // stopped on request (rolling restart): not a crash
	detached  bool        // Node IPC state handed to the next edge image (s.mu)
}

func (s *Supervisor) init() error {
	if len(s.Command) == 0 {
		return errors.New("balancer: no worker command: give one after --, e.g. `stickyd run -- node server.js`")
	}
	if s.Workers <= 0 {
		s.Workers = runtime.NumCPU()
	}
	if s.SpawnTimeout <= 0 {
		s.SpawnTimeout = 30 * time.Second
	}
	if s.GracePeriod <= 0 {
		s.GracePeriod = 30 * time.Second
	}
	if s.DrainGrace <= 0 {
		s.DrainGrace = 30 * time.Second
	}
	if s.MaxRestartsPerMinute <= 0 {
		s.MaxRestartsPerMinute = 10
	}
	if s.Stdout == nil {
		s.Stdout = os.Stdout
	}
	if s.Stderr == nil {
		s.Stderr = os.Stderr
	}
	if s.Logger == nil {
		s.Logger = s.Balancer.log
	}
	if filepath.Base(s.Command[0]) == "node" || filepath.Base(s.Command[0]) == "nodejs" {
		s.Node = true
	}
	s.procs = map[int]*proc{}
	if s.Node {
		if _, err := os.Stat(s.preload); s.preload == "" || err != nil {
			dir, err := os.MkdirTemp("", "stickyd-node-")
			if err != nil {
				return err
			}
			s.preload = filepath.Join(dir, "preload.js")
			if err := os.WriteFile(s.preload, []byte(nodeipc.PreloadScript()), 0o600); err != nil {
				return err
			}
		}
		s.shared = &nodeipc.SharedListeners{}
		if len(s.adoptShared) > 0 {
			if err := s.shared.Adopt(s.adoptShared); err != nil {
				s.Logger.Warn("could not adopt the shared listeners of the previous edge image", "err", err)
			}
			s.adoptShared = nil
		}
	}
	return nil
}

// Ready is closed once every worker has been ready at least once.
func (s *Supervisor) Ready() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready == nil {
		s.ready = make(chan struct{})
	}
	return s.ready
}

// Run starts the workers and keeps them running until ctx ends; then it stops them
// (channel closed and SIGTERM, SIGKILL after GracePeriod) and returns.
func (s *Supervisor) Run(ctx context.Context) error {
	s.Ready() // creates the channel before init, so earlier callers see the same one
	if err := s.init(); err != nil {
		return err
	}
	defer func() {
		if s.preload != "" {
			os.RemoveAll(filepath.Dir(s.preload))
		}
		if s.shared != nil {
			s.shared.Close()
		}
	}()
	var wg sync.WaitGroup
	for slot := range s.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.runSlot(ctx, slot)
		}()
	}
	wg.Wait()
	return nil
}

// Restart drains the worker in slot — it gets no new sessions, and the sessions and
// WebSockets it holds get up to DrainGrace to end — then stops it and waits until its
// slot runs a fresh, ready worker.
func (s *Supervisor) Restart(ctx context.Context, slot int) error {
	s.mu.Lock()
	p := s.procs[slot]
	s.mu.Unlock()
	if p == nil {
		return fmt.Errorf("balancer: no worker in slot %d", slot)
	}
	s.Balancer.Drain(slot)
	p.asked.Store(true)
	s.Logger.Info("draining worker", "worker", slot, "pid", p.process.Pid, "grace", s.DrainGrace)
	deadline := time.Now().Add(s.DrainGrace)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) && !s.drained(p) {
		select {
		case <-tick.C:
		case <-p.exited:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.stop(p)
	for {
		s.mu.Lock()
		np, changed := s.procs[slot], s.changedC()
		s.mu.Unlock()
		if np != nil && np != p {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// drained reports whether a draining worker holds nothing the edge knows of.
func (s *Supervisor) drained(p *proc) bool {
	select {
	case <-p.exited:
		return true
	default:
	}
	if s.Balancer.sessions.Count(p.slot) > 0 {
		return false
	}
	return p.ch.WebSockets() == 0
}

// RollingRestart restarts every worker, one at a time, each drained first (SIGHUP).
func (s *Supervisor) RollingRestart(ctx context.Context) error {
	if !s.rolling.TryLock() {
		return errors.New("balancer: a rolling restart is already running")
	}
	defer s.rolling.Unlock()
	for slot := range s.Workers {
		if err := s.Restart(ctx, slot); err != nil {
			return fmt.Errorf("rolling restart, worker %d: %w", slot, err)
		}
	}
	return nil
}

// changedC returns the channel closed at the next worker readiness. s.mu held.
func (s *Supervisor) changedC() chan struct{} {
	if s.changed == nil {
		s.changed = make(chan struct{})
	}
	return s.changed
}

// Pids returns the pid of every running worker by slot (for tests and admin views).
func (s *Supervisor) Pids() map[int]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int]int{}
	for slot, p := range s.procs {
		out[slot] = p.process.Pid
	}
	return out
}

func (s *Supervisor) runSlot(ctx context.Context, slot int) {
	backoff := 100 * time.Millisecond
	var starts []time.Time
	for {
		started := time.Now()
		if s.isFrozen() {
			return
		}
		p, err := s.adoptOrSpawn(ctx, slot)
		if err == nil {
			s.Balancer.AddWorker(p.w)
			s.mu.Lock()
			s.procs[slot] = p
			close(s.changedC())
			s.changed = make(chan struct{})
			s.mu.Unlock()
			if s.nReady.Add(1) == int32(s.Workers) {
				close(s.ready)
			}
			s.Logger.Info("worker ready", "worker", slot, "pid", p.process.Pid)
			select {
			case <-p.exited:
			case <-ctx.Done():
			}
			s.Balancer.RemoveWorker(p.w)
			s.mu.Lock()
			delete(s.procs, slot)
			s.mu.Unlock()
			if ctx.Err() != nil {
				s.stop(p)
				return
			}
			if s.isFrozen() {
				return // the next edge image supervises it
			}
			if p.asked.Load() {
				s.Logger.Info("worker stopped for restart", "worker", slot, "pid", p.process.Pid)
				continue
			}
			err = p.err
			s.Logger.Warn("worker exited; restarting", "worker", slot, "pid", p.process.Pid, "err", err)
		} else {
			if ctx.Err() != nil {
				return
			}
			s.Logger.Error("worker failed to start", "worker", slot, "err", err)
		}
		s.restarts.Add(1)
		s.Balancer.m.WorkerRestarts.WithLabelValues(strconv.Itoa(slot)).Inc()
		if time.Since(started) > time.Minute {
			backoff = 100 * time.Millisecond
		}
		now := time.Now()
		starts = append(starts, now)
		for len(starts) > 0 && now.Sub(starts[0]) > time.Minute {
			starts = starts[1:]
		}
		if len(starts) > s.MaxRestartsPerMinute {
			s.failed.Add(1)
			s.Balancer.m.Workers.WithLabelValues("failed").Set(float64(s.failed.Load()))
			s.Logger.Error("worker keeps failing; giving up on this slot",
				"worker", slot, "restarts_last_minute", len(starts), "command", s.Command,
				"hint", "run the command by hand to see why it exits")
			return
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

func (s *Supervisor) isFrozen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frozen
}

// SupervisorHandover is what a Supervisor hands to the next edge image.
type SupervisorHandover struct {
	Workers []HandoverWorker
	Shared  []nodeipc.SharedFD `json:",omitempty"` // a Node app's other servers
	Preload string             `json:",omitempty"` // the Node preload file, reused
}

// Adopt gives the supervisor the workers a previous edge image ran; call it before Run.
func (s *Supervisor) Adopt(h SupervisorHandover) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.adopt = map[int]HandoverWorker{}
	for _, w := range h.Workers {
		s.adopt[w.Slot] = w
	}
	s.adoptShared = h.Shared
	s.preload = h.Preload
}

func (s *Supervisor) adoptOrSpawn(ctx context.Context, slot int) (*proc, error) {
	s.mu.Lock()
	hw, ok := s.adopt[slot]
	delete(s.adopt, slot)
	s.mu.Unlock()
	if !ok {
		return s.spawn(ctx, slot)
	}
	p, err := s.adoptProc(hw)
	if err != nil {
		s.Logger.Warn("could not adopt the worker of the previous edge image; starting a new one", "worker", slot, "pid", hw.PID, "err", err)
		return s.spawn(ctx, slot)
	}
	return p, nil
}

func (s *Supervisor) adoptProc(hw HandoverWorker) (*proc, error) {
	if hw.Kind != "go" && (hw.Kind != "node" || hw.Node == nil) {
		return nil, fmt.Errorf("cannot adopt a %q worker", hw.Kind)
	}
	process, err := os.FindProcess(hw.PID)
	if err != nil {
		return nil, err
	}
	fds := []int{hw.Channel, hw.Stdout, hw.Stderr}
	if hw.Kind == "node" {
		fds[0] = -1 // ResumePrimary owns the channel descriptor
	}
	files := make([]*os.File, 3)
	for i, fd := range fds {
		if fd < 0 {
			continue
		}
		// Non-blocking, so the files are pollable (deadlines work on the pipes), and
		// close-on-exec again, so workers started later do not inherit them.
		if err := unix.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("descriptor %d: %w", fd, err)
		}
		unix.CloseOnExec(fd)
		files[i] = os.NewFile(uintptr(fd), "inherited")
	}
	var ch Channel
	if hw.Kind == "node" {
		primary, err := nodeipc.ResumePrimary(*hw.Node, nodeipc.Config{AckTimeout: s.Balancer.cfg.HandoffTimeout, Logger: s.Logger})
		if err != nil {
			process.Kill() // it exits anyway once its channel is gone
			return nil, err
		}
		primary.Shared = s.shared
		primary.OnQueryServer = s.chooseAppServer
		primary.Logger = s.Logger.With("worker", hw.Slot)
		s.joinNodeCluster(hw.Slot, primary)
		go primary.Run(context.Background())
		ch = &nodeChannel{p: primary, ch: primary.Channel, timeout: s.Balancer.cfg.HandoffTimeout}
	} else {
		c, err := net.FileConn(files[0])
		files[0].Close()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			return nil, errors.New("channel is not a Unix socket")
		}
		ch = s.goChannel(hw.Slot, uc)
	}
	p := s.watch(hw.Slot, hw.Kind, process, ch, files[1], files[2])
	p.w = newWorker(hw.Slot, hw.PID, ch, s.Balancer.cfg.WorkerIdle)
	return p, nil
}

// Freeze stops supervising, for an edge upgrade, and returns the workers with their
// descriptors marked to survive the exec. Call it after Balancer.Freeze: no handoff may be
// in flight. Thaw undoes it if the exec fails or Freeze itself does.
func (s *Supervisor) Freeze() (SupervisorHandover, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frozen = true
	out := SupervisorHandover{Preload: s.preload}
	for slot, p := range s.procs {
		hw := HandoverWorker{Slot: slot, PID: p.process.Pid, Kind: p.kind}
		var err error
		switch ch := p.ch.(type) {
		case *GoChannel:
			if hw.Channel, err = rawFD(ch.uc); err != nil {
				return out, err
			}
		case *nodeChannel:
			st, err := detachPrimary(ch.p)
			if err != nil {
				return out, fmt.Errorf("worker %d: %w", slot, err)
			}
			p.detached = true
			hw.Node, hw.Channel = &st, st.FD
		default:
			return out, fmt.Errorf("worker %d: channel cannot be handed over", slot)
		}
		// Stop the output pumps; the next image reads the pipes from where they stopped.
		p.pumpsStop.Store(true)
		p.stdout.SetReadDeadline(time.Unix(1, 0))
		p.stderr.SetReadDeadline(time.Unix(1, 0))
		if hw.Stdout, err = rawFD(p.stdout); err != nil {
			return out, err
		}
		if hw.Stderr, err = rawFD(p.stderr); err != nil {
			return out, err
		}
		out.Workers = append(out.Workers, hw)
	}
	if s.shared != nil {
		fds, err := s.shared.Detach()
		if err != nil {
			return out, err
		}
		s.detShared, out.Shared = fds, fds
	}
	return out, nil
}

// detachPrimary waits out a Node worker's in-flight IPC exchange (bounded) and detaches.
func detachPrimary(p *nodeipc.Primary) (nodeipc.PrimaryState, error) {
	for try := 0; ; try++ {
		st, err := p.Detach()
		if !errors.Is(err, nodeipc.ErrBusy) || try == 50 {
			return st, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Thaw resumes supervision after a failed edge upgrade.
func (s *Supervisor) Thaw() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.frozen {
		return
	}
	s.frozen = false
	if s.detShared != nil {
		s.shared = &nodeipc.SharedListeners{}
		if err := s.shared.Adopt(s.detShared); err != nil {
			s.Logger.Warn("shared listeners lost after a failed upgrade", "err", err)
		}
		s.detShared = nil
	}
	for _, p := range s.procs {
		if p.detached {
			// Its IPC state left this image; a fresh worker replaces it.
			p.asked.Store(true)
			p.process.Kill()
			continue
		}
		p.pumpsStop.Store(false)
		for _, f := range []*os.File{p.stdout, p.stderr} {
			f.SetReadDeadline(time.Time{})
			closeOnExec(f)
		}
		s.startPumps(p)
		if g, ok := p.ch.(*GoChannel); ok {
			closeOnExec(g.uc)
		}
	}
}

func closeOnExec(c syscall.Conn) {
	if raw, err := c.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
}

// spawn starts one worker and waits until it is ready.
func (s *Supervisor) spawn(ctx context.Context, slot int) (*proc, error) {
	env := append(os.Environ(), s.Env...)
	env = append(env, fdpass.EnvWorkerID+"="+strconv.Itoa(slot))
	if s.slotEnv != nil {
		env = append(env, s.slotEnv(slot)...)
	}
	// The edge owns the read ends of the workers' output pipes (not exec.Cmd), so that an
	// edge upgrade can hand them to the next edge image with the workers.
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, err
	}
	files := []*os.File{nil, outW, errW}
	closeAfterStart := []*os.File{outW, errW}
	var (
		ch     Channel
		readyC <-chan struct{}
		kind   string
	)
	if s.Node {
		kind = "node"
		parent, child, err := nodeipc.NewPair()
		if err != nil {
			return nil, err
		}
		files = append(files, child)
		closeAfterStart = append(closeAfterStart, child)
		env = append(env, nodeipc.Env(3, slot+1)...)
		env = append(env, nodeipc.PreloadEnv(s.preload)...)
		nch := nodeipc.NewChannel(parent, nodeipc.Config{AckTimeout: s.Balancer.cfg.HandoffTimeout, Logger: s.Logger})
		primary := &nodeipc.Primary{Channel: nch, Shared: s.shared, Logger: s.Logger.With("worker", slot), OnQueryServer: s.chooseAppServer}
		s.joinNodeCluster(slot, primary)
		go primary.Run(context.Background())
		ch = &nodeChannel{p: primary, ch: nch, timeout: s.Balancer.cfg.HandoffTimeout}
		readyC = primary.Ready()
	} else {
		kind = "go"
		edge, child, err := fdpass.SocketPair(unix.SOCK_SEQPACKET)
		if err != nil {
			return nil, err
		}
		files = append(files, child)
		closeAfterStart = append(closeAfterStart, child)
		env = append(env, fdpass.EnvFD+"=3")
		goch := s.goChannel(slot, edge)
		ch = goch
		readyC = helloReady(goch)
	}
	path, err := exec.LookPath(s.Command[0])
	if err == nil {
		var devnull *os.File
		devnull, err = os.Open(os.DevNull)
		if err == nil {
			files[0] = devnull
			closeAfterStart = append(closeAfterStart, devnull)
		}
	}
	var process *os.Process
	if err == nil {
		process, err = os.StartProcess(path, s.Command, &os.ProcAttr{
			Env:   dedupEnv(env),
			Files: files,
			// Workers get their own process group, so a terminal's Ctrl-C reaches the edge
			// only and the edge shuts them down in order. No Pdeathsig: it would fire when
			// the edge re-executes itself for an upgrade. Orphans are prevented instead by
			// the channel: workers exit when it closes, which it does when the edge dies.
			Sys: &syscall.SysProcAttr{Setpgid: true},
		})
	}
	for _, f := range closeAfterStart {
		f.Close()
	}
	if err != nil {
		ch.Close()
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start %q: %w", s.Command, err)
	}
	p := s.watch(slot, kind, process, ch, outR, errR)
	timer := time.NewTimer(s.SpawnTimeout)
	defer timer.Stop()
	select {
	case <-readyC:
		p.w = newWorker(slot, process.Pid, ch, s.Balancer.cfg.WorkerIdle)
		return p, nil
	case <-p.exited:
		why := "with status 0"
		if p.err != nil {
			why = p.err.Error()
		}
		return nil, fmt.Errorf("worker %d (%q) exited (%s) before it was ready", slot, s.Command, why)
	case <-timer.C:
		s.stop(p)
		hint := "check that the command starts a stickyd worker (fdpass.Listen)"
		if s.Node {
			hint = "the app never called server.listen() or @socket.io/sticky's setupWorker(): check the start file (Express generator apps listen in bin/www, not app.js)"
		}
		return nil, fmt.Errorf("%w: worker %d (%q) not ready after %v; %s", ErrSpawnTimeout, slot, s.Command, s.SpawnTimeout, hint)
	case <-ctx.Done():
		s.stop(p)
		return nil, ctx.Err()
	}
}

// dedupEnv keeps the last value of every variable, as exec.Cmd does (the child's getenv
// would otherwise see the first).
func dedupEnv(env []string) []string {
	seen := map[string]int{}
	out := make([]string, 0, len(env))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := seen[k]; ok {
			out[i] = kv
			continue
		}
		seen[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func (s *Supervisor) goChannel(slot int, edge *net.UnixConn) *GoChannel {
	gauge := s.Balancer.m.WebSockets.WithLabelValues(strconv.Itoa(slot))
	return NewGoChannel(edge, s.Balancer.cfg.HandoffTimeout, func(n int64) { gauge.Set(float64(n)) })
}

func helloReady(goch *GoChannel) <-chan struct{} {
	ready := make(chan struct{})
	go func() {
		select {
		case <-goch.Hello():
			close(ready)
		case <-goch.Done():
		}
	}()
	return ready
}

// watch follows a worker process: its output goes to the edge's, prefixed with the slot,
// and its exit closes its channel and p.exited.
func (s *Supervisor) watch(slot int, kind string, process *os.Process, ch Channel, outR, errR *os.File) *proc {
	p := &proc{slot: slot, kind: kind, process: process, ch: ch, stdout: outR, stderr: errR, exited: make(chan struct{})}
	s.startPumps(p)
	go func() {
		state, err := process.Wait()
		if err == nil && !state.Success() {
			err = errors.New(state.String())
		}
		p.err = err
		ch.Close()
		p.pumps.Wait()           // the last lines before a crash are the useful ones
		if !p.pumpsStop.Load() { // (stopped pumps: the pipes belong to the next edge image)
			outR.Close()
			errR.Close()
		}
		close(p.exited)
	}()
	return p
}

// startPumps copies the worker's stdout and stderr to the edge's, prefixed with its slot.
func (s *Supervisor) startPumps(p *proc) {
	prefix := fmt.Sprintf("[worker %d] ", p.slot)
	p.pumps.Add(2)
	go pumpLines(&p.pumps, p.stdout, prefixWriter(s.Stdout, prefix), &p.pumpsStop)
	go pumpLines(&p.pumps, p.stderr, prefixWriter(s.Stderr, prefix), &p.pumpsStop)
}

// pumpLines copies a worker's output until the pipe closes (the worker and everything it
// started exited) or the edge hands the pipe to its next image.
func pumpLines(wg *sync.WaitGroup, r *os.File, w *lineWriter, stop *atomic.Bool) {
	defer wg.Done()
	defer w.Flush()
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			w.Write(buf[:n])
		}
		if err != nil || stop.Load() {
			return
		}
	}
}

// stop ends a worker: its channel closes (a Go worker then drains and exits on its own),
// SIGTERM follows, and SIGKILL after the grace period.
func (s *Supervisor) stop(p *proc) error {
	p.ch.Close()
	p.process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(s.GracePeriod):
		s.Logger.Warn("worker did not stop within the grace period; killing it", "worker", p.slot, "grace", s.GracePeriod)
		p.process.Kill()
		<-p.exited
		return nil
	}
}

// chooseAppServer decides which of a Node app's servers receives the edge's traffic;
// every other server the app listens on is bound and served as it would be without
// stickyd. The choice is logged once per edge with the rule that made it.
func (s *Supervisor) chooseAppServer(q nodeipc.QueryServer) bool {
	app, rule := true, "the first server the app listens on (choose another with -app-port)"
	if s.AppPort != 0 {
		app, rule = q.Port == s.AppPort, fmt.Sprintf("-app-port %d", s.AppPort)
	}
	if app {
		s.appLogged.Do(func() {
			s.Logger.Info("Node app server chosen: it receives the edge's traffic; other servers of the app serve their own ports",
				"port", q.Port, "address", q.Address, "rule", rule)
		})
	}
	return app
}

// nodeChannel adapts a Node worker (cluster-primary emulation) to Channel.
type nodeChannel struct {
	p       *nodeipc.Primary
	ch      *nodeipc.Channel
	timeout time.Duration
}

func (n *nodeChannel) Deliver(ctx context.Context, conn syscall.Conn, _ fdpass.Meta) error {
	// Node's sender keeps one handle in flight: bound the wait for the channel too.
	ctx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	return n.p.Deliver(ctx, conn)
}
func (n *nodeChannel) CanReplay() bool       { return false }
func (n *nodeChannel) Done() <-chan struct{} { return n.ch.Done() }
func (n *nodeChannel) Close() error          { return n.ch.Close() }

// lineWriter prefixes every line of a worker's output, so interleaved logs stay readable.
type lineWriter struct {
	mu     sync.Mutex
	dst    io.Writer
	prefix string
	atBOL  bool
}

func prefixWriter(dst io.Writer, prefix string) *lineWriter {
	return &lineWriter{dst: dst, prefix: prefix, atBOL: true}
}

func (l *lineWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]byte, 0, len(p)+len(l.prefix))
	for _, c := range p {
		if l.atBOL {
			out = append(out, l.prefix...)
			l.atBOL = false
		}
		out = append(out, c)
		if c == '\n' {
			l.atBOL = true
		}
	}
	if _, err := l.dst.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush ends a last line that had no newline.
func (l *lineWriter) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.atBOL {
		l.dst.Write([]byte("\n"))
		l.atBOL = true
	}
}
