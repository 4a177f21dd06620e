//go:build unix

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// compare-polling: engine.io long-polling through the same 4 Node socket.io workers
// behind stickyd, HAProxy (balance source), nginx (ip_hash) and @socket.io/sticky, with
// one Node process direct as the reference.

type pollOpts struct {
	self, stickyd, nginx, haproxy, node, appDir string
	reps, c, workers, sources, size             int
	d                                           time.Duration
	mix                                         string
	raw                                         io.Writer
}

// pollTargets: every target the mode knows, in table order. nginx-hash is not in the
// default set: `hash $remote_addr consistent` instead of ip_hash (ip_hash keys IPv4 on
// the first three octets, so every 127.0.0.x source lands on one backend).
var pollTargets = []string{"direct", "stickyd", "stickyd-proxy", "haproxy", "nginx", "nginx-hash", "sticky"}

var pollTargetDesc = map[string]string{
	"direct":        "node direct (1 process)",
	"stickyd":       "stickyd run -workers 4",
	"stickyd-proxy": "stickyd proxy, 4 backends by address",
	"haproxy":       "HAProxy balance source",
	"nginx":         "nginx ip_hash",
	"nginx-hash":    "nginx hash $remote_addr consistent",
	"sticky":        "@socket.io/sticky (cluster)",
}

type pollRuns struct {
	rate, p99       []float64
	errors, unknown int64
	samples         []string
}

