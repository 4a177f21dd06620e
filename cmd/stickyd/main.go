//go:build unix

// Command stickyd is a sticky-session WebSocket load balancer for one host.
//
//	stickyd demo                         edge on :8080 with 4 built-in Go echo workers
//	stickyd run [flags] -- CMD ARGS...   spawn workers (Go, or Node apps unmodified)
//	stickyd health [ADDR]                exit 0 when the edge at ADDR is alive (container health checks)
//
// Every flag has an environment equivalent: -listen is STICKYD_LISTEN, -shutdown-timeout
// is STICKYD_SHUTDOWN_TIMEOUT, and so on. A flag on the command line wins.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

func main() {
	ctx, stop := shutdownContext()
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "stickyd:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

const usage = `stickyd — sticky-session WebSocket load balancer

Usage:
  stickyd demo [flags]                 edge on :8080, 4 built-in Go echo workers, admin on ` + defaultAdmin + `
  stickyd run [flags] -- CMD ARGS...   spawn -workers copies of CMD as workers (Go or Node)
  stickyd serve -control PATH [flags]  sidecar: Go workers started elsewhere connect to PATH
  stickyd proxy -backend ADDR [flags]  sidecar: any server listening on host:port, unix:/path or
                                       dns:NAME:PORT (repeat -backend), same sticky routing

Client commands (talk to a running edge's admin address, its -metrics):
  stickyd health [ADDR]                exit 0 when the edge answers /healthz (container health checks)
  stickyd ready [ADDR]                 exit 0 when the edge takes new clients (/readyz)
  stickyd status [ADDR]                the workers: slot, pid, state, sessions, WebSockets (also: ls)
  stickyd drain [SLOT] [ADDR]          the edge (/readyz fails, e.g. a Kubernetes preStop hook),
                                       or one worker: no new sessions, existing ones stay
  stickyd undrain [SLOT] [ADDR]        undo drain: the edge and every drained worker, or one worker
  stickyd restart [SLOT] [ADDR]        replace one worker, or all one at a time, each drained first
  stickyd upgrade [ADDR]               replace the running edge's binary in place (same as SIGUSR2):
                                       WebSockets, workers, sessions and keep-alive clients stay
  stickyd reload [ADDR]                re-read -config, environment and flags: apply what can change
                                       live, list what waits for an upgrade or a restart
  stickyd version                      version, commit and handover format (also: -v, --version)

ADDR is host:port, :port, host (port ` + defaultAdminPort + `) or a URL (http://host:` + defaultAdminPort + `/anything: the path
is ignored); -admin ADDR is the same, -url the old spelling of it. Default: ` + defaultAdmin + `.
Client flags: -admin ADDR, -timeout D. Each client command checks that a stickyd answered.
In a browser on the host, http://` + defaultAdmin + `/ is a live status page of the edge;
/debug/pprof/ there profiles it (go tool pprof http://` + defaultAdmin + `/debug/pprof/heap).

Run "stickyd run -h" for the edge's flags.`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("%w: no subcommand", errUsage)
	}
	switch args[0] {
	case "demo", "run", "serve", "proxy":
		if edgeHelp(args[0], args[1:], stdout) {
			return nil
		}
		if err := modeSupported(args[0], runtime.GOOS); err != nil {
			return err
		}
		return runEdge(ctx, args[0], args[1:], stderr)
	case "check-settings": // hidden: an upgrading edge's preflight (preflightSettings)
		return checkSettings(args[1:])
	case "demo-worker":
		log, err := newLogger(stderr, "text", "info")
		if err != nil {
			return err
		}
		return runDemoWorker(ctx, args[1:], log)
	case "health", "ready", "status", "ls", "drain", "undrain", "restart", "upgrade", "reload":
		err := runClient(ctx, args[0], args[1:], stdout)
		if errors.Is(err, errHelp) {
			return nil
		}
		return err
	case "version", "-version", "--version", "-v":
		fmt.Fprintln(stdout, buildVersion())
		return nil
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	}
	fmt.Fprintln(stderr, usage)
	return fmt.Errorf("%w: unknown subcommand %q (stickyd help lists them)", errUsage, args[0])
}

