//go:build unix

package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// wrappedDir is the fixture app started by a package.json script (testdata/socketio/wrapped-app).
func wrappedDir(t *testing.T) string {
	t.Helper()
	return filepath.Join(nodeFixtures(t), "wrapped-app")
}

// groupPids lists the live (not zombie) processes of process group pgid.
func groupPids(pgid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 3 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" {
			out = append(out, pid)
		}
	}
	return out
}

// wrappedWhoami asks the app through the edge which worker and pid serve it, on a fresh
// connection.
func wrappedWhoami(t *testing.T, addr string) (worker string, pid int) {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/whoami")
	if err != nil {
		t.Fatalf("GET /whoami through the edge: %v", err)
	}
	defer resp.Body.Close()
	var id struct {
		Worker *string `json:"worker"`
		PID    int     `json:"pid"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&id); err != nil || id.Worker == nil {
		t.Fatalf("GET /whoami: %s %v: want the app's {worker, pid}", resp.Status, err)
	}
	return *id.Worker, id.PID
}

// checkAllGone fails unless every process of the workers' groups has ended and the
// edge's port can be bound again.
func checkAllGone(t *testing.T, d *daemon, groups map[int][]int) {
	t.Helper()
	for pgid, members := range groups {
		// SIGKILL and reaping by init are asynchronous: a moment of grace.
		deadline := time.Now().Add(3 * time.Second)
		for len(groupPids(pgid)) > 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if left := groupPids(pgid); len(left) > 0 {
			t.Errorf("worker process group %d (was %v) still has %v after stickyd exited", pgid, members, left)
		}
	}
	ln, err := net.Listen("tcp", d.addr)
	if err != nil {
		t.Errorf("the edge's port %s is still taken after stickyd exited: %v", d.addr, err)
	} else {
		ln.Close()
	}
}

// `stickyd run -- npm start` and `-- sh -c 'node server.js'`: the app that calls listen()
// is npm's grandchild (npm → sh → node), or a shell's child, and gets the edge's traffic —
// before, npm's own Node took the IPC channel and the app listened on :3000 for real. Four
// workers serve socket.io clients; SIGTERM ends every process of every worker's group
// within the grace and frees the port.
func TestWrappedStartCommands(t *testing.T) {
	for _, tc := range []struct {
		name string
		cmd  []string
	}{
		{"npm start", []string{"npm", "start"}},
		{"sh -c", []string{"sh", "-c", "node server.js"}},
		// A Node step before the app (`node step.js && node server.js`) ends and the app
		// after it takes the channel.
		{"npm step then app", []string{"npm", "run", "start:with-step"}},
		// @socket.io/sticky's setupWorker style under a wrapper.
		{"npm sticky", []string{"npm", "run", "start:sticky"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := wrappedDir(t)
			const grace = 10 * time.Second
			args := append([]string{"run", "-workers", "4", "-key", "sid", "-shutdown-timeout", grace.String(), "--"}, tc.cmd...)
			d := startDaemon(t, dir, args...)
			ws := sioWaitWorkers(t, d, 4, 90*time.Second)
			groups := map[int][]int{}
			for _, w := range ws {
				groups[w.PID] = groupPids(w.PID)
			}

			// Plain HTTP through the edge reaches the app itself: a process of the worker's
			// group (for npm not the worker's own pid: npm → sh → node).
			worker, pid := wrappedWhoami(t, d.addr)
			slot, _ := strconv.Atoi(worker)
			w, ok := sioWorkerBySlot(ws, slot)
			if !ok {
				t.Fatalf("/whoami answered worker %q, not one of %+v", worker, ws)
			}
			inGroup := false
			for _, m := range groups[w.PID] {
				inGroup = inGroup || m == pid
			}
			if !inGroup {
				t.Errorf("/whoami answered pid %d, not a process of worker %d's group %v", pid, slot, groups[w.PID])
			}
			t.Logf("worker %d: worker process %d, app process %d, group %v", slot, w.PID, pid, groups[w.PID])

			// socket.io clients through the edge reach all four workers (new sessions go to
			// the least loaded worker; a few rounds at most, the spread is not exact).
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
			defer cancel()
			seen := map[string]int{}
			for round := 0; round < 3 && len(seen) < 4; round++ {
				res := runClients(t, ctx, sioClientArgs(d, "--clients", "40", "--messages", "2")...)
				checkAllClientsOK(t, res, false, false)
				for w, n := range res.PerWorker {
					seen[w] += n
				}
			}
			if len(seen) != 4 {
				t.Errorf("socket.io clients reached workers %v, want all 4", seen)
			}

			start := time.Now()
			d.signal(syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(grace + 10*time.Second):
				t.Fatalf("stickyd did not exit within the grace (%v) after SIGTERM", grace)
			}
			t.Logf("stopped in %v", time.Since(start).Round(time.Millisecond))
			if d.err != nil {
				t.Errorf("stickyd exit: %v", d.err)
			}
			checkAllGone(t, d, groups)
		})
	}
}

// A second SIGTERM means now: workers whose app ignores SIGTERM (and so also outlives its
// closed channel) are killed at once instead of after the minute of grace.
func TestSecondSignalKillsWorkersThatIgnoreSIGTERM(t *testing.T) {
	dir := wrappedDir(t)
	d := startDaemon(t, dir, "run", "-workers", "2", "-shutdown-timeout", "60s", "--", "npm", "run", "start:stubborn")
	ws := sioWaitWorkers(t, d, 2, 90*time.Second)
	groups := map[int][]int{}
	for _, w := range ws {
		groups[w.PID] = groupPids(w.PID)
	}
	d.signal(syscall.SIGTERM)
	// The first SIGTERM reaches the apps (grandchildren of the workers): their group is
	// signalled. They print this and block.
	waitFor(t, "both apps to report the first SIGTERM", 20*time.Second, func() bool {
		return strings.Count(d.logs.String(), "ignoring SIGTERM") >= 2
	})
	select {
	case <-d.exited:
		t.Fatalf("stickyd exited after the first SIGTERM though its workers ignore it:\n%s", d.logs.String())
	default:
	}
	start := time.Now()
	d.signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatalf("stickyd still running 15s after the second SIGTERM")
	}
	t.Logf("exited %v after the second SIGTERM", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(d.logs.String(), "second signal: stopping now") {
		t.Errorf("no log line for the second signal")
	}
	checkAllGone(t, d, groups)
}

// A worker that cannot start (its script does not exist) gives up after 5 tries with one
// line naming the command and Node's error; the stack trace is shown once, not per try and
// worker; /readyz answers 503 with the reason and /healthz 503; the edge starts listening
// once the workers gave up, not after the spawn timeout.
func TestWorkerThatCannotStartGivesUp(t *testing.T) {
	dir := nodeFixtures(t)
	start := time.Now()
	d := startDaemon(t, dir, "run", "-workers", "2", "-spawn-timeout", "120s", "--", "node", "no-such-app.js")
	if el := time.Since(start); el > 60*time.Second {
		t.Errorf("the edge started listening %v after start: it should not wait for the spawn timeout once every worker gave up", el)
	}
	logs := d.logs.String()
	var giveUps []string
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, "giving up") {
			giveUps = append(giveUps, line)
		}
	}
	if len(giveUps) != 1 {
		t.Errorf("want exactly one give-up line, got %d:\n%s", len(giveUps), strings.Join(giveUps, "\n"))
	} else {
		for _, want := range []string{"after 5 tries", "`node no-such-app.js`", "Error: Cannot find module", "no-such-app.js'"} {
			if !strings.Contains(giveUps[0], want) {
				t.Errorf("the give-up line lacks %q: %s", want, giveUps[0])
			}
		}
		t.Logf("give-up line: %s", giveUps[0])
	}
	if n := strings.Count(logs, "Module._resolveFilename"); n != 1 {
		t.Errorf("Node's stack trace appears %d times in the logs, want once (2 workers × 5 tries)", n)
	}

	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + d.metrics + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "Cannot find module") || !strings.Contains(body, "no-such-app.js") {
		t.Errorf("/readyz: %d %q, want 503 naming the command's error", code, body)
	}
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no worker can start") {
		t.Errorf("/healthz: %d %q, want 503: no worker can run", code, body)
	}
	select {
	case <-d.exited:
		t.Fatalf("stickyd exited (%v): it should stay up and report", d.err)
	default:
	}
	if t.Failed() {
		t.Logf("logs:\n%s", logs)
	}
}

// Commands that can never get the channel to the app are refused at start, in one line
// with the fix.
func TestUnworkableWrapperRefusedAtStart(t *testing.T) {
	bin := stickydBinary(t)
	for _, cmd := range [][]string{{"pm2", "start", "app.js"}, {"node", "--watch", "app.js"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		b, err := exec.CommandContext(ctx, bin, append([]string{"run", "-listen", "127.0.0.1:0", "-metrics", "", "--"}, cmd...)...).CombinedOutput()
		cancel()
		out := string(b)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%q: exit %v, want usage error (2)\n%s", cmd, err, out)
		}
		if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 1 || !strings.Contains(out, "stickyd run -- node server.js") {
			t.Errorf("%q: want one line with the fix, got:\n%s", cmd, out)
		}
	}
}

// npm-started workers go over to the next edge image in an upgrade, their process groups
// with them: a rolling restart after the upgrade ends every process of the adopted groups,
// and SIGTERM then ends the new ones.
func TestWrappedWorkersAcrossEdgeUpgradeAndRollingRestart(t *testing.T) {
	dir := wrappedDir(t)
	d := startDaemon(t, dir, "run", "-workers", "2", "-key", "sid", "-shutdown-timeout", "10s", "--", "npm", "start")
	before := sioWaitWorkers(t, d, 2, 90*time.Second)
	adopted := map[int][]int{}
	for _, w := range before {
		adopted[w.PID] = groupPids(w.PID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, stickydBinary(t), "upgrade", "-url", "http://"+d.metrics).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "generation 1") {
		t.Fatalf("upgrade: %v %s\nlogs:\n%s", err, out, d.logs.String())
	}
	after := sioWaitWorkers(t, d, 2, 30*time.Second)
	for i := range before {
		if after[i].PID != before[i].PID {
			t.Errorf("worker %d restarted across the upgrade (%d → %d)", i, before[i].PID, after[i].PID)
		}
	}
	if _, pid := wrappedWhoami(t, d.addr); pid == 0 {
		t.Fatal("no answer through the upgraded edge")
	}

	d.signal(syscall.SIGHUP)
	waitFor(t, "the rolling restart", 60*time.Second, func() bool {
		return strings.Contains(d.logs.String(), "rolling restart done")
	})
	fresh := sioWaitWorkers(t, d, 2, 30*time.Second)
	groups := map[int][]int{}
	for _, w := range fresh {
		if _, old := adopted[w.PID]; old {
			t.Errorf("worker %d still runs pid %d after the rolling restart", w.Slot, w.PID)
		}
		groups[w.PID] = groupPids(w.PID)
	}
	for pgid, members := range adopted {
		if left := groupPids(pgid); len(left) > 0 {
			t.Errorf("adopted worker group %d (was %v) still has %v after the rolling restart", pgid, members, left)
		}
	}
	if _, pid := wrappedWhoami(t, d.addr); pid == 0 {
		t.Fatal("no answer after the rolling restart")
	}

	d.signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("stickyd did not exit within the grace after SIGTERM")
	}
	checkAllGone(t, d, groups)
}

// A Node app that never gets the edge's channel (here its start script wipes NODE_OPTIONS,
// so stickyd's preload never loads) listens on its port itself. The edge notices while it
// starts, names the process and the port, says what to do in Node terms, gives up, and
// leaves the port free.
func TestNodeAppWithoutChannelIsNamed(t *testing.T) {
	dir := wrappedDir(t)
	port := sioFreePort(t)
	script := "NODE_OPTIONS= PORT=" + strconv.Itoa(port) + " node server.js"
	d := startDaemon(t, dir, "run", "-workers", "1", "-spawn-timeout", "120s", "--", "sh", "-c", script)
	var giveUp string
	for _, line := range strings.Split(d.logs.String(), "\n") {
		if strings.Contains(line, "giving up") {
			giveUp = line
		}
	}
	// [::] or 0.0.0.0, as the machine has IPv6 or not.
	for _, want := range []string{":" + strconv.Itoa(port) + " itself", "bypassing the edge", "NODE_OPTIONS", "stickyd run -- node server.js"} {
		if !strings.Contains(giveUp, want) {
			t.Errorf("the give-up line lacks %q: %q", want, giveUp)
		}
	}
	if strings.Contains(giveUp, "fdpass") {
		t.Errorf("the advice for a Node app names the Go API: %q", giveUp)
	}
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(port))
	if err != nil {
		t.Errorf("port %d still taken after the edge gave up: %v", port, err)
	} else {
		ln.Close()
	}
	if t.Failed() {
		t.Logf("logs:\n%s", d.logs.String())
	}
}
