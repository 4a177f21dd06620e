package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// envHandover names the descriptor of the state an edge passes to its next image.
const envHandover = "STICKYD_HANDOVER"

// handoverFormat versions edgeHandover. A new image must read every format an older
// image can write (fields are only ever added); it refuses a newer one before touching
// anything, and the old image — still there, since the preflight runs first — says why.
//
// 2: requests in flight (Exchanges) go over; an older image would leak them.
const handoverFormat = 2

// edgeHandover is balancer.HandoverState plus what the command itself owns.
type edgeHandover struct {
	Format int
	balancer.HandoverState
	Metrics int // -1: none
	Control int // serve mode's control socket; -1: none
}

// loadHandover reads the state left by the previous edge image, if this process is one.
func loadHandover() (*edgeHandover, error) {
	s, ok := os.LookupEnv(envHandover)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(envHandover) // workers started from now on must not see it
	fd, err := strconv.Atoi(s)
	if err != nil {
		return nil, fmt.Errorf("%s=%q: not a descriptor", envHandover, s)
	}
	f := os.NewFile(uintptr(fd), "handover")
	defer f.Close()
	var st edgeHandover
	if err := json.NewDecoder(f).Decode(&st); err != nil {
		return nil, fmt.Errorf("reading the previous edge's state: %w", err)
	}
	if st.Format > handoverFormat {
		return nil, fmt.Errorf("the previous edge handed over state format %d; this binary reads up to %d", st.Format, handoverFormat)
	}
	return &st, nil
}

// inheritedListener wraps a listening descriptor from the previous image.
func inheritedListener(fd int) (net.Listener, error) {
	f := os.NewFile(uintptr(fd), "listener")
	defer f.Close() // FileListener holds its own (close-on-exec) duplicate
	return net.FileListener(f)
}

// upgrader re-executes the edge in place (same pid, so workers stay its children).
type upgrader struct {
	log        *slog.Logger
	b          *balancer.Balancer
	sup        *workers.Supervisor
	cs         *workers.ControlServer // serve mode
	ctl        *net.UnixListener
	lnsMetrics net.Listener
	generation int
	grace      time.Duration
}

// upgrade checks the new binary, freezes the edge, and execs it. It returns only if the
// upgrade did not happen, after resuming service.
func (u *upgrader) upgrade() error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("edge upgrade: find the binary: %w", err)
	}
	// Preflight: a binary that cannot even start would take the whole edge down after
	// the exec; here it only fails the upgrade.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	out, err := exec.CommandContext(ctx, exe, "version").CombinedOutput()
	cancel()
	if err != nil {
		return fmt.Errorf("edge upgrade: %s does not run (%v): %s", exe, err, strings.TrimSpace(string(out)))
	}
	if f := handoverFormatOf(string(out)); f < handoverFormat {
		return fmt.Errorf("edge upgrade: %s reads handover format %d, this edge writes %d: a downgrade that far needs a restart", exe, f, handoverFormat)
	}
	st := edgeHandover{Format: handoverFormat, Metrics: -1, Control: -1}
	if u.sup == nil {
		// Serve mode: stop admitting sidecar workers first; the control socket goes over too.
		u.ctl.SetDeadline(time.Unix(1, 0))
	}
	// The edge first: once it is frozen no handoff is in flight, which a Node worker's
	// IPC state needs before it can be detached.
	ctx, cancel = context.WithTimeout(context.Background(), u.grace)
	lns, conns, exchanges, err := u.b.Freeze(ctx)
	cancel()
	if err != nil {
		if u.sup == nil {
			u.ctl.SetDeadline(time.Time{})
			go u.cs.Serve(u.ctl)
		}
		return fmt.Errorf("edge upgrade: %w", err)
	}
	var thawWorkers func()
	if u.sup != nil {
		thawWorkers = u.sup.Thaw
		st.Supervisor, err = u.sup.Freeze()
	} else {
		thawWorkers = func() {
			u.cs.Thaw()
			u.ctl.SetDeadline(time.Time{})
			go u.cs.Serve(u.ctl)
		}
		st.Supervisor.Workers, err = u.cs.Freeze()
		if err == nil {
			st.Control, err = balancer.InheritFD(u.ctl)
		}
	}
	fail := func(err error) error {
		thawWorkers()
		u.b.Thaw()
		return fmt.Errorf("edge upgrade: %w", err)
	}
	if err != nil {
		return fail(err)
	}
	st.Generation = u.generation + 1
	st.Conns = conns
	st.Exchanges = exchanges
	st.Sessions = u.b.Sessions().Snapshot()
	st.Affinity = u.b.Affinity().Snapshot()
	for _, ln := range lns {
		fd, err := balancer.InheritFD(ln)
		if err != nil {
			return fail(err)
		}
		st.Listeners = append(st.Listeners, fd)
	}
	if u.lnsMetrics != nil {
		if st.Metrics, err = balancer.InheritFD(u.lnsMetrics); err != nil {
			return fail(err)
		}
	}
	mfd, err := unix.MemfdCreate("stickyd-handover", 0)
	if err != nil {
		return fail(err)
	}
	mf := os.NewFile(uintptr(mfd), "handover")
	if err := json.NewEncoder(mf).Encode(st); err != nil {
		mf.Close()
		return fail(err)
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		mf.Close()
		return fail(err)
	}
	env := append(os.Environ(), envHandover+"="+strconv.Itoa(mfd))
	u.log.Info("edge upgrade: handing over", "binary", exe, "generation", st.Generation,
		"workers", len(st.Supervisor.Workers), "connections", len(conns), "requests_in_flight", len(exchanges), "sessions", len(st.Sessions))
	err = syscall.Exec(exe, os.Args, env)
	// Still here: the exec failed and this image keeps serving.
	mf.Close()
	return fail(err)
}

// runUpgrade asks a running edge to upgrade itself and waits (until ctx ends) for the
// new image to answer with a higher generation.
func runUpgrade(ctx context.Context, c *adminClient) error {
	st, err := c.edgeStatus(ctx)
	if err != nil {
		return err
	}
	if _, err := c.post(ctx, "/admin/upgrade"); err != nil {
		return err
	}
	// Nothing signals the new image's arrival across processes: ask until it answers.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("upgrade: the edge at %s did not come back with a generation above %d within -timeout %v: see its log (a failed upgrade leaves the old image serving)", c.base, st.Generation, c.timeout)
		case <-tick.C:
		}
		// Errors are expected while the new image starts; a wrong answer is not.
		if now, err := c.edgeStatus(ctx); err == nil && now.Generation > st.Generation {
			fmt.Fprintf(c.stdout, "edge upgraded: generation %d, version %s\n", now.Generation, now.Version)
			return nil
		}
	}
}

// handoverFormatOf reads the "handover N" a binary's version output names (1 if absent).
func handoverFormatOf(versionOutput string) int {
	for _, f := range strings.Fields(versionOutput) {
		if n, ok := strings.CutPrefix(f, "handover="); ok {
			if v, err := strconv.Atoi(n); err == nil {
				return v
			}
		}
	}
	return 1
}