// edgeHelp prints the edge's flags to stdout if args ask for help (-h, -help, --help
// where the flag package sees flags). It parses args with the real flag set, so a
// "-h" that is a flag's value or part of the worker command is not taken for help;
// any other parse error is left for runEdge to report.
func edgeHelp(mode string, args []string, stdout io.Writer) bool {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f edgeFlags
	f.register(fs, mode)
	if !errors.Is(fs.Parse(args), flag.ErrHelp) {
		return false
	}
	switch mode {
	case "demo":
		fmt.Fprintln(stdout, "Usage: stickyd demo [flags]")
	case "run":
		fmt.Fprintln(stdout, "Usage: stickyd run [flags] -- CMD ARGS...")
	case "serve":
		fmt.Fprintln(stdout, "Usage: stickyd serve -control PATH [flags]")
	case "proxy":
		fmt.Fprintln(stdout, "Usage: stickyd proxy -backend ADDR [-backend ADDR ...] [flags]")
	}
	fmt.Fprintln(stdout, "\nEvery flag can also be set as STICKYD_<NAME> (e.g. STICKYD_LISTEN) or as a key of the -config\n"+
		"YAML file (listen: \":8080\"). Precedence: flag > STICKYD_* variable > file > default.\n"+
		"`stickyd reload` or SIGHUP re-reads them: log-level and admin-remote apply at once, the\n"+
		"balancer's settings with the next `stickyd upgrade` (nothing is dropped), listen, metrics,\n"+
		"control, workers, node and app-port with a restart. SIGHUP then restarts the workers one\n"+
		"at a time (run, demo).\n\nFlags:")
	fs.SetOutput(stdout)
	fs.PrintDefaults()
	return true
}

// commit is set at build time (-ldflags "-X main.commit=..."), as deploy/Dockerfile does:
// its build context has no .git, so the toolchain records no vcs.revision there.
var commit string

// versionInfo is what `stickyd version` prints and the admin API's Stickyd-Version
// header carries (Version only).
type versionInfo struct {
	Version  string // -ldflags "-X main.version=...", else the module version go build stamped
	Commit   string // vcs.revision; "" when built outside a checkout
	Modified bool   // vcs.modified: built from a tree with uncommitted changes
	Go       string
}

// String keeps "handover=N": an edge upgrading to this binary reads it (handoverFormatOf).
func (v versionInfo) String() string {
	s := "stickyd " + v.Version
	if v.Commit != "" {
		s += " commit=" + v.Commit
		if v.Modified {
			s += " modified=true"
		}
	}
	if v.Go != "" {
		s += " go=" + v.Go
	}
	return s + " handover=" + strconv.Itoa(handoverFormat)
}

// buildVersion reads the version: the one stamped with -ldflags wins; otherwise what
// the Go toolchain recorded (a go build in a git checkout stamps a pseudo-version and
// the commit), so a binary built without -ldflags still says where it came from.
func buildVersion() versionInfo {
	v := versionInfo{Version: version}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	v.Go = bi.GoVersion
	if v.Version == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	if commit != "" {
		v.Commit, v.Modified = commit, false
	}
	return v
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	log, _, err := newLevelLogger(w, format, level)
	return log, err
}

// newLevelLogger is newLogger with its level variable, which a reload changes.
func newLevelLogger(w io.Writer, format, level string) (*slog.Logger, *slog.LevelVar, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", level)
	}
	v := new(slog.LevelVar)
	v.Set(lv)
	opts := &slog.HandlerOptions{Level: v}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), v, nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), v, nil
	}
	return nil, nil, fmt.Errorf("-log-format %q: want text or json", format)
}

