//go:build unix

// Command stickybench is a bounded, loopback-only load generator for stickyd and the
// proxies it is compared with: WebSocket handshakes, echo round trips, idle connections
// (with the server's RSS and fd cost per connection), and engine.io long-polling.
//
// Every mode prints ONE JSON line per result on stdout, and progress lines on stderr
// every 2 s. See `stickybench help`.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

const usage = `stickybench: bounded loopback load generator for stickyd

  stickybench handshake -url ws://127.0.0.1:8080/ws -n 20000 -c 64 [-expect-hello] [-sources 8]
  stickybench echo      -url ws://127.0.0.1:8080/ws -c 64 -m 1000 -size 64 [-d 30s] [-sources 8]
  stickybench idle      -url ws://127.0.0.1:8080/ws -n 10000 [-hold 30s] [-pid PID[,PID]] [-tree] [-steps 5000,10000]
  stickybench polling   -url http://127.0.0.1:8080/socket.io/ -c 50 -d 10s [-mix echo|handshake]
  stickybench serve        -listen 127.0.0.1:0     Go echo WebSocket server (the "direct" baseline)
  stickybench serve-worker                         the same server on fdpass.Listen (under stickyd run)
  stickybench compare   [-stickyd /tmp/stickyd] [-reps 3] ...   direct vs stickyd vs nginx vs HAProxy
  stickybench compare -polling [-reps 3] [-c 64 -d 5s -mix echo -sources 16]   (= compare-polling)
                        long-polling, 4 Node socket.io workers behind stickyd, HAProxy balance source,
                        nginx ip_hash and @socket.io/sticky, one Node process direct as the reference
  stickybench soak      [-stickyd /tmp/stickyd | -admin http://127.0.0.1:8071 -url ws://127.0.0.1:8080/ws]
                        [-n 5000] [-d 60s] [-kill-every 15s]   hold WebSockets + HTTP, SIGKILL workers
  stickybench upgrade-drill [-stickyd /tmp/stickyd | -admin URL -url ws://…/ws] [-n 10000] [-upgrades 2]
                        hold WebSockets + keep-alive HTTP, upgrade the edge, check nothing dropped
  stickybench memory    [-stickyd /tmp/stickyd] [-ws 10000] [-keepalive 1000]
                        edge heap, stacks and RSS per handed-off WebSocket and per idle keep-alive connection
  stickybench pools     [-stickyd /tmp/stickyd] [-pool 'reports:path=/reports/,min=0,max=8,concurrency=1,idle=5s']
                        100 socket.io clients echo, then 20 slow /reports/ requests: the pool's timeline

Targets must be loopback (127.0.0.0/8, ::1, localhost). Results: one JSON line per run on stdout.
Run "stickybench MODE -h" for a mode's flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	mode, args := os.Args[1], os.Args[2:]
	switch mode {
	case "handshake":
		err = runHandshake(ctx, args, os.Stdout)
	case "echo":
		err = runEcho(ctx, args, os.Stdout)
	case "idle":
		err = runIdle(ctx, args, os.Stdout)
	case "polling":
		err = runPolling(ctx, args, os.Stdout)
	case "serve":
		err = runServe(ctx, args, false)
	case "serve-worker":
		err = runServe(ctx, args, true)
	case "compare":
		if i := slices.IndexFunc(args, func(a string) bool { return a == "-polling" || a == "--polling" }); i >= 0 {
			err = runComparePolling(ctx, slices.Delete(args, i, i+1), os.Stdout)
		} else {
			err = runCompare(ctx, args, os.Stdout)
		}
	case "compare-polling":
		err = runComparePolling(ctx, args, os.Stdout)
	case "soak":
		err = runSoak(ctx, args, os.Stdout)
	case "upgrade-drill":
		err = runUpgradeDrill(ctx, args, os.Stdout)
	case "memory":
		err = runMemory(ctx, args, os.Stdout)
	case "pools":
		err = runPools(ctx, args, os.Stdout)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "stickybench: unknown mode %q\n\n%s", mode, usage)
		os.Exit(2)
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintf(os.Stderr, "stickybench %s: %v\n", mode, err)
		os.Exit(1)
	}
}

// common holds the flags shared by the load modes.
type common struct {
	url     string
	sources int
	timeout time.Duration
	quiet   bool
}

func (c *common) register(fs *flag.FlagSet, defURL string) {
	fs.StringVar(&c.url, "url", defURL, "target URL (loopback only)")
	fs.IntVar(&c.sources, "sources", 1, "spread client connections over source addresses 127.0.0.1..127.0.0.N (IPv4 loopback targets only)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "per-operation timeout (dial+handshake, one message, one request)")
	fs.BoolVar(&c.quiet, "q", false, "no progress lines on stderr")
}

// check validates the target and the source count; it returns the parsed URL.
func (c *common) check(schemes ...string) (*url.URL, error) {
	u, err := url.Parse(c.url)
	if err != nil {
		return nil, fmt.Errorf("-url: %v", err)
	}
	ok := false
	for _, s := range schemes {
		ok = ok || u.Scheme == s
	}
	if !ok {
		return nil, fmt.Errorf("-url %q: scheme must be one of %v", c.url, schemes)
	}
	if err := checkLoopback(u.Hostname()); err != nil {
		return nil, err
	}
	if c.sources < 1 || c.sources > 254 {
		return nil, fmt.Errorf("-sources %d: want 1..254", c.sources)
	}
	if c.sources > 1 {
		ip := net.ParseIP(u.Hostname())
		if u.Hostname() == "localhost" {
			ip = net.IPv4(127, 0, 0, 1)
		}
		if ip == nil || ip.To4() == nil {
			return nil, fmt.Errorf("-sources %d needs an IPv4 loopback target, not %q", c.sources, u.Hostname())
		}
	}
	if c.timeout <= 0 {
		return nil, errors.New("-timeout must be > 0")
	}
	return u, nil
}

// checkLoopback refuses any host that is not loopback: 127.0.0.0/8, ::1 or localhost.
// Names other than localhost are refused without resolving them.
func checkLoopback(host string) error {
	if host == "" {
		return errors.New("target has no host")
	}
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return fmt.Errorf("target %q is not a loopback address (127.0.0.0/8, ::1 or localhost)", host)
	}
	if ip4 := ip.To4(); ip4 != nil {
		if ip4[0] == 127 {
			return nil
		}
	} else if ip.Equal(net.IPv6loopback) {
		return nil
	}
	return fmt.Errorf("target %s is not loopback: stickybench only loads 127.0.0.0/8, ::1 or localhost", host)
}

// sourceDialer returns a DialContext that spreads connections round-robin over
// 127.0.0.1..127.0.0.n as local addresses (n == 1: the kernel picks).
func sourceDialer(n int, timeout time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var next atomic.Uint64
	dialers := make([]*net.Dialer, n)
	for i := range dialers {
		dialers[i] = &net.Dialer{Timeout: timeout}
		if n > 1 {
			dialers[i].LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i+1))}
		}
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := dialers[(next.Add(1)-1)%uint64(n)]
		if n > 1 {
			network = "tcp4"
		}
		return d.DialContext(ctx, network, addr)
	}
}

// emit writes one JSON line.
func emit(w io.Writer, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf) // one line, with a trailing newline
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	_, err := w.Write(buf.Bytes())
	return err
}

// progress prints fn() on stderr every 2 s until the returned stop is called.
func progress(quiet bool, mode string, fn func() string) (stop func()) {
	if quiet {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(finished)
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintf(os.Stderr, "stickybench %s: %5.1fs %s\n", mode, time.Since(start).Seconds(), fn())
			}
		}
	}()
	return func() { close(done); <-finished }
}

// errSample keeps a count of errors and the first few distinct messages.
type errSample struct {
	n       atomic.Int64
	samples chan string
}

func newErrSample() *errSample { return &errSample{samples: make(chan string, 5)} }

func (e *errSample) add(err string) {
	e.n.Add(1)
	if len(err) > 200 {
		err = err[:200] + "…"
	}
	select {
	case e.samples <- err:
	default:
	}
}

func (e *errSample) list() []string {
	var out []string
	for {
		select {
		case s := <-e.samples:
			out = append(out, s)
		default:
			return out
		}
	}
}

func nofile() (soft, hard uint64) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0
	}
	return uint64(rl.Cur), uint64(rl.Max) // int64 on FreeBSD
}
