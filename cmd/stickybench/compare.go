//go:build unix

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// target is one server stack under test.
type target struct {
	name  string
	url   string
	pids  []int // for idle: the proxy/edge first, then its backends (with -tree)
	procs []*exec.Cmd
}

type compareOpts struct {
	self, stickyd, nginx, haproxy string
	reps, hsN, c, m, size         int
	idleN                         int
	idleSteps                     string
	sources                       int
	hold                          time.Duration
	raw                           io.Writer
	// -tls: every target terminates TLS with the same certificate (pem: cert and key in
	// one file, as HAProxy wants it).
	tls               bool
	certFile, keyFile string
	pemFile           string
}

func runCompare(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("compare", flag.ContinueOnError)
	var o compareOpts
	fs.StringVar(&o.stickyd, "stickyd", "/tmp/stickyd", "stickyd binary (go build -o /tmp/stickyd ./cmd/stickyd)")
	fs.StringVar(&o.nginx, "nginx", "", "nginx binary (default: from PATH or /usr/sbin; skipped if none)")
	fs.StringVar(&o.haproxy, "haproxy", "", "haproxy binary (default: from PATH or /usr/sbin; skipped if none)")
	targets := fs.String("targets", "direct,stickyd,nginx,haproxy", "targets to measure (also stickyd-proxy: `stickyd proxy` in front of the same 2 backends as nginx and HAProxy)")
	fs.IntVar(&o.reps, "reps", 3, "repetitions (interleaved across targets; medians reported)")
	fs.IntVar(&o.hsN, "hs-n", 10000, "handshakes per run")
	fs.IntVar(&o.c, "c", 64, "concurrency of handshake and echo runs")
	fs.IntVar(&o.m, "m", 500, "echo messages per connection")
	fs.IntVar(&o.size, "size", 64, "echo message size")
	fs.IntVar(&o.idleN, "idle-n", 9000, "idle connections held (a proxy needs 2 fds each: keep 2*N under the hard nofile limit)")
	fs.StringVar(&o.idleSteps, "idle-steps", "4000,9000", "idle sampling steps (slope between the last two)")
	fs.DurationVar(&o.hold, "hold", 2*time.Second, "idle hold after the last step")
	fs.IntVar(&o.sources, "sources", 8, "client source addresses")
	rawPath := fs.String("raw", "", "also append every run's JSON line to this file")
	fs.BoolVar(&o.tls, "tls", false, "every target terminates TLS (wss://) with one self-signed certificate; direct is the Go server speaking TLS itself")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if o.reps < 1 || o.reps > 20 || o.hsN < 1 || o.hsN > 1_000_000 || o.m < 1 || o.idleN < 1 {
		return errors.New("bounded runs only: -reps 1..20, -hs-n 1..1000000, -m >= 1, -idle-n >= 1")
	}
	soft, hard := nofile()
	fmt.Fprintf(stderr, "stickybench compare: nofile soft=%d hard=%d\n", soft, hard)
	if uint64(2*o.idleN+200) > hard {
		return fmt.Errorf("-idle-n %d: a proxy holds 2 fds per connection (%d) plus its listeners and logs, which does not fit the hard nofile limit %d; lower -idle-n", o.idleN, 2*o.idleN, hard)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	o.self = self
	o.raw = io.Discard
	if *rawPath != "" {
		f, err := os.OpenFile(*rawPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		o.raw = f
	}
	dir, err := os.MkdirTemp("", "stickybench-compare-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if o.tls {
		if err := o.writeCert(dir); err != nil {
			return err
		}
	}

	var names []string
	for _, name := range strings.Split(*targets, ",") {
		name = strings.TrimSpace(name)
		switch name {
		case "direct", "stickyd", "stickyd-proxy":
		case "nginx", "haproxy":
			if findBin(map[string]string{"nginx": o.nginx, "haproxy": o.haproxy}[name], name) == "" {
				fmt.Fprintf(stderr, "stickybench compare: %s not installed, skipped (apt-get install -y nginx-light haproxy)\n", name)
				continue
			}
		default:
			return fmt.Errorf("-targets: unknown %q", name)
		}
		names = append(names, name)
	}
	if len(names) == 0 || names[0] != "direct" {
		return errors.New("-targets must start with direct (the baseline)")
	}
	start := func(name string) (*target, error) {
		switch name {
		case "direct":
			return startDirect(ctx, &o)
		case "stickyd":
			return startStickyd(ctx, &o, dir)
		case "stickyd-proxy":
			return startStickydProxy(ctx, &o)
		case "nginx":
			return startNginx(ctx, &o, findBin(o.nginx, "nginx"), dir)
		default:
			return startHAProxy(ctx, &o, findBin(o.haproxy, "haproxy"), dir)
		}
	}
	results := map[string]*targetRuns{}
	for _, n := range names {
		results[n] = &targetRuns{}
	}
	for rep := range o.reps {
		// Interleaved, the order rotated so no target always runs first; every target
		// starts fresh for each repetition (allocator pools kept from an earlier idle
		// run would hide the per-connection cost).
		for i := range names {
			name := names[(i+rep)%len(names)]
			t, err := start(name)
			if err != nil {
				if t != nil {
					t.stop()
				}
				return fmt.Errorf("starting %s: %w", name, err)
			}
			fmt.Fprintf(stderr, "stickybench compare: rep %d/%d %s at %s (pids %v)\n", rep+1, o.reps, t.name, t.url, t.pids)
			err = o.measure(ctx, t, results[name])
			t.stop()
			if err != nil {
				return fmt.Errorf("%s rep %d: %w", name, rep+1, err)
			}
		}
	}
	var ts []*target
	for _, n := range names {
		ts = append(ts, &target{name: n})
	}
	return writeTable(out, &o, ts, results)
}

type targetRuns struct {
	hsRate, echoRate, echoP99, idleKiB, idleProxyKiB, idleFDs []float64
	errors                                                    int64
}

func (o *compareOpts) measure(ctx context.Context, t *target, r *targetRuns) error {
	src := strconv.Itoa(o.sources)
	var hs handshakeResult
	if err := o.child(ctx, &hs, "handshake", "-q", "-url", t.url, "-n", strconv.Itoa(o.hsN), "-c", strconv.Itoa(o.c), "-sources", src); err != nil {
		return err
	}
	r.hsRate = append(r.hsRate, hs.Rate)
	r.errors += hs.Errors
	time.Sleep(500 * time.Millisecond)
	var ec echoResult
	if err := o.child(ctx, &ec, "echo", "-q", "-url", t.url, "-c", strconv.Itoa(o.c), "-m", strconv.Itoa(o.m), "-size", strconv.Itoa(o.size), "-sources", src); err != nil {
		return err
	}
	r.echoRate = append(r.echoRate, ec.Rate)
	r.echoP99 = append(r.echoP99, ec.P99ms)
	r.errors += ec.Errors
	time.Sleep(500 * time.Millisecond)
	var pids []string
	for _, p := range t.pids {
		pids = append(pids, strconv.Itoa(p))
	}
	var id idleResult
	if err := o.child(ctx, &id, "idle", "-q", "-url", t.url, "-n", strconv.Itoa(o.idleN), "-steps", o.idleSteps,
		"-hold", o.hold.String(), "-pid", strings.Join(pids, ","), "-tree", "-sources", src); err != nil {
		return err
	}
	r.idleKiB = append(r.idleKiB, id.KiBPerConn)
	r.idleProxyKiB = append(r.idleProxyKiB, id.KiBByPID[pids[0]])
	r.idleFDs = append(r.idleFDs, id.FDsPerConn)
	r.errors += id.Errors + (id.Held - id.Alive)
	time.Sleep(time.Second) // let the servers reap the closed connections
	return nil
}

// child runs `stickybench MODE ARGS...` as a separate process and decodes its JSON line.
func (o *compareOpts) child(ctx context.Context, v any, args ...string) error {
	cmd := exec.CommandContext(ctx, o.self, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("stickybench %s: %v: %s", args[0], err, strings.TrimSpace(se.String()))
	}
	line := bytes.TrimSpace(so.Bytes())
	fmt.Fprintf(o.raw, "%s\n", line)
	return json.Unmarshal(line, v)
}

func findBin(flagVal, name string) string {
	if flagVal != "" {
		return flagVal
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
		if p := filepath.Join(d, name); isExec(p) {
			return p
		}
	}
	return ""
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func (t *target) stop() {
	for i := len(t.procs) - 1; i >= 0; i-- {
		c := t.procs[i]
		if c.Process == nil {
			continue
		}
		c.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			c.Process.Kill()
			<-done
		}
	}
}

// startServe starts `stickybench serve` and returns its address.
func startServe(ctx context.Context, o *compareOpts, t *target, id string) (string, int, error) {
	args := []string{"serve", "-listen", "127.0.0.1:0", "-id", id}
	if o.tls && t.name == "direct" {
		args = append(args, "-tls-cert", o.certFile, "-tls-key", o.keyFile)
	}
	cmd := exec.Command(o.self, args...)
	cmd.Stderr = os.Stderr
	so, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, err
	}
	if err := cmd.Start(); err != nil {
		return "", 0, err
	}
	t.procs = append(t.procs, cmd)
	line, err := bufio.NewReader(so).ReadBytes('\n')
	if err != nil {
		return "", 0, fmt.Errorf("serve printed no address: %v", err)
	}
	var info struct {
		Listen string `json:"listen"`
		PID    int    `json:"pid"`
	}
	if err := json.Unmarshal(line, &info); err != nil {
		return "", 0, err
	}
	return info.Listen, info.PID, nil
}

func startDirect(ctx context.Context, o *compareOpts) (*target, error) {
	t := &target{name: "direct"}
	addr, pid, err := startServe(ctx, o, t, "direct")
	if err != nil {
		return t, err
	}
	t.url = o.scheme() + addr + "/ws"
	t.pids = []int{pid}
	return t, waitReady(ctx, t.url)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func startProc(t *target, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	t.procs = append(t.procs, cmd)
	t.pids = append([]int{cmd.Process.Pid}, t.pids...) // the proxy/edge first
	return nil
}

func startStickyd(ctx context.Context, o *compareOpts, dir string) (*target, error) {
	t := &target{name: "stickyd"}
	if !isExec(o.stickyd) {
		return nil, fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", o.stickyd, o.stickyd)
	}
	p, err := freePort()
	if err != nil {
		return nil, err
	}
	mp, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	args := []string{"run", "-listen", addr, "-workers", "2", "-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn"}
	if o.tls {
		args = append(args[:1], "-listen", "", "-tls-listen", addr, "-tls-cert", o.certFile, "-tls-key", o.keyFile, "-tls-watch", "0")
		args = append(args, "-workers", "2", "-metrics", net.JoinHostPort("127.0.0.1", strconv.Itoa(mp)), "-log-level", "warn")
	}
	if err := startProc(t, o.stickyd, append(args, "--", o.self, "serve-worker")...); err != nil {
		return t, err
	}
	t.url = o.scheme() + addr + "/ws"
	if err := waitReady(ctx, t.url); err != nil {
		return t, err
	}
	// The workers are listed after the edge, so the idle run reports the edge alone too.
	t.pids = withDescendants(t.pids[:1])
	if len(t.pids) != 3 {
		return t, fmt.Errorf("stickyd: want the edge and 2 workers, have pids %v", t.pids)
	}
	return t, nil
}

// startStickydProxy runs `stickyd proxy` in front of two `stickybench serve` backends, as
// nginx and HAProxy are run: the edge tunnels each WebSocket.
func startStickydProxy(ctx context.Context, o *compareOpts) (*target, error) {
	t := &target{name: "stickyd-proxy"}
	if !isExec(o.stickyd) {
		return nil, fmt.Errorf("no stickyd binary at %s: go build -o %s ./cmd/stickyd", o.stickyd, o.stickyd)
	}
	backends, err := startBackends(ctx, o, t)
	if err != nil {
		return t, err
	}
	p, err := freePort()
	if err != nil {
		return t, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	args := []string{"proxy", "-listen", addr, "-metrics", "", "-log-level", "warn"}
	if o.tls {
		args = []string{"proxy", "-listen", "", "-tls-listen", addr, "-tls-cert", o.certFile, "-tls-key", o.keyFile, "-tls-watch", "0", "-metrics", "", "-log-level", "warn"}
	}
	for _, b := range backends {
		args = append(args, "-backend", b)
	}
	if err := startProc(t, o.stickyd, args...); err != nil {
		return t, err
	}
	t.url = o.scheme() + addr + "/ws"
	return t, waitReady(ctx, t.url)
}

func startBackends(ctx context.Context, o *compareOpts, t *target) ([]string, error) {
	var addrs []string
	for i := range 2 {
		a, pid, err := startServe(ctx, o, t, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, a)
		t.pids = append(t.pids, pid)
	}
	return addrs, nil
}

func startNginx(ctx context.Context, o *compareOpts, bin, dir string) (*target, error) {
	t := &target{name: "nginx"}
	backends, err := startBackends(ctx, o, t)
	if err != nil {
		return t, err
	}
	p, err := freePort()
	if err != nil {
		return t, err
	}
	nd := filepath.Join(dir, "nginx")
	if err := os.MkdirAll(filepath.Join(nd, "logs"), 0o755); err != nil {
		return t, err
	}
	var ups strings.Builder
	for _, b := range backends {
		fmt.Fprintf(&ups, "    server %s;\n", b)
	}
	// WebSocket proxying as in https://nginx.org/en/docs/http/websocket.html
	conf := fmt.Sprintf(`worker_processes 2;
worker_rlimit_nofile %[4]d;
daemon off;
master_process on;
pid %[1]s/nginx.pid;
error_log stderr warn;
events { worker_connections %[4]d; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream ws {
%[2]s  }
  server {
    listen 127.0.0.1:%[3]d%[5]s;
%[6]s    location / {
      proxy_pass http://ws;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Host $host;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
`, nd, ups.String(), p, 2*o.idleN+100, o.nginxSSL(), o.nginxCert())
	cf := filepath.Join(nd, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return t, err
	}
	if err := startProc(t, bin, "-p", nd, "-c", cf, "-e", "stderr"); err != nil {
		return t, err
	}
	t.url = fmt.Sprintf("%s127.0.0.1:%d/ws", o.scheme(), p)
	return t, waitReady(ctx, t.url)
}

func startHAProxy(ctx context.Context, o *compareOpts, bin, dir string) (*target, error) {
	t := &target{name: "haproxy"}
	backends, err := startBackends(ctx, o, t)
	if err != nil {
		return t, err
	}
	p, err := freePort()
	if err != nil {
		return t, err
	}
	var srv strings.Builder
	for i, b := range backends {
		fmt.Fprintf(&srv, "  server b%d %s\n", i, b)
	}
	// HAProxy proxies WebSocket in mode http by itself; timeout tunnel covers the
	// upgraded connection (https://www.haproxy.com/documentation/haproxy-configuration-tutorials/protocol-support/websocket/).
	conf := fmt.Sprintf(`global
  nbthread 2
  maxconn %[3]d
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
  timeout http-request 10s
frontend fe
  bind 127.0.0.1:%[1]d%[4]s
  default_backend be
backend be
  balance roundrobin
%[2]s`, p, srv.String(), o.idleN+200, o.haproxySSL())
	cf := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return t, err
	}
	if err := startProc(t, bin, "-db", "-f", cf); err != nil {
		return t, err
	}
	t.url = fmt.Sprintf("%s127.0.0.1:%d/ws", o.scheme(), p)
	return t, waitReady(ctx, t.url)
}

func (o *compareOpts) scheme() string {
	if o.tls {
		return "wss://"
	}
	return "ws://"
}

func (o *compareOpts) nginxSSL() string {
	if o.tls {
		return " ssl"
	}
	return ""
}

func (o *compareOpts) nginxCert() string {
	if !o.tls {
		return ""
	}
	return fmt.Sprintf("    ssl_certificate %s;\n    ssl_certificate_key %s;\n    ssl_protocols TLSv1.2 TLSv1.3;\n", o.certFile, o.keyFile)
}

func (o *compareOpts) haproxySSL() string {
	if !o.tls {
		return ""
	}
	return " ssl crt " + o.pemFile + " alpn http/1.1"
}

// writeCert makes the self-signed ECDSA P-256 certificate every target serves under -tls.
func (o *compareOpts) writeCert(dir string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	o.certFile, o.keyFile, o.pemFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "tls.pem")
	for path, data := range map[string][]byte{o.certFile: certPEM, o.keyFile: keyPEM, o.pemFile: append(append([]byte{}, certPEM...), keyPEM...)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// waitReady dials the target until a WebSocket handshake and its hello succeed.
func waitReady(ctx context.Context, u string) error {
	d := &websocket.Dialer{HandshakeTimeout: time.Second, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	deadline := time.Now().Add(20 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		c, _, err := dialWS(ctx, d, u, true, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s not ready after 20s: %v", u, last)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratio(a, b float64) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func writeTable(out io.Writer, o *compareOpts, ts []*target, res map[string]*targetRuns) error {
	d := res["direct"]
	dh, de, dp, dk := median(d.hsRate), median(d.echoRate), median(d.echoP99), median(d.idleKiB)
	var b strings.Builder
	fmt.Fprintf(&b, "| target | handshakes/s | echo msgs/s | echo p99 ms | idle KiB/conn (stack) | idle KiB/conn (edge/proxy only) | idle fds/conn (stack) | errors |\n")
	fmt.Fprintf(&b, "|---|---|---|---|---|---|---|---|\n")
	for _, t := range ts {
		r := res[t.name]
		h, e, p, k := median(r.hsRate), median(r.echoRate), median(r.echoP99), median(r.idleKiB)
		proxyOnly := fmt.Sprintf("%.1f", median(r.idleProxyKiB))
		if t.name == "direct" {
			proxyOnly = "–"
		}
		fmt.Fprintf(&b, "| %s | %.0f (%s) | %.0f (%s) | %.2f (%s) | %.1f (%s) | %s | %.2f | %d |\n",
			t.name, h, ratio(h, dh), e, ratio(e, de), p, ratio(p, dp), k, ratio(k, dk), proxyOnly, median(r.idleFDs), r.errors)
	}
	fmt.Fprintf(&b, "\nMedians of %d interleaved repetitions (order rotated each repetition); ratios are to direct.\n", o.reps)
	if o.tls {
		fmt.Fprintf(&b, "TLS: every target terminates TLS (ECDSA P-256, full handshakes, TLS 1.3); direct is the Go server speaking TLS itself.\n")
	}
	fmt.Fprintf(&b, "Per run: handshake -n %d -c %d (dial, upgrade, read the hello, close); echo -c %d -m %d -size %d (one message in flight per connection);\n", o.hsN, o.c, o.c, o.m, o.size)
	fmt.Fprintf(&b, "idle -n %d, RSS and fds sampled at %s held connections, slope between them; -tree over the edge/proxy and its backends. Client sources: %d addresses.\n", o.idleN, o.idleSteps, o.sources)
	fmt.Fprintf(&b, "Raw per-run values (handshakes/s, echo msgs/s, echo p99 ms, idle KiB/conn):\n")
	for _, t := range ts {
		r := res[t.name]
		fmt.Fprintf(&b, "- %s: %v | %v | %v | %v\n", t.name, r.hsRate, r.echoRate, r.echoP99, r.idleKiB)
	}
	_, err := io.WriteString(out, b.String())
	return err
}
