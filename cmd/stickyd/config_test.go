//go:build unix

package main

import (
	"flag"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// parseEdge parses args for mode as runEdge does (flags, then STICKYD_*, then the file).
func parseEdge(t *testing.T, mode string, args ...string) (*edgeFlags, error) {
	t.Helper()
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	fs.SetOutput(discard{})
	var f edgeFlags
	f.register(fs, mode)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return &f, applySources(fs)
}

// TestConfigPrecedence: a flag beats its STICKYD_* variable, which beats the file, which
// beats the default; lists join with commas.
func TestConfigPrecedence(t *testing.T) {
	cfg := writeFile(t, "stickyd.yaml", `# every key is a flag name
workers: 3
max-conns: 500
max-conns-per-ip: 20
key: [sid, "cookie:io"]
trusted-proxies:
  - 10.0.0.0/8
  - ::1/128
session-ttl: 90s
admin-remote: true
log-level: debug
`)
	f, err := parseEdge(t, "run", "-config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if f.workers != 3 || f.maxConns != 500 || f.maxPerIP != 20 || f.key != "sid,cookie:io" || f.trusted != "10.0.0.0/8,::1/128" ||
		f.sessionTTL != 90*time.Second || !f.adminRemote || f.logLevel != "debug" || f.idleTime != 60*time.Second {
		t.Errorf("from the file: %+v", *f)
	}
	t.Setenv("STICKYD_WORKERS", "5")
	t.Setenv("STICKYD_MAX_CONNS", "600")
	f, err = parseEdge(t, "run", "-config", cfg, "-workers", "7")
	if err != nil {
		t.Fatal(err)
	}
	if f.workers != 7 || f.maxConns != 600 || f.maxPerIP != 20 {
		t.Errorf("flag > env > file: workers %d (want 7: flag), max-conns %d (want 600: env), max-conns-per-ip %d (want 20: file)", f.workers, f.maxConns, f.maxPerIP)
	}
	t.Setenv("STICKYD_CONFIG", cfg) // the file itself can come from the environment
	f, err = parseEdge(t, "run")
	if err != nil || f.maxPerIP != 20 {
		t.Errorf("STICKYD_CONFIG: %v, max-conns-per-ip %d", err, f.maxPerIP)
	}
}

// TestConfigFileProxyAndPools: proxy-only settings and pools (a list of pools, each
// with commas of its own) come from a file too.
func TestConfigFileProxyAndPools(t *testing.T) {
	cfg := writeFile(t, "proxy.yaml", `backend: [127.0.0.1:3001, "unix:/run/app.sock"]
health-path: /healthz
pool:
  - "reports:path=/reports/,backend=127.0.0.1:3002,concurrency=1"
  - "live:header=X-Pool:live,backend=127.0.0.1:3003"
`)
	f, err := parseEdge(t, "proxy", "-config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if f.proxy.backends.String() != "127.0.0.1:3001,unix:/run/app.sock" || f.proxy.healthPath != "/healthz" {
		t.Errorf("proxy settings from the file: %+v", f.proxy)
	}
	if len(f.pools) != 2 || f.pools[0].name != "reports" || f.pools[0].concurrency != 1 || f.pools[1].headerVal != "live" ||
		f.pools[1].backends.String() != "127.0.0.1:3003" {
		t.Errorf("pools from the file: %+v", f.pools)
	}
	if _, err := parseEdge(t, "run", "-config", cfg); err == nil || !strings.Contains(err.Error(), `"backend" is not a setting of stickyd run (another mode's: proxy)`) {
		t.Errorf("a proxy setting in run's file: %v", err)
	}
}

// TestConfigFileErrors: every problem of a file is reported at once, with its line, and a
// misspelt key names the nearest valid one.
func TestConfigFileErrors(t *testing.T) {
	cfg := writeFile(t, "bad.yaml", `listen: ":8080"
max-con: 10
workers: many
key: sid
key: ip
max_body_bytes: 5
control: /run/x.sock
frobnicate: 1
admin-remote: yes
`)
	_, err := parseEdge(t, "run", "-config", cfg)
	if err == nil {
		t.Fatal("a bad file was accepted")
	}
	for _, want := range []string{
		cfg + `:2: unknown key "max-con": did you mean "max-conns"?`,
		cfg + `:3: workers: "many"`,
		cfg + `:5: "key" is set twice (also on line 4)`,
		cfg + `:6: unknown key "max_body_bytes": did you mean "max-body-bytes"?`,
		cfg + `:7: "control" is not a setting of stickyd run (another mode's: serve)`,
		cfg + `:8: unknown key "frobnicate": see stickyd run -h`,
		cfg + `:9: admin-remote: "yes"`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q:\n%v", want, err)
		}
	}
	for _, tc := range []struct{ body, want string }{
		{"- listen\n- workers\n", ":1: the file must be a mapping"},
		{"listen: [\n", "bad.yaml"},
		{"listen:\n  host: x\n", ":2: listen: want a value, not a mapping"},
	} {
		_, err := parseEdge(t, "run", "-config", writeFile(t, "bad.yaml", tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.body, err, tc.want)
		}
	}
	if _, err := parseEdge(t, "run", "-config", filepath.Join(t.TempDir(), "missing.yaml")); err == nil || !strings.Contains(err.Error(), "give -config the path of a YAML file") {
		t.Errorf("missing file: %v", err)
	}
	// The binary refuses to start on it, exit 2, the lines on stderr.
	out, err := exec.Command(stickydBinary(t), "demo", "-config", cfg, "-metrics", "", "-listen", "127.0.0.1:0").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), `bad.yaml:2: unknown key "max-con"`) {
		t.Errorf("stickyd demo -config bad.yaml: %v\n%s", err, out)
	}
}