// defaultAdmin is where client commands find the edge's admin API without an address:
// the default -metrics port, on loopback (the admin API answers loopback clients only).
//
// 8071, not Prometheus's 9090: 9090-9094 are Prometheus, the Pushgateway and the
// Alertmanager, and 9100-9999 is the exporters' range of Prometheus's port allocation
// list, allocated in full (e.g. 9464 is OpenTelemetry's exporter). 8071 is in none of
// them, not in /etc/services, no default of a peer likely on the same host (HAProxy
// stats 8404, Caddy admin 2019, Traefik 8080, Envoy admin 9901, pprof 6060, Node's
// inspector 9229), below the ephemeral range (a port the kernel hands out as a source
// port can block a later bind), and next to the client port 8080.
const (
	defaultAdmin     = "127.0.0.1:" + defaultAdminPort
	defaultAdminPort = "8071"
)

// errHelp: a client command printed its help on request; not a failure.
var errHelp = errors.New("help requested")

// clientCmd describes a client command's grammar: stickyd NAME [SLOT] [ADDR] [flags].
type clientCmd struct {
	args    string // after the name, for the usage line
	summary string
	slot    bool          // takes an optional worker SLOT
	timeout time.Duration // default -timeout
}

var clientCmds = map[string]clientCmd{
	"health":  {"[ADDR]", "exit 0 when the edge at ADDR answers GET /healthz with 200", false, 3 * time.Second},
	"ready":   {"[ADDR]", "exit 0 when the edge at ADDR takes new clients (GET /readyz answers 200)", false, 3 * time.Second},
	"status":  {"[ADDR]", "print the edge's workers (GET /admin/workers)", false, 5 * time.Second},
	"drain":   {"[SLOT] [ADDR]", "drain the edge (/readyz fails; sessions keep being served), or only worker SLOT (no new sessions)", true, 60 * time.Second},
	"undrain": {"[SLOT] [ADDR]", "undo drain: the edge and every drained worker, or only worker SLOT", true, 60 * time.Second},
	"restart": {"[SLOT] [ADDR]", "replace worker SLOT, or every worker one at a time, each drained first; the edge finishes a restart even if this command is interrupted", true, 15 * time.Minute},
	"upgrade": {"[ADDR]", "replace the edge's binary in place (as SIGUSR2) and wait for the new image", false, 2 * time.Minute},
	"reload":  {"[ADDR]", "re-read the edge's settings (-config file, environment, flags): apply what can change live and say what waits for an upgrade or a restart", false, 30 * time.Second},
}

// adminClient is a client command's connection to one edge's admin API.
type adminClient struct {
	name    string
	base    string // scheme://host:port
	slot    int    // -1: none given
	timeout time.Duration
	stdout  io.Writer
	hc      *http.Client
}

func runClient(ctx context.Context, name string, args []string, stdout io.Writer) error {
	if name == "ls" {
		name = "status"
	}
	c, path, err := parseClient(name, args, stdout)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	switch name {
	case "health":
		if path == "/readyz" {
			return fmt.Errorf("%w: health checks /healthz (alive), the address names /readyz: use `stickyd ready %s` for readiness", errUsage, c.base)
		}
		if _, err := c.get(ctx, "/healthz"); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "healthy: %s\n", c.base)
		return nil
	case "ready":
		if _, err := c.get(ctx, "/readyz"); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "ready: %s\n", c.base)
		return nil
	case "status":
		return c.status(ctx)
	case "upgrade":
		return runUpgrade(ctx, c)
	}
	p := "/admin/" + name
	if c.slot >= 0 {
		p += "/" + strconv.Itoa(c.slot)
	}
	body, err := c.post(ctx, p)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && name == "restart" {
			return fmt.Errorf("%w (the edge carries on with the restart: follow it with `stickyd status %s`, or give a longer -timeout)", err, c.base)
		}
		return err
	}
	fmt.Fprint(stdout, body)
	return nil
}

