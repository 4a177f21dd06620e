//go:build unix

package workers

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is an io.Writer safe for the supervisor's pumps and the test to share.
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

// groupMembers lists the pids whose process group is pgid.
func groupMembers(pgid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && procPgid(pid) == pgid {
			out = append(out, pid)
		}
	}
	return out
}

// A worker whose child ignores SIGTERM and holds the worker's output pipes: stopping it
// signals the whole process group, does not wait on the pipes for ever, and leaves no
// process behind. Before, the edge signalled the worker's pid only and then waited for EOF
// on pipes the grandchild kept open: shutdown never ended.
func TestSupervisorStopEndsTheWholeGroup(t *testing.T) {
	self, _ := os.Executable()
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	b := newFakeEdge(log)
	sup := &Supervisor{
		Edge: b,
		// The shell ignores SIGTERM for the background sleep, then becomes the Go worker.
		Command:      []string{"sh", "-c", `trap "" TERM; sleep 300 & exec "$0"`, self},
		Workers:      1,
		Env:          []string{workerEnv + "=echo"},
		SpawnTimeout: 10 * time.Second,
		GracePeriod:  time.Second,
		Stdout:       &logs,
		Stderr:       &logs,
		Logger:       log,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sup.Run(ctx); close(done) }()
	select {
	case <-sup.Ready():
	case <-time.After(15 * time.Second):
		cancel()
		t.Fatalf("worker not ready; logs:\n%s", logs.String())
	}
	pid := sup.Pids()[0]
	members := groupMembers(pid)
	if len(members) < 2 {
		t.Fatalf("process group %d has %v: want the worker and its sleep", pid, members)
	}
	start := time.Now()
	cancel()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatalf("Run did not return 15s after its context ended; logs:\n%s", logs.String())
	}
	t.Logf("stopped in %v", time.Since(start).Round(time.Millisecond))
	if groupLiving(pid) {
		t.Errorf("process group %d still has processes after Run returned: %v (members before: %v)", pid, groupMembers(pid), members)
	}
}

// Kill (a second SIGTERM) ends workers that ignore SIGTERM at once, not after the grace.
func TestSupervisorKillIsImmediate(t *testing.T) {
	self, _ := os.Executable()
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	b := newFakeEdge(log)
	sup := &Supervisor{
		Edge:         b,
		Command:      []string{"sh", "-c", `trap "" TERM; sleep 300 & exec "$0"`, self},
		Workers:      2,
		Env:          []string{workerEnv + "=echo"},
		SpawnTimeout: 10 * time.Second,
		GracePeriod:  time.Minute,
		Stdout:       &logs,
		Stderr:       &logs,
		Logger:       log,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { sup.Run(ctx); close(done) }()
	select {
	case <-sup.Ready():
	case <-time.After(15 * time.Second):
		t.Fatalf("workers not ready; logs:\n%s", logs.String())
	}
	pids := sup.Pids()
	cancel() // graceful: the sleeps ignore SIGTERM, so this would take the minute
	time.AfterFunc(0, sup.Kill)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return 10s after Kill; logs:\n%s", logs.String())
	}
	for _, pid := range pids {
		if groupLiving(pid) {
			t.Errorf("process group %d still has processes: %v", pid, groupMembers(pid))
		}
	}
}

// A worker that exits at once gives up after QuickFailures tries, says why in one line
// with the error its stderr named, shows that stderr once, and Health reports it.
func TestSupervisorGivesUpOnAWorkerThatCannotStart(t *testing.T) {
	var logs, out lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	b := newFakeEdge(log)
	script := `echo "Error: Cannot find module '/nowhere/app.js'" >&2; echo "    at Module._resolveFilename (node:internal)" >&2; exit 1`
	sup := &Supervisor{
		Edge:          b,
		Command:       []string{"sh", "-c", script},
		Workers:       3,
		SpawnTimeout:  time.Minute,
		QuickFailures: 3,
		Stdout:        &out,
		Stderr:        &out,
		Logger:        log,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { sup.Run(ctx); close(done) }()
	select {
	case <-sup.Settled():
	case <-time.After(30 * time.Second):
		t.Fatalf("slots did not give up; logs:\n%s\noutput:\n%s", logs.String(), out.String())
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return once every slot gave up")
	}
	ok, reason := sup.Health()
	if ok || !strings.Contains(reason, "Cannot find module '/nowhere/app.js'") {
		t.Errorf("Health() = %v, %q: want false and the error line", ok, reason)
	}
	var giveUps []string
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "giving up") {
			giveUps = append(giveUps, line)
		}
	}
	if len(giveUps) != 1 || !strings.Contains(giveUps[0], "after 3 tries") || !strings.Contains(giveUps[0], "Cannot find module") {
		t.Errorf("want one give-up line naming the tries and the error, got %q", giveUps)
	}
	if n := strings.Count(out.String(), "Module._resolveFilename"); n != 1 {
		t.Errorf("the failing worker's stderr was shown %d times, want once:\n%s", n, out.String())
	}
	if t.Failed() {
		t.Logf("logs:\n%s\noutput:\n%s", logs.String(), out.String())
	}
}

