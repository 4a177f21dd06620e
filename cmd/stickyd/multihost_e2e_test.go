//go:build unix

package main

// The multi-host end-to-end test (issue 19): three stickyd hosts, each a network namespace
// running `stickyd run` with two Node socket.io workers whose broadcasts cross hosts through
// one redis-server, fronted by two HAProxy instances running deploy/multihost/haproxy.cfg as
// it is. Every address is in 198.18.0.0/24 (the benchmarking range, RFC 2544) on a bridge
// in a namespace of its own: the root namespace gets no interface, address or route, and
// no packet leaves the namespaces the test creates. Needs root, ip(8), haproxy,
// redis-server, node and Chromium (skipped without them, failed under CI=true).

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The addresses of deploy/multihost/haproxy.cfg.
const (
	mhLB1    = "198.18.0.2"
	mhLB2    = "198.18.0.3"
	mhRedis  = "198.18.0.5"
	mhClient = "198.18.0.9"
)

var mhHosts = []struct{ name, addr string }{{"h1", "198.18.0.11"}, {"h2", "198.18.0.12"}, {"h3", "198.18.0.13"}}

// netlab is a set of network namespaces joined by a bridge in a namespace of its own.
type netlab struct {
	t      *testing.T
	prefix string
	bridge string // the bridge's namespace
	gone   map[string]bool
}

