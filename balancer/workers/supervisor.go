//go:build unix

package workers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer/internal/fdutil"
	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/nodeipc"
	"github.com/stickyd/stickyd/metrics"
)

// Supervisor runs worker processes for an Edge: it spawns them with their channel,
// puts them into routing once ready, takes them out the moment they exit, and restarts
// them with backoff.
type Supervisor struct {
	Edge    Edge     // required
	Command []string // the worker's argv; required
	Workers int      // number of workers; 0: the number of CPUs
	// Node selects Node's IPC handle protocol; it is implied when Command[0] is "node".
	Node bool
	// AppPort chooses, for Node apps that listen on several ports, the one that gets the
	// edge's traffic; 0: the first server the app listens on.
	AppPort int
	Env     []string // extra environment for workers
	// SlotEnv, if set, adds environment for the worker in one slot (e.g. a different
	// role or port per slot).
	SlotEnv func(slot int) []string

	SpawnTimeout         time.Duration // a worker must be ready within this; 0: 30 s
	DrainGrace           time.Duration // a draining worker's sessions get this long; 0: 30 s
	GracePeriod          time.Duration // SIGTERM to SIGKILL on shutdown; 0: 30 s
	MaxRestartsPerMinute int           // then the slot is marked failed; 0: 10
	// QuickFailures is how many starts in a row may end before the worker is ready (the
	// command is missing, the script throws at load, the app listens on its own) before the
	// slot gives up: such a worker fails the same way every time. 0: 5.
	QuickFailures int

	Stdout, Stderr io.Writer // worker output, each line prefixed "[worker N] "; nil: os.Stdout/os.Stderr
	// OutputLog, if set, takes worker output instead of Stdout/Stderr: one record per line,
	// msg the line, with worker, pid and stream (stdout, stderr), never filtered by level
	// (-log-format json: the edge's output stays one JSON record per line).
	OutputLog *slog.Logger
	Logger    *slog.Logger // nil: the Edge's

	// Pool settings (pools.go). Name is the -pool this supervisor runs ("" for the default
	// pool) and FirstSlot its first worker slot: the pools of an edge share one slot space.
	Name      string
	FirstSlot int
	// Max > 0 sizes the pool by demand, from Min to Max workers (Workers is then unused):
	// a worker starts when requests wait in Gate, one idle for Idle stops.
	Min, Max int
	Idle     time.Duration // 0: 30 s
	Gate     *Gate         // the pool's queue; required with Max
	// Pools are the named pools, run, restarted, handed over and stopped with this one.
	Pools []*Supervisor

	parent    *Supervisor // the default pool's supervisor, for a named pool
	ownShared bool        // s.shared was made here (not the parent's)

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

	wrapped  bool            // Node app started through a wrapper (npm, yarn, sh -c …): see spawn
	settled  chan struct{}   // closed when every slot has been ready once or has given up
	slotDone map[int]bool    // slots counted in settled (s.mu)
	gaveUp   map[int]string  // slots that gave up, with the reason (s.mu)
	live     map[*proc]bool  // every worker process not yet reaped, ready or not (s.mu)
	killing  atomic.Bool     // Kill was called: no grace, no new workers
	shown    map[string]bool // failed starts' output already shown (s.mu): each shown once
}

// ErrSpawnTimeout means a worker never became ready.
var ErrSpawnTimeout = errors.New("balancer: worker did not become ready in time")

// ErrWorkerExited means a worker exited before it was ready.
var ErrWorkerExited = errors.New("balancer: worker exited before it was ready")

// ErrOwnListener means a Node worker listens on a port itself instead of taking the edge's
// connections: it never got the edge's IPC channel.
var ErrOwnListener = errors.New("balancer: the worker listens on its own port, bypassing the edge")