// parseClient reads stickyd NAME [SLOT] [ADDR] [-admin ADDR] [-timeout D]: flags and
// positional arguments in any order. It also returns the path ADDR named, if any.
func parseClient(name string, args []string, stdout io.Writer) (*adminClient, string, error) {
	cmd := clientCmds[name]
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned; help goes to stdout
	var addrFlag string
	fs.StringVar(&addrFlag, "admin", "", "the edge's admin address (its -metrics): host:port, :port, host or http://host:port; default "+defaultAdmin)
	fs.StringVar(&addrFlag, "url", "", "the old name of -admin (a path, e.g. /healthz, is ignored)")
	timeout := fs.Duration("timeout", cmd.timeout, "how long to wait for the answer")
	fs.Usage = func() {} // the flag package calls it on every parse error; help is below
	help := func() {
		fmt.Fprintf(stdout, "Usage: stickyd %s %s [flags]\n\n%s%s.\n\n", name, cmd.args, strings.ToUpper(cmd.summary[:1]), cmd.summary[1:])
		fmt.Fprintf(stdout, "ADDR is the edge's admin address (its -metrics), also given as -admin ADDR; default %s.\n\nFlags:\n", defaultAdmin)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
	}
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				help()
				return nil, "", errHelp
			}
			return nil, "", fmt.Errorf("%w: %s: %v (stickyd %s -h lists the flags)", errUsage, name, err, name)
		}
		if args = fs.Args(); len(args) == 0 {
			break
		}
		pos, args = append(pos, args[0]), args[1:]
	}
	slot, addr := -1, ""
	for _, p := range pos {
		// A number is a SLOT (no admin address is one); anything else the ADDR.
		n, err := strconv.Atoi(p)
		switch {
		case err == nil && cmd.slot && slot < 0 && n >= 0:
			slot = n
		case err != nil && addr == "":
			addr = p
		default:
			return nil, "", fmt.Errorf("%w: %s: unexpected argument %q: stickyd %s %s", errUsage, name, p, name, cmd.args)
		}
	}
	if addrFlag != "" && addr != "" && addrFlag != addr {
		return nil, "", fmt.Errorf("%w: %s: the admin address is given twice (%q and %q): give it once", errUsage, name, addr, addrFlag)
	}
	if addr == "" {
		addr = addrFlag
	}
	base, path, err := adminBase(addr)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %s: %v", errUsage, name, err)
	}
	if *timeout <= 0 {
		return nil, "", fmt.Errorf("%w: %s: -timeout %v: want a positive duration, e.g. 10s", errUsage, name, *timeout)
	}
	return &adminClient{
		name: name, base: base, slot: slot, timeout: *timeout, stdout: stdout,
		// A redirect would take the command to some other server: report the answer as is.
		hc: &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
	}, path, nil
}

// adminBase turns an admin address as users write it into a base URL (scheme://host:port)
// and the path it named, which the caller ignores.
func adminBase(addr string) (base, path string, err error) {
	addr = strings.TrimSpace(addr)
	if addr == "" {
		addr = defaultAdmin
	}
	_, defPort, _ := net.SplitHostPort(defaultAdmin)
	raw := addr
	if !strings.Contains(addr, "://") {
		// host:port, :port, host or [v6]:port, maybe with a path: url.Parse would take
		// "localhost:8071" for a scheme, so give it one.
		host, rest, _ := strings.Cut(addr, "/")
		if _, _, err := net.SplitHostPort(host); err != nil {
			if strings.Count(host, ":") > 1 && !strings.HasPrefix(host, "[") {
				host = "[" + host + "]" // a bare IPv6 address
			}
			host = net.JoinHostPort(strings.Trim(host, "[]"), defPort)
		}
		addr = "http://" + host + "/" + rest
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", "", fmt.Errorf("admin address %q: %v: want host:port or http://host:port", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", "", fmt.Errorf("admin address %q: scheme %q: want http (or https behind a proxy)", raw, u.Scheme)
	}
	host := u.Host
	if u.Hostname() == "" {
		if u.Port() == "" {
			return "", "", fmt.Errorf("admin address %q names no host: want host:port, e.g. %s", raw, defaultAdmin)
		}
		host = net.JoinHostPort("127.0.0.1", u.Port()) // ":8071", as -metrics is written
	}
	return u.Scheme + "://" + host, u.Path, nil
}

