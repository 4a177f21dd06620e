//go:build linux

package nodeipc

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cpuNow is this process's CPU time (user + system, every thread): the edge's side of a
// handoff, the Node worker being another process.
func cpuNow() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rawPair is a connected AF_UNIX stream pair made as cheaply as possible (no net.FileConn),
// so that the benchmark's own cost per handoff stays small beside the channel's: keep is
// the end the worker never sees, give an *os.File (a syscall.Conn, outside the poller).
func rawPair(b *testing.B) (keep int, give *os.File) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	return fds[0], os.NewFile(uintptr(fds[1]), "pair")
}

// BenchmarkNodeHandoffCPU reports the edge's CPU per handoff to a real Node worker
// (listen.js with the preload, cluster-primary emulation: NODE_HANDLE newconn, Node's ACK,
// the worker's newconn reply), one handoff at a time as the edge's accept path makes them.
// edge-cpu-µs/handoff is the process's CPU time (every thread) over the handoffs divided by
// their number: Deliver and the edge's close of its copy, with the reader and Run
// goroutines' work for it. ack-waited is the previous behaviour (SendHandle waits for
// Node's ACK, then Deliver for the reply), ack-piped the current one, in the same run.
//
//	go test -bench NodeHandoffCPU -benchmem -run '^$' ./fdpass/nodeipc
func BenchmarkNodeHandoffCPU(b *testing.B) {
	requireNode(b)
	dir := b.TempDir()
	preload := filepath.Join(dir, "stickyd-preload.js")
	if err := os.WriteFile(preload, []byte(PreloadScript()), 0o600); err != nil {
		b.Fatal(err)
	}
	parent, child, err := NewPair()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("node", "listen.js", "3000")
	cmd.Dir = "testdata"
	cmd.ExtraFiles = []*os.File{child}
	cmd.Env = append(os.Environ(), Env(3, 1)...)
	cmd.Env = append(cmd.Env, PreloadEnv(preload)...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	child.Close()
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	ch := NewChannel(parent, Config{Logger: slog.New(slog.DiscardHandler)})
	defer ch.Close()
	p := &Primary{Channel: ch}
	go p.Run(context.Background())
	select {
	case <-p.Ready():
	case <-time.After(15 * time.Second):
		b.Fatal("worker not ready")
	}
	ctx := context.Background()
	deliver := func() error {
		keep, give := rawPair(b)
		err := p.Deliver(ctx, give)
		give.Close()
		unix.Close(keep)
		return err
	}
	for range 2000 { // let V8 warm up
		if err := deliver(); err != nil {
			b.Fatal(err)
		}
	}
	// The client connections are made before and closed after each batch of handoffs,
	// outside the CPU count: closing the end the worker does not hold wakes the worker
	// (the client going away), which is no part of the edge's handoff.
	const batch = 256
	keeps := make([]int, 0, batch)
	gives := make([]*os.File, 0, batch)
	run := func(b *testing.B, waitACK bool) {
		waitNewconnACK = waitACK
		defer func() { waitNewconnACK = false }()
		b.ReportAllocs()
		var cpu time.Duration
		n := 0
		for b.Loop() {
			if len(gives) == 0 {
				for range batch {
					k, g := rawPair(b)
					keeps, gives = append(keeps, k), append(gives, g)
				}
				cpu -= cpuNow()
			}
			g := gives[len(gives)-1]
			gives = gives[:len(gives)-1]
			if err := p.Deliver(ctx, g); err != nil {
				b.Fatal(err)
			}
			g.Close() // the edge closes its copy
			n++
			if len(gives) == 0 {
				cpu += cpuNow()
				for _, k := range keeps {
					unix.Close(k)
				}
				keeps = keeps[:0]
			}
		}
		if len(gives) > 0 {
			cpu += cpuNow()
			for _, g := range gives {
				g.Close()
			}
			for _, k := range keeps {
				unix.Close(k)
			}
			gives, keeps = gives[:0], keeps[:0]
		}
		b.ReportMetric(float64(cpu)/float64(n)/1e3, "edge-cpu-µs/handoff")
	}
	// fill makes n client connections for the next batch; drop closes the ends the worker
	// did not get (both outside the CPU count).
	fill := func(b *testing.B, n int) {
		for range n {
			k, g := rawPair(b)
			keeps, gives = append(keeps, k), append(gives, g)
		}
	}
	drop := func() {
		for _, k := range keeps {
			unix.Close(k)
		}
		keeps, gives = keeps[:0], gives[:0]
	}
	// A busy edge: 8 callers at once (the turn still lets one handle out at a time), so the
	// process is seldom idle between a handle, its ACK and its answer.
	runParallel := func(b *testing.B, waitACK bool) {
		waitNewconnACK = waitACK
		defer func() { waitNewconnACK = false }()
		const callers = 8
		b.ReportAllocs()
		var cpu time.Duration
		for done := 0; done < b.N; {
			n := min(batch, b.N-done)
			fill(b, n)
			work := make(chan *os.File, n)
			for _, g := range gives {
				work <- g
			}
			close(work)
			errs := make(chan error, callers)
			c0 := cpuNow()
			for range callers {
				go func() {
					for g := range work {
						if err := p.Deliver(ctx, g); err != nil {
							errs <- err
							return
						}
						g.Close()
					}
					errs <- nil
				}()
			}
			for range callers {
				if err := <-errs; err != nil {
					b.Fatal(err)
				}
			}
			cpu += cpuNow() - c0
			drop()
			done += n
		}
		b.ReportMetric(float64(cpu)/float64(b.N)/1e3, "edge-cpu-µs/handoff")
	}
	// A burst, the way the edge hands connections over (DeliverFunc): every handoff of a
	// batch is queued at once, each done closes the edge's copy, and the reader sends the
	// next handle as soon as the worker has ACKed the one before.
	runBurst := func(b *testing.B) {
		b.ReportAllocs()
		var cpu time.Duration
		for done := 0; done < b.N; {
			n := min(batch, b.N-done)
			fill(b, n)
			// One wake-up of this goroutine per batch, not per handoff (the edge has none).
			var left atomic.Int64
			left.Store(int64(n))
			var failed atomic.Pointer[error]
			all := make(chan struct{})
			c0 := cpuNow()
			for _, g := range gives {
				err := p.DeliverFunc(g, func(err error) {
					g.Close()
					if err != nil {
						failed.CompareAndSwap(nil, &err)
					}
					if left.Add(-1) == 0 {
						close(all)
					}
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			<-all
			if err := failed.Load(); err != nil {
				b.Fatal(*err)
			}
			cpu += cpuNow() - c0
			drop()
			done += n
		}
		b.ReportMetric(float64(cpu)/float64(b.N)/1e3, "edge-cpu-µs/handoff")
	}
	b.Run("listen/ack-waited", func(b *testing.B) { run(b, true) })
	b.Run("listen/ack-piped", func(b *testing.B) { run(b, false) })
	b.Run("listen/ack-waited/8-callers", func(b *testing.B) { runParallel(b, true) })
	b.Run("listen/ack-piped/8-callers", func(b *testing.B) { runParallel(b, false) })
	b.Run("listen/burst", runBurst)
}