type proc struct {
	slot      int
	kind      string // "go" or "node"
	process   *os.Process
	pgid      int          // the worker's own process group (its pid), 0: signal the pid only
	killAt    atomic.Int64 // unix nanos: stop's grace ends; the group is killed then
	errOut    *lineWriter  // stderr, held until ready and with a tail kept (startPumps)
	stdout    *os.File     // read ends of the worker's output pipes
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
	if s.Max > 0 {
		s.Workers = s.Min
	} else if s.Workers <= 0 {
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
	if s.QuickFailures <= 0 {
		s.QuickFailures = 5
	}
	if s.Stdout == nil {
		s.Stdout = os.Stdout
	}
	if s.Stderr == nil {
		s.Stderr = os.Stderr
	}
	if s.Logger == nil {
		s.Logger = s.Edge.WorkerSettings().Logger
	}
	if s.Max > 0 {
		if s.Gate == nil {
			return fmt.Errorf("balancer: pool %q has no gate", s.Name)
		}
		s.Min = min(s.Min, s.Max)
		s.Logger = s.Logger.With("pool", s.Name)
	}
	if err := CheckWorkerCommand(s.Command); err != nil {
		return err
	}
	if IsNodeCommand(s.Command) {
		s.Node = true
	}
	// Node itself takes NODE_CHANNEL_FD at bootstrap: only a command that is node gets it;
	// anything else that runs Node gets the channel through the preload (see spawn).
	s.wrapped = s.Node && !isNodeBinary(s.Command[0])
	if s.wrapped {
		s.Logger.Info("Node app started through a wrapper: the first Node process of its tree that is not "+
			"npm, npx, yarn, pnpm, corepack or nodemon takes the edge's channel", "command", strings.Join(s.Command, " "))
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
		if s.parent != nil && s.parent.shared != nil {
			// One Node app's other servers are bound once for every pool running it.
			s.shared = s.parent.shared
			return nil
		}
		s.shared = &nodeipc.SharedListeners{}
		s.ownShared = true
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

// Settled is closed once every worker slot has been ready at least once or has given up
// (its worker cannot start): the edge starts accepting then.
func (s *Supervisor) Settled() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.settled == nil {
		s.settled = make(chan struct{})
	}
	return s.settled
}

// settle counts slot in Settled once. s.mu held.
func (s *Supervisor) settle(slot int) {
	if s.slotDone == nil {
		s.slotDone = map[int]bool{}
	}
	if s.slotDone[slot] {
		return
	}
	s.slotDone[slot] = true
	if len(s.slotDone) == s.Workers {
		close(s.settled)
	}
}

// Health reports whether any worker can run (false once every slot has given up) and, when
// slots gave up, why: the command and the last error it printed.
func (s *Supervisor) Health() (ok bool, reason string) {
	ok, reason = s.ownHealth()
	for _, pool := range s.Pools {
		if _, r := pool.ownHealth(); r != "" {
			// A named pool that cannot start its workers fails its own requests (503), not
			// the edge's health.
			reason = strings.TrimPrefix(reason+"; pool "+pool.Name+": "+r, "; ")
		}
	}
	return ok, reason
}

func (s *Supervisor) ownHealth() (ok bool, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.gaveUp) == 0 {
		return true, ""
	}
	if s.Max > 0 {
		for _, r := range s.gaveUp {
			return true, "its workers cannot start: " + r
		}
	}
	slots := make([]int, 0, len(s.gaveUp))
	for slot := range s.gaveUp {
		slots = append(slots, slot)
	}
	slices.Sort(slots)
	reason = s.gaveUp[slots[0]]
	if len(slots) == s.Workers {
		return false, fmt.Sprintf("no worker can start (every slot gave up): %s", reason)
	}
	return true, fmt.Sprintf("%d of %d worker slots gave up: %s", len(slots), s.Workers, reason)
}

// Kill ends every worker now: SIGKILL to each worker's process group, output no longer
// awaited, no restarts. For a second SIGTERM/SIGINT; Run still returns as usual.
func (s *Supervisor) Kill() {
	for _, pool := range s.Pools {
		pool.Kill()
	}
	s.killing.Store(true)
	s.mu.Lock()
	live := make([]*proc, 0, len(s.live))
	for p := range s.live {
		live = append(live, p)
	}
	s.mu.Unlock()
	for _, p := range live {
		p.signal(syscall.SIGKILL)
		p.stdout.SetReadDeadline(time.Unix(1, 0))
		p.stderr.SetReadDeadline(time.Unix(1, 0))
	}
}

// Run starts the workers and keeps them running until ctx ends; then it stops them
// (channel closed and SIGTERM to each worker's process group, SIGKILL after GracePeriod)
// and returns.
func (s *Supervisor) Run(ctx context.Context) error {
	s.Ready() // creates the channels before init, so earlier callers see the same ones
	s.Settled()
	if err := s.init(); err != nil {
		return err
	}
	defer func() {
		if s.preload != "" && (s.parent == nil || s.preload != s.parent.preload) {
			os.RemoveAll(filepath.Dir(s.preload))
		}
		if s.shared != nil && s.ownShared {
			s.shared.Close()
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, len(s.Pools))
	for _, pool := range s.Pools {
		pool.parent = s
		if s.Node && pool.preload == "" {
			pool.preload = s.preload
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pool.Run(ctx); err != nil {
				errs <- fmt.Errorf("pool %s: %w", pool.Name, err)
			}
		}()
	}
	if s.Max > 0 {
		s.runOnDemand(ctx)
	} else {
		for i := range s.Workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.runSlot(ctx, s.FirstSlot+i)
			}()
		}
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// Restart drains the worker in slot — it gets no new sessions, and the sessions and
// WebSockets it holds get up to DrainGrace to end — then stops it and waits until its
// slot runs a fresh, ready worker.
func (s *Supervisor) Restart(ctx context.Context, slot int) error {
	s = s.owner(slot)
	s.mu.Lock()
	p := s.procs[slot]
	s.mu.Unlock()
	if p == nil {
		return fmt.Errorf("balancer: no worker in slot %d", slot)
	}
	s.Edge.Drain(slot)
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
	if s.Edge.Load(p.slot) > 0 {
		return false
	}
	if p.w != nil && p.w.recentHandoff(time.Now()) {
		return false // a WebSocket just handed over may not be counted yet
	}
	return p.ch.WebSockets() == 0
}

// RollingRestart restarts every worker, one at a time, each drained first (SIGHUP).
func (s *Supervisor) RollingRestart(ctx context.Context) error {
	if !s.rolling.TryLock() {
		return errors.New("balancer: a rolling restart is already running")
	}
	defer s.rolling.Unlock()
	for _, slot := range s.runningSlots() {
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
	for _, pool := range s.Pools {
		maps.Copy(out, pool.Pids())
	}
	return out
}

func (s *Supervisor) runSlot(ctx context.Context, slot int) {
	backoff := 100 * time.Millisecond
	var starts []time.Time
	quick := 0 // starts in a row that ended before the worker was ready
	for {
		started := time.Now()
		if s.isFrozen() || s.killing.Load() {
			return
		}
		p, err := s.adoptOrSpawn(ctx, slot)
		if err == nil {
			p.w.PoolName = s.Name
			s.Edge.AddWorker(p.w)
			s.mu.Lock()
			if s.Max > 0 {
				delete(s.gaveUp, slot) // an on-demand slot is tried again later
			}
			s.procs[slot] = p
			close(s.changedC())
			s.changed = make(chan struct{})
			s.mu.Unlock()
			if s.nReady.Add(1) == int32(s.Workers) {
				close(s.ready)
			}
			s.mu.Lock()
			s.settle(slot)
			s.mu.Unlock()
			quick = 0
			s.Logger.Info("worker ready", "worker", slot, "pid", p.process.Pid)
			select {
			case <-p.exited:
			case <-ctx.Done():
			}
			s.Edge.RemoveWorker(p.w)
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
			if line := lastErrorLine(p.errOut.Tail()); line != "" {
				s.Logger.Warn("worker exited; restarting", "worker", slot, "pid", p.process.Pid, "err", err, "last_error", line)
			} else {
				s.Logger.Warn("worker exited; restarting", "worker", slot, "pid", p.process.Pid, "err", err)
			}
		} else {
			if ctx.Err() != nil || s.killing.Load() {
				return
			}
			if !errors.Is(err, ErrWorkerExited) && !errors.Is(err, ErrOwnListener) && !errors.Is(err, exec.ErrNotFound) && !errors.Is(err, os.ErrNotExist) {
				// A spawn timeout may be a slow start: it keeps being retried.
				quick = 0
				s.Logger.Error("worker failed to start", "worker", slot, "err", err)
			} else if quick++; quick >= s.QuickFailures {
				s.giveUp(slot, quick, err)
				return
			} else if quick == 1 {
				s.Logger.Warn("worker failed to start; retrying", "worker", slot, "err", err, "tries_left", s.QuickFailures-quick)
			} else {
				s.Logger.Debug("worker failed to start again", "worker", slot, "err", err, "tries_left", s.QuickFailures-quick)
			}
		}
		s.restarts.Add(1)
		s.Edge.WorkerSettings().Metrics.WorkerRestarts.WithLabelValues(strconv.Itoa(slot)).Inc()
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
			s.Edge.WorkerSettings().Metrics.Workers.WithLabelValues(metrics.WorkerFailed).Set(float64(s.failed.Load()))
			s.Logger.Error("worker keeps failing; giving up on this slot",
				"worker", slot, "restarts_last_minute", len(starts), "command", s.Command,
				"hint", "run the command by hand to see why it exits")
			s.mu.Lock()
			if s.gaveUp == nil {
				s.gaveUp = map[int]string{}
			}
			s.gaveUp[slot] = fmt.Sprintf("`%s` exited %d times in a minute", strings.Join(s.Command, " "), len(starts))
			s.settle(slot)
			s.mu.Unlock()
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

// giveUp stops restarting slot, whose worker failed to start tries times in a row, with one
// clear line: the command and the last error line it printed. Slots that give up for the
// same reason say it once.
func (s *Supervisor) giveUp(slot, tries int, err error) {
	s.failed.Add(1)
	s.Edge.WorkerSettings().Metrics.Workers.WithLabelValues(metrics.WorkerFailed).Set(float64(s.failed.Load()))
	reason := err.Error()
	var se *startError
	if errors.As(err, &se) {
		reason = se.short()
	}
	s.mu.Lock()
	if s.gaveUp == nil {
		s.gaveUp = map[int]string{}
	}
	same := false
	for _, r := range s.gaveUp {
		same = same || digitsRE.ReplaceAllString(r, "#") == digitsRE.ReplaceAllString(reason, "#")
	}
	s.gaveUp[slot] = reason
	s.settle(slot)
	s.mu.Unlock()
	if same {
		s.Logger.Debug("worker cannot start; giving up on this slot (same reason as another slot)", "worker", slot)
		return
	}
	s.Logger.Error(fmt.Sprintf("worker cannot start, giving up after %d tries: %s", tries, reason), "worker", slot)
}

func (s *Supervisor) isFrozen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frozen
}

// HandoverWorker is a worker process handed to the next edge image.
type HandoverWorker struct {
	Slot, PID               int
	Kind                    string                // "go" or "node"
	Channel, Stdout, Stderr int                   // descriptors
	Node                    *nodeipc.PrimaryState `json:",omitempty"` // a Node worker's IPC state
}

// Handover is what a Supervisor (or a ControlServer, Workers only) hands to the next
// edge image.
type Handover struct {
	Workers []HandoverWorker
	Shared  []nodeipc.SharedFD `json:",omitempty"` // a Node app's other servers
	Preload string             `json:",omitempty"` // the Node preload file, reused
	// Pools are the named pools' workers, by pool name.
	Pools map[string]Handover `json:",omitempty"`
}

// Adopt gives the supervisor the workers a previous edge image ran; call it before Run.
func (s *Supervisor) Adopt(h Handover) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.adopt = map[int]HandoverWorker{}
	for _, w := range h.Workers {
		s.adopt[w.Slot] = w
	}
	s.adoptShared = h.Shared
	s.preload = h.Preload
	for _, pool := range s.Pools {
		if ph, ok := h.Pools[pool.Name]; ok {
			pool.Adopt(ph)
		}
	}
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
		primary, err := nodeipc.ResumePrimary(*hw.Node, nodeipc.Config{AckTimeout: s.Edge.WorkerSettings().HandoffTimeout, Logger: s.Logger})
		if err != nil {
			process.Kill() // it exits anyway once its channel is gone
			return nil, err
		}
		primary.Shared = s.shared
		primary.OnQueryServer = s.chooseAppServer
		primary.Logger = s.Logger.With("worker", hw.Slot)
		s.joinNodeCluster(hw.Slot, primary)
		go primary.Run(context.Background())
		ch = &nodeChannel{p: primary, ch: primary.Channel, timeout: s.Edge.WorkerSettings().HandoffTimeout}
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
	p := s.watch(hw.Slot, hw.Kind, process, ch, files[1], files[2], false)
	p.w = newWorker(hw.Slot, hw.PID, ch, s.Edge.WorkerSettings().WorkerIdle)
	return p, nil
}

// Freeze stops supervising, for an edge upgrade, and returns the workers with their
// descriptors marked to survive the exec. Call it after the edge froze (balancer.Balancer.Freeze): no handoff may be
// in flight. Thaw undoes it if the exec fails or Freeze itself does.
func (s *Supervisor) Freeze() (Handover, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frozen = true
	out := Handover{Preload: s.preload}
	for slot, p := range s.procs {
		hw := HandoverWorker{Slot: slot, PID: p.process.Pid, Kind: p.kind}
		var err error
		switch ch := p.ch.(type) {
		case *GoChannel:
			if hw.Channel, err = fdutil.Inherit(ch.uc); err != nil {
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
		if hw.Stdout, err = fdutil.Inherit(p.stdout); err != nil {
			return out, err
		}
		if hw.Stderr, err = fdutil.Inherit(p.stderr); err != nil {
			return out, err
		}
		out.Workers = append(out.Workers, hw)
	}
	if s.shared != nil && s.ownShared {
		fds, err := s.shared.Detach()
		if err != nil {
			return out, err
		}
		s.detShared, out.Shared = fds, fds
	}
	for _, pool := range s.Pools {
		ph, err := pool.Freeze()
		if err != nil {
			return out, fmt.Errorf("pool %s: %w", pool.Name, err)
		}
		if out.Pools == nil {
			out.Pools = map[string]Handover{}
		}
		out.Pools[pool.Name] = ph
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
	for _, pool := range s.Pools {
		pool.Thaw()
	}
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
			fdutil.CloseOnExec(f)
		}
		s.startPumps(p)
		if g, ok := p.ch.(*GoChannel); ok {
			fdutil.CloseOnExec(g.uc)
		}
	}
}

// spawn starts one worker and waits until it is ready.
func (s *Supervisor) spawn(ctx context.Context, slot int) (*proc, error) {
	env := append(os.Environ(), s.Env...)
	env = append(env, fdpass.EnvWorkerID+"="+strconv.Itoa(slot))
	if s.SlotEnv != nil {
		env = append(env, s.SlotEnv(slot)...)
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
	// A wrapper's Node gets no NODE_* channel variables: it would take the channel itself.
	env = slices.DeleteFunc(env, func(kv string) bool {
		return strings.HasPrefix(kv, "NODE_CHANNEL_FD=") || strings.HasPrefix(kv, "NODE_UNIQUE_ID=") ||
			strings.HasPrefix(kv, "STICKYD_NODE_CHANNEL_FD=") || strings.HasPrefix(kv, "STICKYD_NODE_UNIQUE_ID=")
	})
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
		closeAfterStart = append(closeAfterStart, child)
		if s.wrapped {
			// Above the descriptors a forking wrapper gives its child (nodemon forks with
			// an IPC channel of its own at 3), so that the app inherits it untouched.
			for len(files) < wrappedChannelFD {
				files = append(files, nil)
			}
			files = append(files, child)
			env = append(env, nodeipc.WrappedEnv(wrappedChannelFD, slot+1)...)
		} else {
			files = append(files, child)
			env = append(env, nodeipc.Env(3, slot+1)...)
		}
		env = append(env, nodeipc.PreloadEnv(s.preload)...)
		nch := nodeipc.NewChannel(parent, nodeipc.Config{AckTimeout: s.Edge.WorkerSettings().HandoffTimeout, Logger: s.Logger})
		primary := &nodeipc.Primary{Channel: nch, Shared: s.shared, Logger: s.Logger.With("worker", slot), OnQueryServer: s.chooseAppServer}
		s.joinNodeCluster(slot, primary)
		go primary.Run(context.Background())
		ch = &nodeChannel{p: primary, ch: nch, timeout: s.Edge.WorkerSettings().HandoffTimeout}
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
		return nil, &startError{err: fmt.Errorf("start %q: %w", s.Command, err)}
	}
	p := s.watch(slot, kind, process, ch, outR, errR, true)
	timer := time.NewTimer(s.SpawnTimeout)
	defer timer.Stop()
	// A Node app that found no channel listens on its port itself: look for that while it
	// starts, so that it is named at once instead of after the spawn timeout. In Go mode
	// only Node processes count (a Go worker may serve metrics on a port of its own): a
	// Node app whose command did not say so (`./start.sh`) needs -node.
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	probe := t.C
	hint := s.noChannelHint()
	if !s.Node {
		hint = fmt.Sprintf("a Node app: say so with -node (`stickyd run -node -- %s`), which gives it stickyd's channel", strings.Join(s.Command, " "))
	}
	for {
		select {
		case <-readyC:
			s.releaseOutput(p)
			p.w = newWorker(slot, process.Pid, ch, s.Edge.WorkerSettings().WorkerIdle)
			return p, nil
		case <-p.exited:
			why := "with status 0"
			if p.err != nil {
				why = p.err.Error()
			}
			s.showFailedOutput(p)
			cmd := strings.Join(s.Command, " ")
			summary := fmt.Sprintf("`%s` exited before it was ready (%s)", cmd, why)
			if line := lastErrorLine(p.errOut.Tail()); line != "" {
				summary += "; last error: " + line
			}
			return nil, &startError{err: fmt.Errorf("%w: worker %d (`%s`) exited (%s)", ErrWorkerExited, slot, cmd, why), summary: summary}
		case <-probe:
			lns := ownListeners(p.pgid, !s.Node)
			if len(lns) == 0 {
				continue
			}
			s.stop(p)
			s.showFailedOutput(p)
			cmd := strings.Join(s.Command, " ")
			return nil, &startError{err: fmt.Errorf("%w: worker %d (`%s`): %s; %s", ErrOwnListener, slot, cmd, lns[0], hint),
				summary: fmt.Sprintf("`%s`: %s, bypassing the edge; %s", cmd, lns[0], hint)}
		case <-timer.C:
			s.releaseOutput(p)
			hint := "check that the command starts a stickyd worker (a Go worker calls fdpass.Listen(); a Node app needs -node when the command does not name node, npm, npx, yarn, pnpm or nodemon)"
			if s.Node {
				hint = "the app never called server.listen() or @socket.io/sticky's setupWorker(): check the start file (Express generator apps listen in bin/www, not app.js)"
				if s.wrapped {
					hint += "; or the app never got stickyd's channel: " + s.noChannelHint()
				}
			}
			if lns := ownListeners(p.pgid, false); len(lns) > 0 {
				hint = lns[0] + "; " + hint
			}
			s.stop(p)
			return nil, fmt.Errorf("%w: worker %d (%q) not ready after %v; %s", ErrSpawnTimeout, slot, s.Command, s.SpawnTimeout, hint)
		case <-ctx.Done():
			s.stop(p)
			return nil, ctx.Err()
		}
	}
}

// noChannelHint is the advice for a Node app that did not get the edge's IPC channel.
func (s *Supervisor) noChannelHint() string {
	return "the app must get stickyd's channel: start it as `stickyd run -- node server.js`, or keep stickyd's NODE_OPTIONS " +
		"(a start script that sets NODE_OPTIONS must add to it: NODE_OPTIONS=\"$NODE_OPTIONS --max-old-space-size=4096\")"
}

// releaseOutput writes the stderr a worker printed while starting, once it is ready (or
// past the spawn timeout), and lets the rest through as it comes.
func (s *Supervisor) releaseOutput(p *proc) { p.errOut.Release() }

// showFailedOutput shows the stderr of a worker that failed to start, unless a failed start
// already showed the same lines: a crash at load time prints one stack trace, not one per
// try and worker.
func (s *Supervisor) showFailedOutput(p *proc) {
	held := p.errOut.TakeHeld()
	if len(held) == 0 {
		return
	}
	// Pids, ports and timestamps differ from one try to the next; the failure does not.
	text := digitsRE.ReplaceAllString(strings.Join(held, "\n"), "#")
	s.mu.Lock()
	if s.shown == nil || len(s.shown) > 64 {
		s.shown = map[string]bool{}
	}
	seen := s.shown[text]
	s.shown[text] = true
	s.mu.Unlock()
	if seen {
		return
	}
	p.errOut.writeLines(held)
}

// startError is a worker start that failed before the worker was ready.
type startError struct {
	err     error
	summary string // one line: the command and why it cannot start ("": err says it)
}

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// short is the one line that says why the worker cannot start.
func (e *startError) short() string {
	if e.summary == "" {
		return e.err.Error()
	}
	return e.summary
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
	gauge := s.Edge.WorkerSettings().Metrics.WebSockets.WithLabelValues(strconv.Itoa(slot))
	return NewGoChannel(edge, s.Edge.WorkerSettings().HandoffTimeout, func(n int64) { gauge.Set(float64(n)) })
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
// and its exit closes its channel and p.exited. starting holds its stderr until ready
// (releaseOutput, showFailedOutput).
func (s *Supervisor) watch(slot int, kind string, process *os.Process, ch Channel, outR, errR *os.File, starting bool) *proc {
	p := &proc{slot: slot, kind: kind, process: process, ch: ch, stdout: outR, stderr: errR, exited: make(chan struct{})}
	// Workers run in their own process group (spawn sets Setpgid): signals go to the group,
	// so a wrapper's children (npm's sh and node) get them too. An adopted worker of an
	// older image is checked rather than assumed.
	if pg, err := unix.Getpgid(process.Pid); err == nil && pg == process.Pid {
		p.pgid = pg
	}
	p.errOut = s.outputWriter(s.Stderr, p, "stderr")
	p.errOut.hold = starting
	s.mu.Lock()
	if s.live == nil {
		s.live = map[*proc]bool{}
	}
	s.live[p] = true
	s.mu.Unlock()
	if s.killing.Load() {
		p.signal(syscall.SIGKILL)
	}
	s.startPumps(p)
	go func() {
		state, err := process.Wait()
		if err == nil && !state.Success() {
			err = errors.New(state.String())
		}
		p.err = err
		ch.Close()
		s.reapGroup(p)
		if !p.pumpsStop.Load() { // (stopped pumps: the pipes belong to the next edge image)
			outR.Close()
			errR.Close()
		}
		s.mu.Lock()
		delete(s.live, p)
		s.mu.Unlock()
		close(p.exited)
	}()
	return p
}

// reapGroup waits, after the worker's main process exited, for the rest of its process
// group (a wrapper's children) to go and for its output to end — the last lines before a
// crash are the useful ones — but not forever: what is left after a short wait, or after the
// grace of a stop, is an orphan of this worker and gets SIGKILL, and output pipes still
// held open (by a process that left the group) stop being read.
func (s *Supervisor) reapGroup(p *proc) {
	pumped := make(chan struct{})
	go func() { p.pumps.Wait(); close(pumped) }()
	deadline := time.Now().Add(orphanWait)
	if at := p.killAt.Load(); at != 0 && time.Unix(0, at).After(deadline) {
		deadline = time.Unix(0, at)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		done := false
		select {
		case <-pumped:
			done = true
		default:
		}
		if done && !p.groupAlive() {
			return
		}
		if s.killing.Load() || time.Now().After(deadline) {
			break
		}
		select {
		case <-pumped:
		case <-tick.C:
		}
	}
	if p.groupAlive() {
		s.Logger.Warn("worker's main process exited but processes of its group remain; killing them", "worker", p.slot, "pgid", p.pgid)
		p.signal(syscall.SIGKILL)
		// SIGKILL is delivered asynchronously: give the group a moment to be gone, so
		// that a caller who saw the worker exit sees its processes gone too.
		for end := time.Now().Add(time.Second); p.groupAlive() && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	select {
	case <-pumped:
		return
	case <-time.After(time.Second):
	}
	p.stdout.SetReadDeadline(time.Unix(1, 0))
	p.stderr.SetReadDeadline(time.Unix(1, 0))
	<-pumped
}

// orphanWait is how long a worker's group and output pipes get to end with its main
// process before what is left is killed.
const orphanWait = 2 * time.Second

// signal sends sig to the worker's process group, or to its process when it has none.
func (p *proc) signal(sig syscall.Signal) {
	if p.pgid > 0 {
		if err := unix.Kill(-p.pgid, sig); err == nil || !errors.Is(err, unix.ESRCH) {
			return
		}
	}
	p.process.Signal(sig)
}

// groupAlive reports whether a process of the worker's group is left. Zombies do not count:
// orphans are reaped by init, which may take its time (or never, when the edge is PID 1).
func (p *proc) groupAlive() bool {
	return p.pgid > 0 && unix.Kill(-p.pgid, 0) == nil && groupLiving(p.pgid)
}

// startPumps copies the worker's stdout and stderr to the edge's, prefixed with its slot.
func (s *Supervisor) startPumps(p *proc) {
	p.pumps.Add(2)
	go pumpLines(&p.pumps, p.stdout, s.outputWriter(s.Stdout, p, "stdout"), &p.pumpsStop)
	go pumpLines(&p.pumps, p.stderr, p.errOut, &p.pumpsStop)
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
// SIGTERM to its process group follows, and SIGKILL to the group after the grace period.
func (s *Supervisor) stop(p *proc) error {
	p.killAt.Store(time.Now().Add(s.GracePeriod).UnixNano())
	p.ch.Close()
	if s.killing.Load() {
		p.signal(syscall.SIGKILL)
	} else {
		p.signal(syscall.SIGTERM)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(s.GracePeriod):
		s.Logger.Warn("worker did not stop within the grace period; killing it", "worker", p.slot, "grace", s.GracePeriod)
		p.signal(syscall.SIGKILL)
		<-p.exited // bounded: reapGroup stops waiting for output after the kill
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
	return nodeErr(n.p.Deliver(ctx, conn))
}

// DeliverFunc hands conn over without waiting (AsyncChannel): a handle that waits its turn
// longer than the handoff timeout fails with ErrWorkerTimeout, as Deliver's does.
func (n *nodeChannel) DeliverFunc(conn syscall.Conn, _ fdpass.Meta, done func(error)) error {
	return nodeErr(n.p.DeliverFunc(conn, func(err error) { done(nodeErr(err)) }))
}

// nodeErr gives "the worker did not take it" one error whatever the worker's kind.
func nodeErr(err error) error {
	if errors.Is(err, nodeipc.ErrAckTimeout) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", ErrWorkerTimeout, err)
	}
	return err
}
func (n *nodeChannel) CanReplay() bool       { return false }
func (n *nodeChannel) Done() <-chan struct{} { return n.ch.Done() }
func (n *nodeChannel) Close() error          { return n.ch.Close() }

// lineWriter prefixes every line of a worker's output, so interleaved logs stay readable.
// It keeps the last lines (Tail) for the edge's own messages, and with hold set it keeps
// lines back instead of writing them (a starting worker's stderr: see showFailedOutput).
type lineWriter struct {
	mu      sync.Mutex
	dst     io.Writer
	prefix  string
	atBOL   bool
	hold    bool
	held    []string          // lines kept back while hold (the last heldMax)
	dropped int               // lines dropped from held
	cur     []byte            // the line being written (for tail and held), capped at lineMax
	tail    []string          // the last tailMax complete lines
	emit    func(line string) // if set, complete lines go here instead of to dst
}

const (
	heldMax = 40
	tailMax = 40
	lineMax = 1024
)

func prefixWriter(dst io.Writer, prefix string) *lineWriter {
	return &lineWriter{dst: dst, prefix: prefix, atBOL: true}
}

// outputWriter is the lineWriter of one output stream of p: to dst with the slot as
// prefix, or a record per line on s.OutputLog.
func (s *Supervisor) outputWriter(dst io.Writer, p *proc, stream string) *lineWriter {
	l := prefixWriter(dst, fmt.Sprintf("[worker %d] ", p.slot))
	if h := s.OutputLog; h != nil {
		attrs := []slog.Attr{slog.Int("worker", p.slot), slog.Int("pid", p.process.Pid), slog.String("stream", stream)}
		l.emit = func(line string) {
			r := slog.NewRecord(time.Now(), slog.LevelInfo, line, 0)
			r.AddAttrs(attrs...)
			h.Handler().Handle(context.Background(), r)
		}
	}
	return l
}

func (l *lineWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range p {
		if c == '\n' {
			l.endLine()
			continue
		}
		if len(l.cur) < lineMax {
			l.cur = append(l.cur, c)
		}
	}
	if l.hold || l.emit != nil {
		return len(p), nil // endLine emitted the complete lines
	}
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

// endLine files the current line in tail and, while holding, in held. l.mu held.
func (l *lineWriter) endLine() {
	line := strings.TrimRight(string(l.cur), "\r")
	l.cur = l.cur[:0]
	if len(l.tail) == tailMax {
		l.tail = append(l.tail[:0], l.tail[1:]...)
	}
	l.tail = append(l.tail, line)
	if l.emit != nil && !l.hold {
		l.emit(line)
	}
	if l.hold {
		if len(l.held) == heldMax {
			l.held = append(l.held[:0], l.held[1:]...)
			l.dropped++
		}
		l.held = append(l.held, line)
	}
}

// Flush ends a last line that had no newline.
func (l *lineWriter) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.hold {
		if len(l.cur) > 0 {
			l.endLine()
		}
		return
	}
	if len(l.cur) > 0 {
		l.endLine()
	}
	if !l.atBOL && l.emit == nil {
		l.dst.Write([]byte("\n"))
		l.atBOL = true
	}
}

// Tail returns the last lines written.
func (l *lineWriter) Tail() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := slices.Clone(l.tail)
	if len(l.cur) > 0 {
		out = append(out, string(l.cur))
	}
	return out
}

// Release writes the lines held back and stops holding.
func (l *lineWriter) Release() {
	l.mu.Lock()
	held, dropped, partial := l.held, l.dropped, l.hold && len(l.cur) > 0
	l.held, l.dropped, l.hold = nil, 0, false
	if dropped > 0 {
		held = append([]string{fmt.Sprintf("(%d earlier lines not shown)", dropped)}, held...)
	}
	l.mu.Unlock()
	l.writeLines(held)
	if partial && l.emit == nil { // with emit, the line goes out whole when it ends
		// The line being written goes out with its end, as it comes.
		l.mu.Lock()
		l.dst.Write(append([]byte(l.prefix), l.cur...))
		l.atBOL = false
		l.mu.Unlock()
	}
}

// TakeHeld returns the lines held back (and a line without its newline yet) and forgets them.
func (l *lineWriter) TakeHeld() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.held
	if l.hold && len(l.cur) > 0 {
		out = append(out, string(l.cur))
	}
	if l.dropped > 0 {
		out = append([]string{fmt.Sprintf("(%d earlier lines not shown)", l.dropped)}, out...)
	}
	l.held, l.dropped = nil, 0
	return out
}

// writeLines writes whole lines with the prefix.
func (l *lineWriter) writeLines(lines []string) {
	if len(lines) == 0 {
		return
	}
	var b strings.Builder
	for _, line := range lines {
		b.WriteString(l.prefix)
		b.WriteString(line)
		b.WriteByte('\n')
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.emit != nil {
		for _, line := range lines {
			l.emit(line)
		}
		return
	}
	l.dst.Write([]byte(b.String()))
}

// errorLineRE matches the line of a crash report that names the error: Node's
// "Error: Cannot find module …", "SyntaxError: …", Go's "panic: …", a shell's "…: not found".
var errorLineRE = regexp.MustCompile(`^\s*(?:Uncaught )?(?:[A-Z][A-Za-z]*)?(?:Error|Exception)\b|^panic: |^fatal error: |: not found$|: No such file or directory$|: command not found$|: Permission denied$`)

// noiseLineRE matches the lines of a crash report that never say what went wrong: stack
// frames, Node's version footer, npm's summary of a failed script.
var noiseLineRE = regexp.MustCompile(`^at |^Node\.js v|^[}^]$|A complete log of this run can be found|^npm (?:error|ERR!) (?:code|path|command|errno|syscall|signal|Lifecycle|Exit status|Failed at)\b|^npm (?:error|ERR!)\s*$`)

// digitsRE finds the numbers (pids, ports, timestamps) that differ between two tries of
// the same failure.
var digitsRE = regexp.MustCompile(`[0-9]+`)

// lastErrorLine picks the line of a failed worker's last stderr lines that says what went
// wrong: the last one that looks like an error, else the last one that is not noise.
func lastErrorLine(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		if errorLineRE.MatchString(lines[i]) {
			return strings.TrimSpace(lines[i])
		}
	}
	for i := len(lines) - 1; i >= 0; i-- {
		t := strings.TrimSpace(lines[i])
		if t == "" || noiseLineRE.MatchString(t) {
			continue
		}
		return t
	}
	return ""
}
