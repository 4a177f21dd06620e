//go:build unix

package nodeipc

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

var (
	npmOnce sync.Once
	npmErr  error
	npmOut  []byte
)

// requireNode skips (or, under CI=true, fails) when node is missing, and installs the
// fixtures' npm packages from the lockfile when node_modules is missing.
func requireNode(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("node not found in PATH (required under CI=true): %v", err)
		}
		t.Skipf("node not found in PATH: %v", err)
	}
	npmOnce.Do(func() {
		if _, err := os.Stat(filepath.Join("testdata", "node_modules")); err == nil {
			return
		}
		cmd := exec.Command("npm", "ci", "--no-audit", "--no-fund")
		cmd.Dir = "testdata"
		npmOut, npmErr = cmd.CombinedOutput()
	})
	if npmErr != nil {
		t.Fatalf("npm ci in testdata: %v\n%s", npmErr, npmOut)
	}
}

// countFDs counts this process's open fds.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot read /proc/self/fd: %v", err)
	}
	return len(ents) - 1 // the directory fd itself
}

var warmOnce sync.Once

// checkFDs records the fd count now and, at the end of the test (it must be called first so
// that its cleanup runs last), fails if fds leaked.
func checkFDs(t *testing.T) {
	t.Helper()
	warmOnce.Do(func() {
		// Let the runtime and net package open whatever they keep for the process lifetime.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err == nil {
				c.Close()
			}
			ln.Close()
		}
		exec.Command("true").Run()
	})
	before := countFDs(t)
	t.Cleanup(func() {
		var after int
		for i := 0; i < 50; i++ {
			if after = countFDs(t); after <= before {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		out, _ := exec.Command("ls", "-l", "/proc/self/fd").CombinedOutput()
		_ = out
		t.Errorf("fd leak: %d open before the test, %d after", before, after)
	})
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type worker struct {
	cmd     *exec.Cmd
	ch      *Channel
	p       *Primary
	stderr  *lockedBuffer
	runErr  chan error
	waitErr chan error
}

type workerOpts struct {
	cfg       Config
	shared    *SharedListeners
	noChannel bool // do not set NODE_CHANNEL_FD & co (the fd is still at 3)
	noRun     bool
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

var preloadOnce sync.Once
var preloadPath string

// startWorker spawns node script args... as a worker with the IPC channel at fd 3, the preload,
// and a Primary running on it. Cleanup closes the channel and kills and reaps the child.
func startWorker(t *testing.T, o workerOpts, script string, args ...string) *worker {
	t.Helper()
	requireNode(t)
	preloadOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nodeipc-preload")
		if err != nil {
			panic(err)
		}
		preloadPath = filepath.Join(dir, "stickyd-preload.js")
		if err := os.WriteFile(preloadPath, []byte(PreloadScript()), 0o600); err != nil {
			panic(err)
		}
	})
	parent, child, err := NewPair()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", append([]string{script}, args...)...)
	cmd.Dir = "testdata"
	cmd.ExtraFiles = []*os.File{child}
	cmd.Env = os.Environ()
	if !o.noChannel {
		cmd.Env = append(cmd.Env, Env(3, 1)...)
	}
	cmd.Env = append(cmd.Env, PreloadEnv(preloadPath)...)
	w := &worker{cmd: cmd, stderr: new(lockedBuffer), runErr: make(chan error, 1), waitErr: make(chan error, 1)}
	cmd.Stderr = w.stderr
	cmd.Stdout = w.stderr
	err = cmd.Start()
	child.Close()
	if err != nil {
		parent.Close()
		t.Fatal(err)
	}
	go func() { w.waitErr <- cmd.Wait() }()
	if o.cfg.Logger == nil {
		o.cfg.Logger = testLogger(t)
	}
	w.ch = NewChannel(parent, o.cfg)
	w.p = &Primary{Channel: w.ch, Shared: o.shared, Logger: o.cfg.Logger}
	if !o.noRun {
		go func() { w.runErr <- w.p.Run(context.Background()); close(w.runErr) }()
	} else {
		close(w.runErr)
	}
	t.Cleanup(func() {
		w.ch.Close()
		cmd.Process.Kill()
		select {
		case <-w.waitErr:
		case <-time.After(10 * time.Second):
			t.Errorf("worker did not exit")
		}
		select {
		case <-w.runErr:
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return")
		}
		if t.Failed() {
			t.Logf("worker output:\n%s", w.stderr.String())
		}
	})
	return w
}

func (w *worker) waitReady(t *testing.T) {
	t.Helper()
	select {
	case <-w.p.Ready():
	case <-time.After(15 * time.Second):
		t.Fatalf("worker not ready; output:\n%s", w.stderr.String())
	}
}

// tcpPair returns a connected loopback TCP pair: (client side, server side).
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// unixPair returns a connected AF_UNIX SOCK_STREAM pair as conns.
func unixPair(t testing.TB) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := platform.Socketpair(unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conv(fds[0]), conv(fds[1])
}

var _ syscall.Conn = (*net.TCPConn)(nil)
