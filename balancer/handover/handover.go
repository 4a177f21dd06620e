//go:build unix

// Package handover replaces the edge's program image in place (execve): the pid stays,
// so the workers stay its children and systemd, Docker (pid 1) and terminals see one
// process throughout. "Upgrade" is kept for HTTP; this is the handover.
//
// What goes over, in the order it is frozen (and thawed in reverse after a failed exec):
//
//  1. serve mode's control socket: no new sidecar worker is admitted;
//  2. the edge (balancer.Balancer.Freeze): it stops accepting — listeners stay open and
//     new clients wait in the backlog — and parks the keep-alive client connections it
//     holds between requests and the requests whose answer has not started (a long-poll),
//     with any bytes already read; the learned session tables;
//  3. the workers: a Supervisor's processes (channels, output pipes, Node IPC state and
//     shared listeners) or a ControlServer's sidecar channels — after the edge, since a
//     Node worker's IPC state can be detached only with no handoff in flight;
//  4. the metrics/admin listener.
//
// The state goes to the next image as JSON in a memfd (off Linux an unlinked temporary
// file) named by EnvState; every descriptor in it is marked to survive the exec. Format
// versions it: fields are only ever added, a new image reads every older format, and an
// edge refuses to hand over to a binary that reads an older format than it writes (the
// preflight runs `BINARY version` first, which also catches a binary that cannot start
// at all).
package handover

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

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/fdpass/platform"
	"github.com/stickyd/stickyd/sticky"
)

// Format versions State.
//
// 2: requests in flight (Exchanges) go over; an older image would leak them.
// 3: TLSListeners: an older image would serve them as plain HTTP.
const Format = 3

// EnvState names the descriptor of the state an edge passes to its next image.
const EnvState = "STICKYD_HANDOVER"

// State is everything the next edge image adopts.
type State struct {
	Format     int
	Generation int
	Listeners  []int                       // client listeners
	TLS        []int                       `json:",omitempty"` // those of Listeners that serve TLS
	Metrics    int                         // the metrics/admin listener; -1: none
	Control    int                         // serve mode's control socket; -1: none
	Conns      []balancer.HandoverConn     // keep-alive client connections between requests
	Exchanges  []balancer.HandoverExchange `json:",omitempty"` // requests waiting for their answer
	Supervisor workers.Handover            // worker processes, or sidecar channels (Workers only)
	Sessions   []sticky.Entry
	Affinity   []sticky.Entry `json:",omitempty"`
}

// Load reads the state left by the previous edge image; nil when this process is not
// one. It unsets EnvState so that workers started from now on do not see it.
func Load() (*State, error) {
	s, ok := os.LookupEnv(EnvState)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(EnvState)
	fd, err := strconv.Atoi(s)
	if err != nil {
		return nil, fmt.Errorf("%s=%q: not a descriptor", EnvState, s)
	}
	f := os.NewFile(uintptr(fd), "handover")
	defer f.Close()
	var st State
	if err := json.NewDecoder(f).Decode(&st); err != nil {
		return nil, fmt.Errorf("reading the previous edge's state: %w", err)
	}
	if st.Format > Format {
		return nil, fmt.Errorf("the previous edge handed over state format %d; this binary reads up to %d", st.Format, Format)
	}
	return &st, nil
}

// Listener wraps a listening descriptor from the previous image.
func Listener(fd int) (net.Listener, error) {
	f := os.NewFile(uintptr(fd), "listener")
	defer f.Close() // FileListener holds its own (close-on-exec) duplicate
	return net.FileListener(f)
}

// FormatOf reads the "handover=N" a binary's version output names (1 if absent).
func FormatOf(versionOutput string) int {
	for _, f := range strings.Fields(versionOutput) {
		if n, ok := strings.CutPrefix(f, "handover="); ok {
			if v, err := strconv.Atoi(n); err == nil {
				return v
			}
		}
	}
	return 1
}

// Upgrader re-executes the edge in place. Set Edge and either Supervisor (demo, run) or
// Control and ControlLn (serve).
type Upgrader struct {
	Edge       *balancer.Balancer
	Supervisor *workers.Supervisor
	Control    *workers.ControlServer
	ControlLn  *net.UnixListener
	Metrics    net.Listener // the metrics/admin listener, if any
	Generation int          // this image's; the next one's is one more
	Grace      time.Duration
	Logger     *slog.Logger

	// Binary and Args are what is executed; zero: this executable and os.Args.
	Binary string
	Args   []string
}