// TestConfigFileAndReload: an edge started from a file; after the file changes, `stickyd
// reload` applies the log level at once, lists what waits for an upgrade or a restart, and
// a broken file changes nothing; SIGHUP reloads too.
func TestConfigFileAndReload(t *testing.T) {
	cfg := writeFile(t, "stickyd.yaml", "workers: 2\nlog-level: info\nmax-conns: 1000\n")
	d := startDaemon(t, "", "demo", "-config", cfg, "-workers", "1") // the flag wins over the file's 2
	if ws := d.workers(t); len(ws) != 1 {
		t.Fatalf("workers: %+v, want 1 (-workers beats the file)", ws)
	}
	if out, errOut, code := cli(t, "reload", d.metrics); code != 0 || !strings.Contains(out, "reloaded: no change") {
		t.Fatalf("reload of an unchanged file: %d %q %q", code, out, errOut)
	}
	// A rejected head is logged at debug level only.
	badHead := func() {
		c, err := net.Dial("tcp", d.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 512)
		c.Read(buf)
		c.Close()
	}
	badHead()
	if strings.Contains(d.logs.String(), "rejected request head") {
		t.Fatal("a debug line at log level info")
	}
	os.WriteFile(cfg, []byte("workers: 2\nlog-level: debug\nmax-conns: 5\nlisten: 127.0.0.1:1\napp-port: 3000\n"), 0o644)
	out, errOut, code := cli(t, "reload", d.metrics)
	if code != 0 {
		t.Fatalf("reload: %d %q", code, errOut)
	}
	for _, want := range []string{
		"applied now: log-level info → debug",
		"applied by an edge upgrade (stickyd upgrade, or SIGUSR2: re-reads the settings, drops nothing): max-conns 1000 → 5",
		"need a restart of stickyd (sockets and the worker set stay across an upgrade): app-port 0 → 3000",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("reload said %q, want %q", out, want)
		}
	}
	// -listen and -workers are given as flags: the file's values do not count.
	if strings.Contains(out, "listen ") || strings.Contains(out, "workers ") {
		t.Errorf("reload lists settings a flag fixes: %q", out)
	}
	badHead()
	waitFor(t, "a debug line after the reload", 5*time.Second, func() bool {
		return strings.Contains(d.logs.String(), "rejected request head")
	})
	os.WriteFile(cfg, []byte("log-level: info\nmax-con: 5\n"), 0o644)
	if _, errOut, code := cli(t, "reload", d.metrics); code != 1 || !strings.Contains(errOut, `stickyd.yaml:2: unknown key "max-con"`) || !strings.Contains(errOut, "nothing changed") {
		t.Errorf("reload of a broken file: %d %q", code, errOut)
	}
	os.WriteFile(cfg, []byte("log-level: info\n"), 0o644)
	d.signal(syscall.SIGHUP)
	waitFor(t, "SIGHUP to reload the settings and restart the workers", 20*time.Second, func() bool {
		l := d.logs.String()
		return strings.Contains(l, "log-level debug → info") && strings.Contains(l, "rolling restart done")
	})
}

// TestDeployConfigFileIsValid: the example settings file in deploy/ is one stickyd accepts.
func TestDeployConfigFileIsValid(t *testing.T) {
	f, err := parseEdge(t, "run", "-config", filepath.Join("..", "..", "deploy", "stickyd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if f.metricsAddr != defaultAdmin || f.key != "sid" || f.logFormat != "json" {
		t.Errorf("deploy/stickyd.yaml read as %+v", *f)
	}
}

// TestUpgradeChecksSettingsFirst: an edge upgrade re-reads the -config file in the new
// image; a file broken since the edge started fails the upgrade (the edge keeps serving)
// instead of ending the edge after the exec. Fixed, the upgrade goes through and applies
// the file.
func TestUpgradeChecksSettingsFirst(t *testing.T) {
	cfg := writeFile(t, "stickyd.yaml", "max-conns: 1000\n")
	d := startDaemon(t, "", "demo", "-workers", "1", "-config", cfg)
	os.WriteFile(cfg, []byte("max-conns: lots\n"), 0o644)
	d.signal(syscall.SIGUSR2)
	waitFor(t, "the upgrade to be refused", 20*time.Second, func() bool {
		return strings.Contains(d.logs.String(), "the new image would not start with these settings") &&
			strings.Contains(d.logs.String(), `stickyd.yaml:1: max-conns: \"lots\"`) // quoted by the text log
	})
	if got := httpStatus(t, "GET", "http://"+d.metrics+"/readyz"); got != 200 {
		t.Fatalf("after a refused upgrade /readyz = %d", got)
	}
	os.WriteFile(cfg, []byte("max-conns: 2000\n"), 0o644)
	if out, errOut, code := cli(t, "upgrade", d.metrics); code != 0 || !strings.Contains(out, "generation 1") {
		t.Fatalf("upgrade with the fixed file: %d %q %q", code, out, errOut)
	}
	// The new image read the file: a reload now sees no change.
	if out, _, code := cli(t, "reload", d.metrics); code != 0 || !strings.Contains(out, "no change") {
		t.Errorf("reload after the upgrade: %d %q", code, out)
	}
}
