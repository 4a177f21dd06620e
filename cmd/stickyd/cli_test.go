//go:build unix

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// cli runs the built stickyd with args, as a user or a health check does.
func cli(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(stickydBinary(t), args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("stickyd %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

// addrForms are the ways to give one admin address; every client command must read
// them all as the same edge.
func addrForms(hostport string) [][]string {
	_, port, _ := net.SplitHostPort(hostport)
	return [][]string{
		{hostport},
		{"-admin", hostport},
		{"--admin=" + hostport},
		{"-url", "http://" + hostport + "/healthz"}, // what deploy files have always written
		{"http://" + hostport + "/admin/drain"},
		{"http://" + hostport},
		{":" + port},
		{"localhost:" + port},
	}
}

var workersTable = regexp.MustCompile(`(?m)^SLOT +PID +STATE +SESSIONS +WEBSOCKETS\n((?:\d+ +\d+ +\w+ +\d+ +\d+\n)+)`)

// TestCLIAgainstEdge runs every client command against a live edge, the address given
// every way there is, and checks that each does what it says.
func TestCLIAgainstEdge(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "2", "-shutdown-timeout", "2s")
	var table string
	for _, form := range addrForms(d.metrics) {
		for _, c := range []string{"health", "ready"} {
			if out, errOut, code := cli(t, append([]string{c}, form...)...); code != 0 || errOut != "" {
				t.Errorf("stickyd %s %v: exit %d, %q %q", c, form, code, out, errOut)
			}
		}
		for _, c := range []string{"status", "ls"} {
			out, errOut, code := cli(t, append([]string{c}, form...)...)
			m := workersTable.FindStringSubmatch(out)
			if code != 0 || m == nil || strings.Count(m[1], "\n") != 2 || !strings.Contains(out, "ready") {
				t.Fatalf("stickyd %s %v: exit %d\n%s%s", c, form, code, out, errOut)
			}
			if table == "" {
				table = m[1]
			} else if m[1] != table {
				t.Errorf("stickyd %s %v shows\n%s, other forms\n%s", c, form, m[1], table)
			}
		}
	}
	// The preStop hook's exact command (deploy/k8s.yaml), then its undo.
	if out, errOut, code := cli(t, "drain", "-url", "http://"+d.metrics+"/admin/drain"); code != 0 || out != "draining\n" {
		t.Fatalf("drain -url: exit %d %q %q", code, out, errOut)
	}
	if _, errOut, code := cli(t, "ready", d.metrics); code != 1 || !strings.Contains(errOut, "503") {
		t.Fatalf("ready while draining: exit %d %q", code, errOut)
	}
	if _, _, code := cli(t, "health", d.metrics); code != 0 {
		t.Fatalf("health while draining: exit %d (a draining edge is alive)", code)
	}
	if out, errOut, code := cli(t, "undrain", d.metrics); code != 0 || !strings.HasPrefix(out, "ready") {
		t.Fatalf("undrain: exit %d %q %q", code, out, errOut)
	}
	if _, errOut, code := cli(t, "ready", "-admin", d.metrics); code != 0 {
		t.Fatalf("ready after undrain: exit %d %q", code, errOut)
	}
	// One worker; SLOT and ADDR in either order.
	if out, errOut, code := cli(t, "drain", "1", "-admin", d.metrics); code != 0 || out != "worker 1 draining\n" {
		t.Fatalf("drain 1: exit %d %q %q", code, out, errOut)
	}
	if st := d.workers(t); st[1].State != "draining" || st[0].State != "ready" {
		t.Fatalf("after drain 1: %+v", st)
	}
	if out, errOut, code := cli(t, "undrain", d.metrics, "1"); code != 0 || out != "worker 1 ready\n" {
		t.Fatalf("undrain ADDR 1: exit %d %q %q", code, out, errOut)
	}
	if st := d.workers(t); st[1].State != "ready" {
		t.Fatalf("after undrain 1: %+v", st)
	}
	before := d.workers(t)
	if out, errOut, code := cli(t, "restart", "0", "http://"+d.metrics+"/"); code != 0 || out != "worker 0 restarted\n" {
		t.Fatalf("restart 0: exit %d %q %q", code, out, errOut)
	}
	if after := d.workers(t); after[0].PID == before[0].PID || after[1].PID != before[1].PID {
		t.Fatalf("restart 0: pids %+v → %+v", before, after)
	}
	if _, errOut, code := cli(t, "restart", "5", d.metrics); code != 1 || !strings.Contains(errOut, "no worker in slot 5") {
		t.Fatalf("restart 5: exit %d %q", code, errOut)
	}
	if out, errOut, code := cli(t, "upgrade", "-admin", d.metrics); code != 0 || !strings.Contains(out, "generation 1") {
		t.Fatalf("upgrade: exit %d %q %q", code, out, errOut)
	}
	if out, errOut, code := cli(t, "upgrade", "-url", "http://"+d.metrics+"/admin/upgrade"); code != 0 || !strings.Contains(out, "generation 2") {
		t.Fatalf("upgrade -url: exit %d %q %q", code, out, errOut)
	}
}

// TestCLIRefusesOtherServers: a client command pointed at something that is not a
// stickyd (a wrong port, an app's own server) must fail and say so. `health` used to
// exit 0 whenever anything answered 200.
func TestCLIRefusesOtherServers(t *testing.T) {
	var mu sync.Mutex
	var got []string
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Method+" "+r.URL.Path)
		mu.Unlock()
		io.Copy(io.Discard, r.Body)
		if r.URL.Path == "/admin/workers" {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"workers":[],"generation":0}`)
			return
		}
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<html>ok</html>\n")
	}))
	defer other.Close()
	hostport := strings.TrimPrefix(other.URL, "http://")
	const want = "is not a stickyd admin endpoint (no Stickyd-Version header): is -metrics of the edge on another port?"
	for _, c := range [][]string{{"health"}, {"ready"}, {"status"}, {"ls"}, {"drain"}, {"drain", "0"}, {"undrain"}, {"undrain", "1"}, {"restart"}, {"restart", "1"}, {"upgrade"}, {"reload"}} {
		for _, form := range [][]string{{hostport}, {"-admin", hostport}, {"-url", other.URL + "/healthz"}} {
			args := append(append([]string{}, c...), form...)
			out, errOut, code := cli(t, args...)
			if code != 1 || !strings.Contains(errOut, want) || !strings.Contains(errOut, other.URL) || out != "" {
				t.Errorf("stickyd %v against a non-stickyd server: exit %d, stdout %q, stderr %q; want exit 1 and %q", args, code, out, errOut, want)
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) == 0 {
		t.Fatal("the other server saw no request: the commands did not go to the address given")
	}
	// Nothing reached: an address is never silently replaced by the default.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := closed.Addr().String()
	closed.Close()
	for _, args := range [][]string{{"health", addr}, {"health", "http://" + addr + "/healthz"}, {"drain", "-url", "http://" + addr + "/admin/drain"}} {
		if _, errOut, code := cli(t, args...); code != 1 || !strings.Contains(errOut, "cannot reach http://"+addr) {
			t.Errorf("stickyd %v with nothing there: exit %d %q", args, code, errOut)
		}
	}
}

func TestCLIUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"health", "127.0.0.1:1", "127.0.0.1:2"}, `unexpected argument "127.0.0.1:2"`},
		{[]string{"health", "3"}, `unexpected argument "3"`},
		{[]string{"drain", "1", "2"}, `unexpected argument "2"`},
		{[]string{"status", "127.0.0.1:1", "extra"}, `unexpected argument "extra"`},
		{[]string{"health", "-admin", "127.0.0.1:1", "127.0.0.1:2"}, "given twice"},
		{[]string{"health", "-timeout", "0s"}, "-timeout"},
		{[]string{"health", "-bogus"}, "stickyd health -h lists the flags"},
		{[]string{"health", "ftp://127.0.0.1:1"}, `scheme "ftp"`},
		{[]string{"health", "http://127.0.0.1:1/readyz"}, "stickyd ready"},
		{[]string{"frobnicate"}, "unknown subcommand"},
	} {
		_, errOut, code := cli(t, tc.args...)
		if code != 2 || !strings.Contains(errOut, tc.want) {
			t.Errorf("stickyd %v: exit %d %q, want exit 2 naming %q", tc.args, code, errOut, tc.want)
		}
	}
	if _, errOut, code := cli(t); code != 2 || !strings.Contains(errOut, "Usage:") {
		t.Errorf("stickyd without arguments: exit %d %q", code, errOut)
	}
}

func TestCLIHelpAndVersion(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}, {"--help"}, {"-help"}} {
		out, errOut, code := cli(t, args...)
		if code != 0 || errOut != "" || !strings.Contains(out, "Client commands") || !strings.Contains(out, "stickyd status [ADDR]") {
			t.Errorf("stickyd %v: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}
	for _, mode := range []string{"run", "demo", "serve"} {
		for _, h := range []string{"-h", "--help"} {
			out, errOut, code := cli(t, mode, h)
			if code != 0 || errOut != "" || !strings.Contains(out, "-listen") || !strings.Contains(out, "Usage: stickyd "+mode) {
				t.Errorf("stickyd %s %s: exit %d, stdout %q, stderr %q", mode, h, code, out, errOut)
			}
		}
	}
	// A -h that is a flag's value or belongs to the worker command is not the edge's.
	for _, tc := range []struct {
		args []string
		help bool
	}{
		{[]string{"-h"}, true},
		{[]string{"-workers", "2", "--help"}, true},
		{[]string{"--", "node", "app.js", "-h"}, false},
		{[]string{"node", "-h"}, false},
		{[]string{"-key", "-h", "--", "node"}, false},
		{[]string{"-bogus", "-h"}, false}, // runEdge reports -bogus
	} {
		var buf bytes.Buffer
		if got := edgeHelp("run", tc.args, &buf); got != tc.help || (buf.Len() > 0) != tc.help {
			t.Errorf("edgeHelp(run, %q) = %v with %d bytes of help, want %v", tc.args, got, buf.Len(), tc.help)
		}
	}
	for c := range clientCmds {
		out, errOut, code := cli(t, c, "-h")
		if code != 0 || errOut != "" || !strings.Contains(out, "Usage: stickyd "+c) || !strings.Contains(out, "-admin") {
			t.Errorf("stickyd %s -h: exit %d, stdout %q, stderr %q", c, code, out, errOut)
		}
	}

	// What go build recorded in the binary: version must report it, not "dev".
	mv, err := exec.Command("go", "version", "-m", stickydBinary(t)).Output()
	if err != nil {
		t.Fatal(err)
	}
	var modVersion, revision string
	for _, l := range strings.Split(string(mv), "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == "mod" {
			modVersion = f[2]
		}
		if len(f) >= 2 && f[0] == "build" {
			if v, ok := strings.CutPrefix(f[1], "vcs.revision="); ok {
				revision = v
			}
		}
	}
	t.Logf("binary: module version %q, revision %q", modVersion, revision)
	for _, args := range [][]string{{"version"}, {"-v"}, {"--version"}, {"-version"}} {
		out, errOut, code := cli(t, args...)
		if code != 0 || errOut != "" || !strings.HasPrefix(out, "stickyd ") {
			t.Fatalf("stickyd %v: exit %d %q %q", args, code, out, errOut)
		}
		if handoverFormatOf(out) != handoverFormat || !strings.Contains(out, "handover="+strconv.Itoa(handoverFormat)) {
			t.Errorf("stickyd %v: %q does not name handover=%d (the edge upgrade preflight reads it)", args, out, handoverFormat)
		}
		if revision != "" && !strings.Contains(out, "commit="+revision) {
			t.Errorf("stickyd %v: %q, want commit=%s", args, out, revision)
		}
		if modVersion != "" && modVersion != "(devel)" && !strings.HasPrefix(out, fmt.Sprintf("stickyd %s ", modVersion)) {
			t.Errorf("stickyd %v: %q, want version %s", args, out, modVersion)
		}
	}
}

func TestAdminBase(t *testing.T) {
	for in, want := range map[string]string{
		"":                              "http://" + defaultAdmin,
		"127.0.0.1:9191":                "http://127.0.0.1:9191",
		":9191":                         "http://127.0.0.1:9191",
		"localhost":                     "http://localhost:" + defaultAdminPort,
		"10.0.0.5":                      "http://10.0.0.5:" + defaultAdminPort,
		"::1":                           "http://[::1]:" + defaultAdminPort,
		"[::1]:9191":                    "http://[::1]:9191",
		"127.0.0.1:9191/healthz":        "http://127.0.0.1:9191",
		"http://127.0.0.1:9191/healthz": "http://127.0.0.1:9191",
		"http://host:9191/admin/drain":  "http://host:9191",
		"https://admin.example/":        "https://admin.example",
		"http://:9191":                  "http://127.0.0.1:9191",
	} {
		if got, _, err := adminBase(in); err != nil || got != want {
			t.Errorf("adminBase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"ftp://x:1", "http://", "http://[::1"} {
		if got, _, err := adminBase(in); err == nil {
			t.Errorf("adminBase(%q) = %q, want an error", in, got)
		}
	}
}