func TestIsNodeCommand(t *testing.T) {
	for _, tc := range []struct {
		cmd  []string
		want bool
	}{
		{[]string{"node", "app.js"}, true},
		{[]string{"/usr/local/bin/node", "app.js"}, true},
		{[]string{"npm", "start"}, true},
		{[]string{"yarn", "start"}, true},
		{[]string{"pnpm", "start"}, true},
		{[]string{"npx", "nodemon", "app.js"}, true},
		{[]string{"nodemon", "app.js"}, true},
		{[]string{"sh", "-c", "node app.js"}, true},
		{[]string{"sh", "-c", "cd /srv && exec npm start"}, true},
		{[]string{"env", "PORT=3000", "node", "app.js"}, true},
		{[]string{"sh", "-c", "./server"}, false},
		{[]string{"./my-go-server"}, false},
		{[]string{"sh", "-c", "nodes"}, false},
	} {
		if got := IsNodeCommand(tc.cmd); got != tc.want {
			t.Errorf("IsNodeCommand(%q) = %v, want %v", tc.cmd, got, tc.want)
		}
	}
	for _, cmd := range [][]string{{"pm2", "start", "app.js"}, {"node", "--watch", "app.js"}, {"pm2-runtime", "app.js"}} {
		if err := CheckWorkerCommand(cmd); !errors.Is(err, ErrUnsupportedCommand) || !strings.Contains(err.Error(), "stickyd run -- node server.js") {
			t.Errorf("CheckWorkerCommand(%q) = %v: want ErrUnsupportedCommand with the fix", cmd, err)
		}
	}
	if err := CheckWorkerCommand([]string{"node", "app.js", "--watch"}); err != nil {
		t.Errorf("an app's own --watch argument refused: %v", err)
	}
}

func TestLastErrorLine(t *testing.T) {
	node := []string{
		"node:internal/modules/cjs/loader:1228",
		"  throw err;",
		"  ^",
		"",
		"Error: Cannot find module '/srv/app.js'",
		"    at Module._resolveFilename (node:internal/modules/cjs/loader:1225:15)",
		"  code: 'MODULE_NOT_FOUND',",
		"  requireStack: []",
		"}",
		"",
		"Node.js v20.20.2",
	}
	for _, tc := range []struct {
		lines []string
		want  string
	}{
		{node, "Error: Cannot find module '/srv/app.js'"},
		{[]string{"/srv/app.js:3", "SyntaxError: Unexpected token '}'", "Node.js v20.20.2"}, "SyntaxError: Unexpected token '}'"},
		{[]string{"sh: 1: nodee: not found"}, "sh: 1: nodee: not found"},
		{[]string{"listening", "bye", "Node.js v20.1.0"}, "bye"},
		{[]string{`npm error npx canceled due to missing packages and no YES option: ["nodemon@3.1.14"]`,
			"npm error A complete log of this run can be found in: /root/.npm/_logs/2026-12-01T14_26_50_702Z-debug-0.log"},
			`npm error npx canceled due to missing packages and no YES option: ["nodemon@3.1.14"]`},
		{[]string{"npm error path /srv", "npm error command failed", "npm error command sh -c node x.js"}, ""},
		{nil, ""},
	} {
		if got := lastErrorLine(tc.lines); got != tc.want {
			t.Errorf("lastErrorLine(%q) = %q, want %q", tc.lines, got, tc.want)
		}
	}
}

func TestLineWriterHoldsUntilReleased(t *testing.T) {
	var out lockedBuffer
	w := prefixWriter(&out, "[w] ")
	w.hold = true
	w.Write([]byte("one\ntw"))
	if out.String() != "" {
		t.Fatalf("held output written: %q", out.String())
	}
	w.Release()
	w.Write([]byte("o\nthree\n"))
	if got, want := out.String(), "[w] one\n[w] two\n[w] three\n"; got != want {
		t.Errorf("output %q, want %q", got, want)
	}
	if tail := w.Tail(); len(tail) != 3 || tail[2] != "three" {
		t.Errorf("Tail() = %q", tail)
	}
}

func TestProcNetAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:0BB8":                         "127.0.0.1:3000",
		"00000000:1F90":                         "0.0.0.0:8080",
		"00000000000000000000000000000000:0BB8": "[::]:3000",
		"00000000000000000000000001000000:0050": "[::1]:80",
	} {
		if got := procNetAddr(in); got != want {
			t.Errorf("procNetAddr(%q) = %q, want %q", in, got, want)
		}
	}
}