func runComparePolling(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("compare-polling", flag.ContinueOnError)
	var o pollOpts
	fs.StringVar(&o.stickyd, "stickyd", "/tmp/stickyd", "stickyd binary (go build -o /tmp/stickyd ./cmd/stickyd)")
	fs.StringVar(&o.nginx, "nginx", "", "nginx binary (default: from PATH or /usr/sbin; skipped if none)")
	fs.StringVar(&o.haproxy, "haproxy", "", "haproxy binary (default: from PATH or /usr/sbin; skipped if none)")
	fs.StringVar(&o.node, "node", "node", "node binary")
	fs.StringVar(&o.appDir, "app-dir", "cmd/stickyd/testdata/socketio", "the socket.io fixtures (server-listen.js, sticky-primary.js, node_modules installed)")
	targets := fs.String("targets", "direct,stickyd,haproxy,nginx,sticky", "targets, from: "+strings.Join(pollTargets, ","))
	fs.IntVar(&o.reps, "reps", 3, "repetitions (interleaved, order rotated; medians reported)")
	fs.IntVar(&o.workers, "workers", 4, "Node workers behind every balancer")
	fs.IntVar(&o.c, "c", 64, "polling virtual clients")
	fs.DurationVar(&o.d, "d", 5*time.Second, "duration of each polling run")
	fs.StringVar(&o.mix, "mix", "echo", "polling request mix (echo or handshake), the same for every target")
	fs.IntVar(&o.size, "size", 16, "echo payload bytes")
	fs.IntVar(&o.sources, "sources", 16, "client source addresses 127.0.0.1..N (what balance source / ip_hash key on)")
	rawPath := fs.String("raw", "", "also append every run's JSON line to this file")
	mdPath := fs.String("o", "", "also write the Markdown table to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if o.reps < 1 || o.reps > 20 || o.d <= 0 || o.d > 10*time.Minute || o.c < 1 || o.c > 10000 || o.workers < 1 || o.workers > 64 {
		return errors.New("bounded runs only: -reps 1..20, -d up to 10m, -c 1..10000, -workers 1..64")
	}
	if o.mix != "echo" && o.mix != "handshake" {
		return fmt.Errorf("-mix %q: echo or handshake", o.mix)
	}
	names, err := pollTargetList(*targets)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(o.appDir, "node_modules", "socket.io")); err != nil {
		return fmt.Errorf("-app-dir %s: no node_modules/socket.io (run npm ci there): %v", o.appDir, err)
	}
	if o.appDir, err = filepath.Abs(o.appDir); err != nil {
		return err
	}
	if o.self, err = os.Executable(); err != nil {
		return err
	}
	var kept []string
	for _, n := range names {
		bin := map[string]string{"nginx": o.nginx, "nginx-hash": o.nginx, "haproxy": o.haproxy}
		if b, ok := bin[n]; ok && findBin(b, strings.TrimSuffix(n, "-hash")) == "" {
			fmt.Fprintf(stderr, "stickybench compare-polling: %s not installed, skipped\n", n)
			continue
		}
		kept = append(kept, n)
	}
	names = kept
	o.raw = io.Discard
	if *rawPath != "" {
		f, err := os.OpenFile(*rawPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		o.raw = f
	}
	dir, err := os.MkdirTemp("", "stickybench-compare-polling-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	res := map[string]*pollRuns{}
	for _, n := range names {
		res[n] = &pollRuns{}
	}
	for rep := range o.reps {
		for i := range names {
			name := names[(i+rep)%len(names)]
			var t *target
			var err error
			for try := range 3 { // a freshly picked port can be taken again before it is bound
				if t, err = o.start(ctx, name, dir); err == nil {
					break
				}
				if t != nil {
					t.stop()
				}
				fmt.Fprintf(stderr, "stickybench compare-polling: starting %s (try %d): %v\n", name, try+1, err)
			}
			if err != nil {
				return fmt.Errorf("starting %s: %w", name, err)
			}
			fmt.Fprintf(stderr, "stickybench compare-polling: rep %d/%d %s at %s (pids %v)\n", rep+1, o.reps, name, t.url, t.pids)
			var pr pollingResult
			err = o.child(ctx, &pr, "polling", "-q", "-url", t.url, "-c", strconv.Itoa(o.c), "-d", o.d.String(),
				"-mix", o.mix, "-pin-sources", "-size", strconv.Itoa(o.size), "-sources", strconv.Itoa(o.sources))
			t.stop()
			if err != nil {
				return fmt.Errorf("%s rep %d: %w", name, rep+1, err)
			}
			r := res[name]
			r.rate = append(r.rate, pr.Rate)
			r.p99 = append(r.p99, pr.P99ms)
			r.errors += pr.Errors
			r.unknown += pr.SessionUnknown
			if len(r.samples) < 3 {
				r.samples = append(r.samples, pr.ErrorSample...)
			}
			fmt.Fprintf(stderr, "stickybench compare-polling:   %s: %.0f req/s, p99 %.1f ms, errors %d (Session ID unknown %d)\n",
				name, pr.Rate, pr.P99ms, pr.Errors, pr.SessionUnknown)
			time.Sleep(time.Second)
		}
	}
	var b strings.Builder
	writePollTable(&b, &o, names, res)
	if *mdPath != "" {
		if err := os.WriteFile(*mdPath, []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	_, err = io.WriteString(out, b.String())
	return err
}

func pollTargetList(s string) ([]string, error) {
	var names []string
	for _, n := range strings.Split(s, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		ok := false
		for _, k := range pollTargets {
			ok = ok || k == n
		}
		if !ok {
			return nil, fmt.Errorf("-targets: unknown %q (known: %s)", n, strings.Join(pollTargets, ","))
		}
		names = append(names, n)
	}
	if len(names) == 0 {
		return nil, errors.New("-targets: none")
	}
	return names, nil
}

func (o *pollOpts) child(ctx context.Context, v any, args ...string) error {
	c := &compareOpts{self: o.self, raw: o.raw}
	return c.child(ctx, v, args...)
}

// startNode starts one `node server-listen.js` on port.
func (o *pollOpts) startNode(t *target, port int, id string) error {
	cmd := exec.Command(o.node, "server-listen.js")
	cmd.Dir = o.appDir
	cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(port), "STICKYD_WORKER_ID="+id)
	cmd.Stderr = io.Discard
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	t.procs = append(t.procs, cmd)
	t.pids = append(t.pids, cmd.Process.Pid)
	return nil
}

// freeListenPort returns a port below the ephemeral range that is free on every
// address. Node's listen(PORT) binds the wildcard address, which fails with EADDRINUSE
// while a client connection of an earlier run (from 127.0.0.x, -sources) still holds
// that port number as its local port — which freePort's ephemeral ports often are.
func freeListenPort() (int, error) {
	for range 200 {
		p := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		return p, nil
	}
	return 0, errors.New("no free port in 20000..31999")
}

func (o *pollOpts) start(ctx context.Context, name, dir string) (*target, error) {
	t := &target{name: name}
	p, err := freeListenPort()
	if err != nil {
		return nil, err
	}
	front := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	t.url = "http://" + front + "/socket.io/"
	switch name {
	case "direct":
		if err := o.startNode(t, p, "0"); err != nil {
			return t, err
		}
	case "stickyd":
		if !isExec(o.stickyd) {
			return nil, fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", o.stickyd, o.stickyd)
		}
		mp, err := freeListenPort()
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(o.stickyd, "run", "-listen", front, "-workers", strconv.Itoa(o.workers),
			"-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn", "-shutdown-timeout", "5s",
			"--", o.node, "server-listen.js")
		cmd.Dir = o.appDir
		cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
		cmd.SysProcAttr = childAttr()
		if err := cmd.Start(); err != nil {
			return t, err
		}
		t.procs = append(t.procs, cmd)
		t.pids = append(t.pids, cmd.Process.Pid)
	case "sticky":
		cmd := exec.Command(o.node, "sticky-primary.js")
		cmd.Dir = o.appDir
		cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(p), "WORKERS="+strconv.Itoa(o.workers))
		cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
		cmd.SysProcAttr = childAttr()
		if err := cmd.Start(); err != nil {
			return t, err
		}
		t.procs = append(t.procs, cmd)
		t.pids = append(t.pids, cmd.Process.Pid)
	default: // stickyd-proxy, haproxy, nginx, nginx-hash: 4 Node processes on their own ports
		var backends []string
		for i := range o.workers {
			bp, err := freeListenPort()
			if err != nil {
				return t, err
			}
			if err := o.startNode(t, bp, strconv.Itoa(i)); err != nil {
				return t, err
			}
			backends = append(backends, net.JoinHostPort("127.0.0.1", strconv.Itoa(bp)))
		}
		for _, b := range backends {
			if err := waitPolling(ctx, "http://"+b+"/socket.io/"); err != nil {
				return t, err
			}
		}
		var bin string
		var args []string
		switch name {
		case "stickyd-proxy":
			// The same 4 backends as HAProxy's and nginx's, sticky by sid (the default).
			if !isExec(o.stickyd) {
				return t, fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", o.stickyd, o.stickyd)
			}
			mp, err := freeListenPort()
			if err != nil {
				return t, err
			}
			bin = o.stickyd
			args = []string{"proxy", "-listen", front, "-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)),
				"-log-level", "warn", "-shutdown-timeout", "5s"}
			for _, b := range backends {
				args = append(args, "-backend", b)
			}
		case "haproxy":
			bin = findBin(o.haproxy, "haproxy")
			cf := filepath.Join(dir, "haproxy-polling.cfg")
			if err := os.WriteFile(cf, []byte(haproxyPollingConf(front, backends)), 0o644); err != nil {
				return t, err
			}
			args = []string{"-db", "-f", cf}
		default:
			bin = findBin(o.nginx, "nginx")
			nd := filepath.Join(dir, name)
			if err := os.MkdirAll(nd, 0o755); err != nil {
				return t, err
			}
			cf := filepath.Join(nd, "nginx.conf")
			if err := os.WriteFile(cf, []byte(nginxPollingConf(nd, front, backends, name == "nginx-hash")), 0o644); err != nil {
				return t, err
			}
			args = []string{"-p", nd, "-c", cf, "-e", "stderr"}
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = childAttr()
		if err := cmd.Start(); err != nil {
			return t, err
		}
		t.procs = append(t.procs, cmd) // stopped first (stop walks procs backwards)
		t.pids = append([]int{cmd.Process.Pid}, t.pids...)
	}
	return t, waitPolling(ctx, t.url)
}

// haproxyPollingConf: mode http with keep-alive on both sides, source-IP stickiness.
func haproxyPollingConf(front string, backends []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
  nbthread 2
  maxconn 5000
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout http-keep-alive 60s
frontend fe
  bind %s
  default_backend be
backend be
  balance source
  http-reuse safe
`, front)
	for i, be := range backends {
		fmt.Fprintf(&b, "  server n%d %s\n", i, be)
	}
	return b.String()
}

// nginxPollingConf: ip_hash (or hash $remote_addr consistent), upstream keep-alive.
func nginxPollingConf(dir, front string, backends []string, consistentHash bool) string {
	var ups strings.Builder
	if consistentHash {
		ups.WriteString("    hash $remote_addr consistent;\n")
	} else {
		ups.WriteString("    ip_hash;\n")
	}
	for _, be := range backends {
		fmt.Fprintf(&ups, "    server %s;\n", be)
	}
	ups.WriteString("    keepalive 64;\n")
	// Connection "" on plain requests keeps the upstream connection alive; "upgrade" when
	// the client asks for one (the socket.io nginx example).
	return fmt.Sprintf(`worker_processes 2;
daemon off;
master_process on;
pid %[1]s/nginx.pid;
error_log stderr warn;
events { worker_connections 10000; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  keepalive_timeout 60s;
  keepalive_requests 100000;
  map $http_upgrade $connection_upgrade { default upgrade; "" ""; }
  upstream sio {
%[2]s  }
  server {
    listen %[3]s;
    location / {
      proxy_pass http://sio;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_read_timeout 60s;
    }
  }
}
`, dir, ups.String(), front)
}

// waitPolling polls the engine.io handshake until it answers an open packet.
func waitPolling(ctx context.Context, base string) error {
	deadline := time.Now().Add(30 * time.Second)
	cl := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var last error
	for time.Now().Before(deadline) {
		resp, err := cl.Get(base + "?EIO=4&transport=polling")
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if _, err = parseOpenSid(b); err == nil && resp.StatusCode == 200 {
				return nil
			}
			last = fmt.Errorf("%d %q", resp.StatusCode, trunc(b))
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(150 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s not ready after 30s: %v", base, last)
}

// pollVerdict states whether stickyd meets the targets: at least HAProxy's
// requests/s and at least 3× @socket.io/sticky's, with no errors of its own.
type pollVerdict struct {
	VsHAProxy, VsSticky   float64 // ratios (0: target not measured)
	HAProxyMet, StickyMet bool
	ErrorsOK              bool
}

func verdict(stickyd, haproxy, sticky float64, stickydErrors int64) pollVerdict {
	v := pollVerdict{ErrorsOK: stickydErrors == 0}
	if haproxy > 0 {
		v.VsHAProxy = stickyd / haproxy
		v.HAProxyMet = stickyd >= haproxy
	}
	if sticky > 0 {
		v.VsSticky = stickyd / sticky
		v.StickyMet = stickyd >= 3*sticky
	}
	return v
}

func metStr(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func writePollTable(b *strings.Builder, o *pollOpts, names []string, res map[string]*pollRuns) {
	med := func(n string) float64 {
		if r, ok := res[n]; ok {
			return median(r.rate)
		}
		return 0
	}
	hp, st := med("haproxy"), med("sticky")
	fmt.Fprintf(b, "| target | requests/s | p99 ms | errors | of which Session ID unknown | × HAProxy | × @socket.io/sticky |\n")
	fmt.Fprintf(b, "|---|---|---|---|---|---|---|\n")
	for _, n := range names {
		r := res[n]
		rate := median(r.rate)
		fmt.Fprintf(b, "| %s | %.0f | %.1f | %d | %d | %s | %s |\n", pollTargetDesc[n], rate, median(r.p99), r.errors, r.unknown, ratio(rate, hp), ratio(rate, st))
	}
	fmt.Fprintf(b, "\nMedians of %d interleaved repetitions (order rotated); errors are summed over the repetitions.\n", o.reps)
	fmt.Fprintf(b, "Per run: stickybench polling -pin-sources -c %d -d %s -mix %s -size %d -sources %d; %d Node workers behind every balancer.\n", o.c, o.d, o.mix, o.size, o.sources, o.workers)
	fmt.Fprintf(b, "Raw requests/s per run:\n")
	for _, n := range names {
		fmt.Fprintf(b, "- %s: %v (p99 ms %v)\n", n, res[n].rate, res[n].p99)
		for _, s := range res[n].samples {
			fmt.Fprintf(b, "  - error sample: %s\n", s)
		}
	}
	if r, ok := res["stickyd"]; ok {
		v := verdict(median(r.rate), hp, st, r.errors)
		fmt.Fprintf(b, "\nTargets:\n")
		if hp > 0 {
			fmt.Fprintf(b, "- stickyd ≥ HAProxy balance source: %s (%.2f×)\n", metStr(v.HAProxyMet), v.VsHAProxy)
		}
		if st > 0 {
			fmt.Fprintf(b, "- stickyd ≥ 3× @socket.io/sticky: %s (%.2f×)\n", metStr(v.StickyMet), v.VsSticky)
		}
		fmt.Fprintf(b, "- stickyd errors = 0: %s (%d)\n", metStr(v.ErrorsOK), r.errors)
	}
}