// part is one piece of the edge that goes over: freeze hands its state to st; thaw,
// after a failed exec, serves it again in this image.
type part struct {
	name   string
	freeze func(st *State) error
	thaw   func()
}

// parts lists what goes over, in freeze order (see the package comment).
func (u *Upgrader) parts() []part {
	var ps []part
	if u.Supervisor == nil && u.ControlLn != nil {
		ps = append(ps, part{"control socket",
			func(*State) error { return u.ControlLn.SetDeadline(time.Unix(1, 0)) },
			func() { u.ControlLn.SetDeadline(time.Time{}); go u.Control.Serve(u.ControlLn) }})
	}
	ps = append(ps, part{"edge", func(st *State) error {
		ctx, cancel := context.WithTimeout(context.Background(), u.Grace)
		defer cancel()
		lns, conns, exchanges, err := u.Edge.Freeze(ctx)
		if err != nil {
			return err // Freeze thawed the edge itself
		}
		st.Conns, st.Exchanges = conns, exchanges
		st.Sessions, st.Affinity = u.Edge.Sessions().Snapshot(), u.Edge.Affinity().Snapshot()
		for _, ln := range lns {
			fd, err := balancer.InheritFD(ln)
			if err != nil {
				return err
			}
			st.Listeners = append(st.Listeners, fd)
			if balancer.IsTLSListener(ln) {
				st.TLS = append(st.TLS, fd)
			}
		}
		return nil
	}, u.Edge.Thaw})
	switch {
	case u.Supervisor != nil:
		ps = append(ps, part{"workers", func(st *State) (err error) {
			st.Supervisor, err = u.Supervisor.Freeze()
			return err
		}, u.Supervisor.Thaw})
	case u.Control != nil:
		ps = append(ps, part{"sidecar workers", func(st *State) (err error) {
			if st.Supervisor.Workers, err = u.Control.Freeze(); err != nil {
				return err
			}
			st.Control, err = balancer.InheritFD(u.ControlLn)
			return err
		}, u.Control.Thaw})
	}
	if u.Metrics != nil {
		ps = append(ps, part{"metrics listener", func(st *State) (err error) {
			st.Metrics, err = balancer.InheritFD(u.Metrics)
			return err
		}, func() {}})
	}
	return ps
}

// Upgrade checks the new binary, freezes everything that goes over, and execs it. It
// returns only if the upgrade did not happen, after this image serves again.
func (u *Upgrader) Upgrade() error {
	exe, args := u.Binary, u.Args
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("edge upgrade: find the binary: %w", err)
		}
		args = os.Args
	}
	// Preflight: a binary that cannot even start would take the whole edge down after
	// the exec; here it only fails the upgrade.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	out, err := exec.CommandContext(ctx, exe, "version").CombinedOutput()
	cancel()
	if err != nil {
		return fmt.Errorf("edge upgrade: %s does not run (%v): %s", exe, err, strings.TrimSpace(string(out)))
	}
	if f := FormatOf(string(out)); f < Format {
		return fmt.Errorf("edge upgrade: %s reads handover format %d, this edge writes %d: a downgrade that far needs a restart", exe, f, Format)
	}

	st := State{Format: Format, Generation: u.Generation + 1, Metrics: -1, Control: -1}
	var frozen []part
	fail := func(what string, err error) error {
		for i := len(frozen) - 1; i >= 0; i-- {
			frozen[i].thaw()
		}
		return fmt.Errorf("edge upgrade: %s: %w", what, err)
	}
	for _, p := range u.parts() {
		// A part that fails half-way is thawed with the others.
		frozen = append(frozen, p)
		if err := p.freeze(&st); err != nil {
			return fail(p.name, err)
		}
	}
	mfd, err := platform.AnonFile("stickyd-handover")
	if err != nil {
		return fail("state", err)
	}
	mf := os.NewFile(uintptr(mfd), "handover")
	defer mf.Close() // reached only when the exec failed
	if err := json.NewEncoder(mf).Encode(st); err != nil {
		return fail("state", err)
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		return fail("state", err)
	}
	env := append(os.Environ(), EnvState+"="+strconv.Itoa(mfd))
	u.Logger.Info("edge upgrade: handing over", "binary", exe, "generation", st.Generation,
		"workers", len(st.Supervisor.Workers), "connections", len(st.Conns), "requests_in_flight", len(st.Exchanges),
		"sessions", len(st.Sessions))
	err = syscall.Exec(exe, args, env)
	// Still here: the exec failed and this image keeps serving.
	return fail("exec", err)
}