func (c *adminClient) get(ctx context.Context, path string) (string, error) {
	return c.do(ctx, http.MethodGet, path)
}

func (c *adminClient) post(ctx context.Context, path string) (string, error) {
	return c.do(ctx, http.MethodPost, path)
}

// do sends one request and returns the body of a 2xx answer from a stickyd. Anything
// else is an error that says what answered and what to do.
func (c *adminClient) do(ctx context.Context, method, path string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return "", fmt.Errorf("%s: %w", c.name, err)
	}
	if method != http.MethodGet {
		req.Header.Set(adminHeader, "1")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return "", fmt.Errorf("%s: no answer from %s within -timeout %v: %w", c.name, c.base, c.timeout, context.DeadlineExceeded)
		}
		return "", fmt.Errorf("%s: cannot reach %s (%v): is the edge running, and is this its -metrics address?", c.name, c.base, errors.Unwrap(err))
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if resp.Header.Get(versionHeader) == "" {
		return "", fmt.Errorf("%s: %s answered (%s) but is not a stickyd admin endpoint (no %s header): is -metrics of the edge on another port?",
			c.name, c.base, resp.Status, versionHeader)
	}
	if resp.StatusCode/100 != 2 {
		return "", fmt.Errorf("%s: %s %s answered %s: %s", c.name, method, c.base+path, resp.Status, firstLine(body))
	}
	return string(body), nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// edgeStatus is GET /admin/workers.
type edgeStatus struct {
	Stickyd    bool
	Version    string
	PID        int
	Generation int
	Ready      bool
	Sessions   int
	Workers    []struct {
		Slot, PID, Sessions int
		Pool, State         string
		WebSockets          int64
		InFlight            int `json:"in_flight"`
	}
	Pools []adminPool
}

func (c *adminClient) edgeStatus(ctx context.Context) (edgeStatus, error) {
	var st edgeStatus
	body, err := c.get(ctx, "/admin/workers")
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil || !st.Stickyd {
		return st, fmt.Errorf("%s: %s/admin/workers is not stickyd's worker list (%v): is this binary much newer or older than the edge?", c.name, c.base, err)
	}
	return st, nil
}

func (c *adminClient) status(ctx context.Context) error {
	st, err := c.edgeStatus(ctx)
	if err != nil {
		return err
	}
	ready := "ready"
	if !st.Ready {
		ready = "NOT READY (draining, shutting down, or no worker takes new sessions)"
	}
	fmt.Fprintf(c.stdout, "stickyd %s at %s: pid %d, generation %d, %d sessions, %s\n", st.Version, c.base, st.PID, st.Generation, st.Sessions, ready)
	tw := tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
	if len(st.Pools) < 2 {
		// One pool: no pool column.
		fmt.Fprintln(tw, "SLOT\tPID\tSTATE\tSESSIONS\tWEBSOCKETS")
		for _, w := range st.Workers {
			fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\n", w.Slot, w.PID, w.State, w.Sessions, w.WebSockets)
		}
		return tw.Flush()
	}
	fmt.Fprintln(tw, "POOL\tSLOT\tPID\tSTATE\tSESSIONS\tWEBSOCKETS\tIN FLIGHT")
	for _, w := range st.Workers {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%d\t%d\t%d\n", w.Pool, w.Slot, w.PID, w.State, w.Sessions, w.WebSockets, w.InFlight)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(c.stdout)
	tw = tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POOL\tWORKERS\tMIN\tMAX\tCONCURRENCY\tIN FLIGHT\tWAITING")
	for _, p := range st.Pools {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\n", p.Name, p.Workers, p.Min, p.Max, p.Concurrency, p.InFlight, p.Waiting)
	}
	return tw.Flush()
}