func (n *netlab) ip(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (n *netlab) must(args ...string) {
	n.t.Helper()
	if err := n.ip(args...); err != nil {
		n.t.Fatal(err)
	}
}

// newNetlab creates the bridge namespace; every namespace it creates is removed at the end
// of the test, after the processes in it were stopped.
func newNetlab(t *testing.T) *netlab {
	n := &netlab{t: t, prefix: fmt.Sprintf("sdmh%d-", os.Getpid()%100000), gone: map[string]bool{}}
	n.bridge = n.prefix + "br"
	if err := n.ip("netns", "add", n.bridge); err != nil {
		skipOrFail(t, "cannot create network namespaces here: %v", err)
	}
	t.Cleanup(func() { n.remove(n.bridge) })
	n.must("-n", n.bridge, "link", "set", "lo", "up")
	n.must("-n", n.bridge, "link", "add", "br0", "type", "bridge")
	n.must("-n", n.bridge, "link", "set", "br0", "up")
	return n
}

// node creates namespace prefix+name with eth0 at addr/24 on the bridge.
func (n *netlab) node(name, addr string) string {
	n.t.Helper()
	ns := n.prefix + name
	n.must("netns", "add", ns)
	n.t.Cleanup(func() { n.remove(ns) })
	n.must("-n", ns, "link", "set", "lo", "up")
	n.must("-n", n.bridge, "link", "add", "v"+name, "type", "veth", "peer", "name", "eth0", "netns", ns)
	n.must("-n", n.bridge, "link", "set", "v"+name, "master", "br0", "up")
	n.must("-n", ns, "addr", "add", addr+"/24", "dev", "eth0")
	n.must("-n", ns, "link", "set", "eth0", "up")
	return ns
}

// remove kills what is left in a namespace (only processes this test started live there)
// and deletes it.
func (n *netlab) remove(ns string) {
	if n.gone[ns] {
		return
	}
	n.gone[ns] = true
	if out, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if err := n.ip("netns", "del", ns); err != nil {
		n.t.Errorf("removing namespace: %v", err)
	}
}

// mhProc is a process started in a namespace, in a process group of its own.
type mhProc struct {
	name   string
	cmd    *exec.Cmd
	logs   *syncBuffer
	exited chan struct{}
}

// With stdin and stdout (pipe ends), the process gets them instead of nothing and the log.
func (n *netlab) start(ns, name, dir string, env []string, stdin, stdout *os.File, args ...string) *mhProc {
	n.t.Helper()
	p := &mhProc{name: name, logs: &syncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p.cmd.Stderr = p.logs
	p.cmd.Stdout = p.logs
	if stdout != nil {
		p.cmd.Stdout = stdout
	}
	if stdin != nil {
		p.cmd.Stdin = stdin
	}
	err := p.cmd.Start()
	for _, f := range []*os.File{stdin, stdout} {
		if f != nil {
			f.Close() // the child's ends
		}
	}
	if err != nil {
		n.t.Fatalf("%s: %v", name, err)
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	n.t.Cleanup(func() {
		p.stop(syscall.SIGTERM, 20*time.Second)
		if n.t.Failed() {
			n.t.Logf("%s output (last 4 KiB):\n%s", name, tail(p.logs.String(), 4096))
		}
	})
	return p
}

// stop signals the process group and waits for the process, killing the group after grace.
func (p *mhProc) stop(sig syscall.Signal, grace time.Duration) {
	select {
	case <-p.exited:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.exited:
	case <-time.After(grace):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// waitLog waits until the process logged a line matching re.
func (p *mhProc) waitLog(t *testing.T, re *regexp.Regexp, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !re.MatchString(p.logs.String()) {
		select {
		case <-p.exited:
			t.Fatalf("%s exited before logging %q:\n%s", p.name, re, tail(p.logs.String(), 4096))
		case <-deadline:
			t.Fatalf("%s did not log %q within %v:\n%s", p.name, re, timeout, tail(p.logs.String(), 4096))
		case <-tick.C:
		}
	}
}

// haproxyCmd sends a runtime API command over an instance's stats socket.
func haproxyCmd(sock, cmd string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// waitServersUp waits until the instance sees every live host UP in every backend.
func waitServersUp(t *testing.T, sock string, want []string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		out, err := haproxyCmd(sock, "show stat")
		last = fmt.Sprint(out, err)
		up := 0
		for _, line := range strings.Split(out, "\n") {
			f := strings.Split(line, ",")
			if len(f) > 17 && strings.HasPrefix(f[0], "stickyd_") || len(f) > 17 && f[0] == "haproxy_cookie" {
				for _, h := range want {
					if f[1] == h && f[17] == "UP" {
						up++
					}
				}
			}
		}
		if up == 3*len(want) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("HAProxy %s: servers %v not all UP within %v:\n%s", sock, want, timeout, last)
}

// mhDriver talks to multihost-clients.js: one command line in, one JSON line out.
type mhDriver struct {
	t     *testing.T
	in    io.WriteCloser
	lines chan string
	proc  *mhProc
}

func (d *mhDriver) read(what string, timeout time.Duration) map[string]any {
	d.t.Helper()
	select {
	case line, ok := <-d.lines:
		if !ok {
			d.t.Fatalf("multihost-clients.js ended before answering %s:\n%s", what, tail(d.proc.logs.String(), 4096))
		}
		var v map[string]any
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			d.t.Fatalf("multihost-clients.js %s: %q: %v", what, line, err)
		}
		d.t.Logf("clients %s: %s", what, tail(line, 1500))
		return v
	case <-time.After(timeout):
		d.t.Fatalf("multihost-clients.js did not answer %s within %v:\n%s", what, timeout, tail(d.proc.logs.String(), 4096))
	}
	return nil
}

func (d *mhDriver) do(cmd string, timeout time.Duration) map[string]any {
	d.t.Helper()
	if _, err := io.WriteString(d.in, cmd+"\n"); err != nil {
		d.t.Fatalf("multihost-clients.js: %v", err)
	}
	return d.read(cmd, timeout)
}

func num(v map[string]any, k string) int {
	f, _ := v[k].(float64)
	return int(f)
}

func mhNeed(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, "%s not found: apt-get install -y haproxy redis-server (iproute2 for ip)", tool)
		}
	}
}

// TestMultiHostBehindHAProxy: 3 stickyd hosts × 2 Node workers behind HAProxy
// (deploy/multihost/haproxy.cfg, two instances sharing their stick table through peers):
//   - 300 socket.io-client sessions (polling, then WebSocket; no cookies) and 300
//     polling-only sessions over shared keep-alive agents all connect, and every request of
//     each session reaches the worker that said hello (its acks name that worker; no worker
//     refuses a request as "Session ID unknown");
//   - the second HAProxy routes sessions the first learnt (peers);
//   - io.emit from one worker of one host reaches all 600 (Redis adapter);
//   - Chromium through the cookie frontends (stickyd's -affinity-cookie, HAProxy's own
//     insert-indirect cookie) stays on one host across page reloads;
//   - with one host's namespace torn down, exactly its sessions reconnect, to the two
//     survivors, and no other session sees a disconnect; a broadcast still reaches all.
func TestMultiHostBehindHAProxy(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "multi-host e2e needs root (network namespaces); run as root, as CI does")
	}
	mhNeed(t, "ip", "haproxy", "redis-server")
	chromium := chromiumPath(t)
	fixtures := nodeFixtures(t)
	bin := stickydBinary(t)
	recipe, err := filepath.Abs(filepath.Join("..", "..", "deploy", "multihost", "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	const plain, keepalive = 300, 300
	const total = plain + keepalive

	lab := newNetlab(t)
	nsRedis := lab.node("redis", mhRedis)
	nsLB := []string{lab.node("lb1", mhLB1), lab.node("lb2", mhLB2)}
	nsCli := lab.node("cli", mhClient)
	nsHost := map[string]string{}
	for _, h := range mhHosts {
		nsHost[h.name] = lab.node(h.name, h.addr)
	}
	tmp := t.TempDir()

	redis := lab.start(nsRedis, "redis-server", tmp, nil, nil, nil, "redis-server", "--bind", mhRedis, "--port", "6379",
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no")
	redis.waitLog(t, regexp.MustCompile(`Ready to accept connections`), 20*time.Second)

	hosts := map[string]*mhProc{}
	for _, h := range mhHosts {
		env := []string{"REDIS_URL=redis://" + mhRedis + ":6379", "HOST_ID=" + h.name, "PING_INTERVAL_MS=4000", "PING_TIMEOUT_MS=8000"}
		hosts[h.name] = lab.start(nsHost[h.name], "stickyd "+h.name, fixtures, env, nil, nil, bin, "run",
			"-listen", h.addr+":8080", "-metrics", h.addr+":8071", "-workers", "2", "-node-id", h.name,
			"-affinity-cookie", "stickyd_node", "-sid-header", "X-Stickyd-Sid", "--", "node", "multihost-app.js")
	}
	for _, h := range mhHosts {
		hosts[h.name].waitLog(t, regexp.MustCompile(`msg="edge listening"`), 60*time.Second)
	}

	var socks []string
	for i, ns := range nsLB {
		name := fmt.Sprintf("lb%d", i+1)
		sock := filepath.Join(tmp, name+".sock")
		extra := filepath.Join(tmp, name+".cfg")
		// The runtime API socket is the test's, not the recipe's.
		if err := os.WriteFile(extra, []byte("global\n    stats socket "+sock+" mode 600 level admin\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		lab.start(ns, "haproxy "+name, tmp, nil, nil, nil, "haproxy", "-db", "-f", recipe, "-f", extra, "-L", name)
		socks = append(socks, sock)
	}
	for _, s := range socks {
		waitServersUp(t, s, []string{"h1", "h2", "h3"}, 30*time.Second)
	}

	// The clients.
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inW.Close(); outR.Close() })
	cli := lab.start(nsCli, "multihost-clients.js", fixtures, nil, inR, outW, "node", "multihost-clients.js",
		"--url", "http://"+mhLB1+":80", "--clients", strconv.Itoa(plain), "--keepalive-clients", strconv.Itoa(keepalive),
		"--agents", "6", "--agent-max-sockets", "64", "--messages", "3", "--timeout-ms", "150000")
	d := &mhDriver{t: t, in: inW, lines: make(chan string, 16), proc: cli}
	go func() {
		sc := bufio.NewScanner(outR)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			d.lines <- sc.Text()
		}
		close(d.lines)
	}()

	// 600 sessions, every request of each on the worker that said hello.
	res := d.read("connect", 4*time.Minute)
	if res["allConnected"] != true || num(res, "connected") != total || num(res, "mismatches") != 0 || num(res, "disconnects") != 0 || len(res["errors"].(map[string]any)) != 0 {
		t.Fatalf("sessions: connected %d of %d, %d whoami answers from another worker than hello, %d disconnects, errors %v",
			num(res, "connected"), total, num(res, "mismatches"), num(res, "disconnects"), res["errors"])
	}
	perHost := res["perHost"].(map[string]any)
	for _, h := range mhHosts {
		if n, _ := perHost[h.name].(float64); n == 0 {
			t.Errorf("no session on host %s: %v (the balancer does not spread them)", h.name, perHost)
		}
	}
	if num(res, "upgraded") != plain {
		t.Errorf("%d of the %d plain sessions upgraded to WebSocket through HAProxy", num(res, "upgraded"), plain)
	}
	if num(res, "maxSessionsPerConnection") < 2 {
		t.Errorf("no keep-alive connection carried two sessions (max %d): the shared-agent case was not exercised", num(res, "maxSessionsPerConnection"))
	}
	checkNoMisroutes(t, hosts)
	checkNoUnknownSessions(t, d, mhHosts)

	// The second HAProxy knows every session the first learnt (peers): a pong naming the
	// sid reaches the session's worker ("ok"), not another ("Session ID unknown").
	if out, err := haproxyCmd(socks[1], "show table stickyd_sid"); err != nil || !tableHasAtLeast(out, total) {
		t.Errorf("lb2's stick table after the sessions connected through lb1: %v\n%s", err, firstLine([]byte(out)))
	}
	pc := d.do("peercheck http://"+mhLB2+":80 100", time.Minute)
	if num(pc, "checked") != 100 || num(pc, "ok") != 100 {
		t.Errorf("through lb2: %d of %d sessions learnt by lb1 answered ok: %v", num(pc, "ok"), num(pc, "checked"), pc["answers"])
	}

	// A broadcast from one worker of one host reaches every session on every host.
	em := d.do("emit http://"+mhHosts[0].addr+":8080 first", time.Minute)
	if num(em, "received") != total || num(em, "missing") != 0 {
		t.Errorf("io.emit from %v reached %d of %d sessions", em["from"], num(em, "received"), total)
	}

	// Chromium through the two cookie frontends: every reload (a new engine.io session,
	// polling only) lands on the host of the first visit, and a cookie naming another
	// host sends the next load there.
	checkBrowserStaysOnHost(t, lab, nsCli, fixtures, chromium)

	// One host dies: its network goes first (no FIN reaches anyone), then its processes
	// and namespace.
	d.do("mark", 10*time.Second)
	dead := mhHosts[2]
	lab.must("-n", lab.bridge, "link", "del", "v"+dead.name)
	hosts[dead.name].stop(syscall.SIGKILL, 10*time.Second)
	lab.remove(nsHost[dead.name])
	rc := d.do("reconnected "+dead.name+" 90000", 2*time.Minute)
	if num(rc, "victims") == 0 || num(rc, "moved") != num(rc, "victims") || num(rc, "stillDown") != 0 {
		t.Errorf("host %s gone: %d of its %d sessions reconnected to the survivors (%v)", dead.name, num(rc, "moved"), num(rc, "victims"), rc["movedTo"])
	}
	if num(rc, "othersDisconnected") != 0 {
		t.Errorf("%d of the %d sessions on the surviving hosts saw a disconnect (reasons %v)", num(rc, "othersDisconnected"), num(rc, "others"), rc["othersReasons"])
	}
	if st, _ := rc["status"].(map[string]any); st == nil || num(st, "mismatches") != 0 || num(st, "connected") != total {
		t.Errorf("after the move: %v", rc["status"])
	}
	em = d.do("emit http://"+mhHosts[1].addr+":8080 second", time.Minute)
	if num(em, "received") != total {
		t.Errorf("after the move, io.emit from %v reached %d of %d sessions", em["from"], num(em, "received"), total)
	}
	delete(hosts, dead.name)
	checkNoMisroutes(t, hosts) // the survivors' edges did answer "Session ID unknown": to the dead host's sessions
	d.do("quit", 10*time.Second)
}

// checkNoMisroutes fails if any worker refused a request (a request of a session it does not
// hold reached it). A request that reaches another host is answered by that host's edge
// (it does not know the sid): checkNoUnknownSessions, and the client's disconnect.
func checkNoMisroutes(t *testing.T, hosts map[string]*mhProc) {
	t.Helper()
	for name, p := range hosts {
		if n := strings.Count(p.logs.String(), "multihost-app: connection_error"); n > 0 {
			i := strings.Index(p.logs.String(), "multihost-app: connection_error")
			t.Errorf("host %s: engine.io refused %d requests, e.g. %s", name, n, firstLine([]byte(p.logs.String()[i:])))
		}
	}
}

var unknownRE = regexp.MustCompile(`(?m)^stickyd_unknown_sessions_total (\S+)$`)

// checkNoUnknownSessions fails if any host's edge answered "Session ID unknown": a request
// of a session reached a host that does not hold it. (Read from the clients' namespace.)
func checkNoUnknownSessions(t *testing.T, d *mhDriver, hosts []struct{ name, addr string }) {
	t.Helper()
	for _, h := range hosts {
		r := d.do("get http://"+h.addr+":8071/metrics", 30*time.Second)
		body, _ := r["body"].(string)
		m := unknownRE.FindStringSubmatch(body)
		if num(r, "status") != 200 || m == nil {
			t.Errorf("host %s /metrics: %v, no stickyd_unknown_sessions_total", h.name, r["status"])
			continue
		}
		if m[1] != "0" {
			t.Errorf("host %s: stickyd_unknown_sessions_total %s, want 0 (requests reached a host that does not hold their session)", h.name, m[1])
		}
	}
}

var tableUsedRE = regexp.MustCompile(`used:(\d+)`)

func tableHasAtLeast(out string, n int) bool {
	m := tableUsedRE.FindStringSubmatch(out)
	if m == nil {
		return false
	}
	used, _ := strconv.Atoi(m[1])
	return used >= n
}

// pageResult is the JSON line of multihost-page.js.
type pageResult struct {
	Pages []struct {
		URL          string            `json:"url"`
		Hosts        []string          `json:"hosts"`
		Cookies      map[string]string `json:"cookies"`
		Steered      map[string]string `json:"steered"`
		Polls        int               `json:"polls"`
		PollStatuses map[string]int    `json:"pollStatuses"`
	} `json:"pages"`
	Errors []string `json:"errors"`
}

func checkBrowserStaysOnHost(t *testing.T, lab *netlab, ns, fixtures, chromium string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "node", "multihost-page.js",
		"--url", "http://"+mhLB1+":81/", "--cookie", "stickyd_node", "--url", "http://"+mhLB1+":82/", "--cookie", "SRV",
		"--hosts", "h1,h2,h3", "--reloads", "4", "--chromium", chromium, "--timeout-ms", "90000")
	cmd.Dir = fixtures
	cmd.WaitDelay = 5 * time.Second
	var stderr syncBuffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var res pageResult
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		t.Fatalf("multihost-page.js printed no result (%v): %q\n%s", err, out, stderr.String())
	}
	t.Logf("chromium: %s", strings.TrimSpace(string(out)))
	if err != nil || len(res.Errors) > 0 || len(res.Pages) != 2 {
		t.Fatalf("multihost-page.js: %v %v\n%s", err, res.Errors, stderr.String())
	}
	for i, cookie := range []string{"stickyd_node", "SRV"} {
		p := res.Pages[i]
		if len(p.Hosts) != 5 {
			t.Errorf("%s: hosts %v, want 5 loads", p.URL, p.Hosts)
			continue
		}
		for _, h := range p.Hosts {
			if h != p.Hosts[0] {
				t.Errorf("%s: reloads went to hosts %v, want one host", p.URL, p.Hosts)
				break
			}
		}
		// The cookie decides: set to another host's name, the next load goes there.
		if len(p.Steered) != 2 {
			t.Errorf("%s: steered by the cookie %v, want the 2 other hosts", p.URL, p.Steered)
		}
		for want, got := range p.Steered {
			if got != want {
				t.Errorf("%s: with %s=%s the page was served by %s", p.URL, cookie, want, got)
			}
		}
		if p.Cookies[cookie] != p.Hosts[0] {
			t.Errorf("%s: cookie %s=%q, want the host %q (cookies %v)", p.URL, cookie, p.Cookies[cookie], p.Hosts[0], p.Cookies)
		}
		for code := range p.PollStatuses {
			if code != "200" {
				t.Errorf("%s: engine.io answers %v, want only 200", p.URL, p.PollStatuses)
				break
			}
		}
	}
}
