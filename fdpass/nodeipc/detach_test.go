//go:build unix

package nodeipc

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// roundTrip serialises a state as the edge does across execve.
func roundTrip[T any](t *testing.T, v T) T {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out T
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// waitDetachedRun checks that the Run of a detached Primary returned ErrDetached.
func waitDetachedRun(t *testing.T, runErr <-chan error) {
	t.Helper()
	select {
	case err := <-runErr:
		if !errors.Is(err, ErrDetached) {
			t.Fatalf("Run after Detach: %v, want ErrDetached", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Detach")
	}
}

// resume resumes st with a test logger, sets shared, starts Run and registers the cleanup.
func resume(t *testing.T, st PrimaryState, shared *SharedListeners) (*Primary, <-chan error) {
	t.Helper()
	p, err := ResumePrimary(roundTrip(t, st), Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("ResumePrimary: %v", err)
	}
	p.Shared = shared
	p.Logger = testLogger(t)
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(context.Background()) }()
	t.Cleanup(func() {
		p.Channel.Close()
		select {
		case <-runErr:
		case <-time.After(10 * time.Second):
			t.Errorf("resumed Run did not return")
		}
	})
	return p, runErr
}

// deliverGET hands a fresh TCP connection to p and returns the body of GET path on it.
func deliverGET(t *testing.T, p *Primary, path string) string {
	t.Helper()
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatalf("Deliver: %v", err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(client, "GET "+path+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %q", path, resp.StatusCode, body)
	}
	return string(body)
}

func TestDetachResumeListen(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "listen.js", "3000")
	w.waitReady(t)
	before := deliverGET(t, w.p, "/before")
	want := "from " + strconv.Itoa(w.cmd.Process.Pid) + "\n"
	if before != "hello /before "+want {
		t.Fatalf("before: %q", before)
	}
	seq := w.p.seq.Load()
	st, err := w.p.Detach()
	if err != nil {
		t.Fatalf("Detach: %v", err)
	}
	waitDetachedRun(t, w.runErr)
	if st.Seq != seq || st.Style != StyleListen || !st.AppListening || !st.Ready || st.AppKey == "" {
		t.Fatalf("state %+v (seq before %d)", st, seq)
	}
	if fl, err := unix.FcntlInt(uintptr(st.FD), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC != 0 {
		t.Fatalf("state fd %d: flags %#x err %v, want inheritable", st.FD, fl, err)
	}
	// The old Primary and Channel refuse work.
	if err := w.p.Deliver(context.Background(), w.ch.uc); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrDetached) {
		t.Fatalf("Deliver after Detach: %v", err)
	}
	if _, err := w.p.Detach(); !errors.Is(err, ErrDetached) {
		t.Fatalf("second Detach: %v", err)
	}

	p, _ := resume(t, st, nil)
	select {
	case <-p.Ready():
	default:
		t.Fatal("resumed Primary not ready at once")
	}
	if p.Style() != StyleListen {
		t.Fatalf("resumed style %v", p.Style())
	}
	if got := deliverGET(t, p, "/after"); got != "hello /after "+want {
		t.Fatalf("after: %q, want the same worker (%q)", got, want)
	}
	if got := p.seq.Load(); got != st.Seq+1 {
		t.Fatalf("seq %d after one newconn, want %d", got, st.Seq+1)
	}
}

// A queryServer asking for the app server, as Node sends it (fd undefined: absent).
const fakeQuery = `{"cmd":"NODE_CLUSTER","act":"queryServer","address":"127.0.0.1","port":3000,"addressType":4,"index":0,"data":null,"seq":0}`
const fakeListening = `{"cmd":"NODE_CLUSTER","act":"listening","address":"127.0.0.1","port":3000,"addressType":4,"index":0,"seq":1}`

func waitEvent(t *testing.T, p *Primary, kind EventKind) Event {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case e := <-p.Events():
			if e.Kind == kind {
				return e
			}
		case <-timeout:
			t.Fatalf("no event %d", kind)
		}
	}
}

func TestDetachPartialLine(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	p := &Primary{Channel: ch, Logger: testLogger(t)}
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(context.Background()) }()

	peer.write(`{"cmd":"NODE_CLUSTER","act":"online"}` + "\n" + `{"cmd":"STICKYD","act":"st`)
	waitEvent(t, p, EventOnline)
	time.Sleep(50 * time.Millisecond) // the half line came with the same write; let it be read
	st, err := p.Detach()
	if err != nil {
		t.Fatalf("Detach: %v", err)
	}
	waitDetachedRun(t, runErr)
	if string(st.Pending) != `{"cmd":"STICKYD","act":"st` {
		t.Fatalf("Pending %q", st.Pending)
	}
	// The rest arrives while nobody reads (between the images).
	peer.write(`icky-ready"}` + "\n" + `{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":7}` + "\n")

	p2, _ := resume(t, st, nil)
	select {
	case <-p2.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("sticky-ready split across Detach was not received")
	}
	if p2.Style() != StyleSticky {
		t.Fatalf("style %v", p2.Style())
	}
	// The primary's seq continues: the ack of exitedAfterDisconnect carries the next one.
	line, _, err := peer.readLine(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"ack":7,"cmd":"NODE_CLUSTER","seq":` + strconv.FormatInt(st.Seq, 10) + `}`; line != want {
		t.Fatalf("reply %s, want %s", line, want)
	}
}

// Without Run, complete lines wait in the queue: they travel in the state, in order.
func TestDetachQueuedMessages(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	p := &Primary{Channel: ch, Logger: testLogger(t)}
	peer.write(`{"cmd":"NODE_CLUSTER","act":"online"}` + "\n" + `{"type":"sticky:connection","data":"sid1"}` + "\n" + `{"x":`)
	deadline := time.Now().Add(5 * time.Second)
	for {
		ch.mu.Lock()
		n := len(ch.queue) - ch.head
		ch.mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d messages queued", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	st, err := p.Detach()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Queued) != 2 || string(st.Pending) != `{"x":` {
		t.Fatalf("state: queued %q pending %q", st.Queued, st.Pending)
	}
	if err := p.Run(context.Background()); !errors.Is(err, ErrDetached) {
		t.Fatalf("Run after Detach: %v", err)
	}
	peer.write("1}\n")
	p2, _ := resume(t, st, nil)
	if e := waitEvent(t, p2, EventOnline); e.Message.Cmd != "NODE_CLUSTER" {
		t.Fatal(e)
	}
	if e := waitEvent(t, p2, EventStickyConnection); e.SID != "sid1" {
		t.Fatalf("sid %q", e.SID)
	}
	if e := waitEvent(t, p2, EventMessage); string(e.Message.Raw) != `{"x":1}` {
		t.Fatalf("message %s", e.Message.Raw)
	}
}

func TestDetachBusy(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	p := &Primary{Channel: ch, Logger: testLogger(t)}
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(context.Background()) }()
	peer.write(fakeQuery + "\n")
	if line, _, err := peer.readLine(5 * time.Second); err != nil || !strings.Contains(line, `"ack":0`) {
		t.Fatalf("queryServer reply %q %v", line, err)
	}
	peer.write(fakeListening + "\n")
	select {
	case <-p.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("not ready")
	}

	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	delivered := make(chan error, 1)
	go func() { delivered <- p.Deliver(context.Background(), b) }()
	line, nfd, err := peer.readLine(5 * time.Second)
	if err != nil || nfd != 1 {
		t.Fatalf("handle line %q fds %d: %v", line, nfd, err)
	}
	var h struct {
		Msg struct {
			Seq int `json:"seq"`
		} `json:"msg"`
	}
	json.Unmarshal([]byte(line), &h)

	// The handle is in flight.
	if _, err := p.Detach(); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with a handle in flight: %v, want ErrBusy", err)
	}
	peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
	// The newconn reply is pending.
	time.Sleep(50 * time.Millisecond)
	if _, err := p.Detach(); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with a newconn reply pending: %v, want ErrBusy", err)
	}
	// Everything kept running: the reply completes the Deliver.
	peer.write(`{"cmd":"NODE_CLUSTER","ack":` + strconv.Itoa(h.Msg.Seq) + `,"accepted":true}` + "\n")
	select {
	case err := <-delivered:
		if err != nil {
			t.Fatalf("Deliver: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Deliver did not complete after the failed Detach")
	}
	peer.write(`{"after":"busy"}` + "\n")
	if e := waitEvent(t, p, EventMessage); string(e.Message.Raw) != `{"after":"busy"}` {
		t.Fatalf("message %s", e.Message.Raw)
	}
	// Now it is quiet.
	st, err := p.Detach()
	if err != nil {
		t.Fatalf("Detach when quiet: %v", err)
	}
	waitDetachedRun(t, runErr)
	if st.Seq != int64(h.Msg.Seq)+1 {
		t.Fatalf("seq %d", st.Seq)
	}
	unix.Close(st.FD) // not resumed: the state owns the descriptor
}

func TestDetachResumeSticky(t *testing.T) {
	checkFDs(t)
	w := startWorker(t, workerOpts{}, "sticky.js")
	w.waitReady(t)
	st, err := w.p.Detach()
	if err != nil {
		t.Fatalf("Detach: %v", err)
	}
	waitDetachedRun(t, w.runErr)
	if st.Style != StyleSticky || !st.Ready {
		t.Fatalf("state %+v", st)
	}
	p, _ := resume(t, st, nil)
	client, server := tcpPair(t)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Deliver(ctx, server); err != nil {
		server.Close()
		t.Fatalf("Deliver: %v", err)
	}
	server.Close()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(client, "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	const prefix = `0{"sid":"`
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), prefix) {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	sid := string(body[len(prefix):])
	sid = sid[:strings.IndexByte(sid, '"')]
	if e := waitEvent(t, p, EventStickyConnection); e.SID != sid {
		t.Fatalf("sticky:connection sid %q, handshake sid %q", e.SID, sid)
	}
}

func TestDetachAdoptSharedListeners(t *testing.T) {
	checkFDs(t)
	front, target := freePort(t), freePort(t)
	shared := new(SharedListeners)
	defer shared.Close()
	args := []string{strconv.Itoa(front), strconv.Itoa(target)}
	w1 := startWorker(t, workerOpts{shared: shared}, "twoserver.js", args...)
	w1.waitReady(t)
	if e := waitEvent(t, w1.p, EventServerListening); e.Port != target {
		t.Fatalf("listening on %d", e.Port)
	}

	st, err := w1.p.Detach()
	if err != nil {
		t.Fatalf("Detach: %v", err)
	}
	waitDetachedRun(t, w1.runErr)
	fds, err := shared.Detach()
	if err != nil {
		t.Fatalf("SharedListeners.Detach: %v", err)
	}
	if len(fds) != 1 || !strings.HasSuffix(fds[0].Addr, ":"+strconv.Itoa(target)) {
		t.Fatalf("detached %+v", fds)
	}
	if len(shared.Addrs()) != 0 {
		t.Fatal("detached SharedListeners still lists sockets")
	}
	adopted := new(SharedListeners)
	defer adopted.Close()
	if err := adopted.Adopt(roundTrip(t, fds)); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	p1, _ := resume(t, st, adopted)

	// A worker started after the handover gets the same socket: no EADDRINUSE.
	w2 := startWorker(t, workerOpts{shared: adopted}, "twoserver.js", args...)
	w2.waitReady(t)
	if e := waitEvent(t, w2.p, EventServerListening); e.Port != target {
		t.Fatalf("second worker listening on %d", e.Port)
	}
	if n := len(adopted.Addrs()); n != 1 {
		t.Fatalf("%d shared sockets, want 1", n)
	}
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	for range 6 {
		resp, err := hc.Get("http://127.0.0.1:" + strconv.Itoa(target) + "/n")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "target /n\n" {
			t.Fatalf("target: %q", body)
		}
	}
	hc.CloseIdleConnections()
	// The resumed first worker still serves its app server.
	if got := deliverGET(t, p1, "/via"); got != "front(target /via)\n" {
		t.Fatalf("front via resumed worker: %q", got)
	}
	if got := deliverGET(t, w2.p, "/via2"); got != "front(target /via2)\n" {
		t.Fatalf("front via new worker: %q", got)
	}
}

// A Primary without a caller-set Shared hands its own listeners over in the state.
func TestDetachOwnShared(t *testing.T) {
	checkFDs(t)
	front, target := freePort(t), freePort(t)
	w := startWorker(t, workerOpts{}, "twoserver.js", strconv.Itoa(front), strconv.Itoa(target))
	w.waitReady(t)
	waitEvent(t, w.p, EventServerListening)
	st, err := w.p.Detach()
	if err != nil {
		t.Fatal(err)
	}
	waitDetachedRun(t, w.runErr)
	if len(st.OwnShared) != 1 {
		t.Fatalf("own shared %+v", st.OwnShared)
	}
	p, _ := resume(t, st, nil)
	if got := deliverGET(t, p, "/own"); got != "front(target /own)\n" {
		t.Fatalf("got %q", got)
	}
	if n := len(p.Shared.Addrs()); n != 1 {
		t.Fatalf("resumed own shared: %d sockets", n)
	}
}

const (
	envExecHelper = "NODEIPC_TEST_EXEC_HELPER"
	envExecState  = "NODEIPC_TEST_EXEC_STATE"
)

// TestDetachAcrossExec really execve()s: a helper (this test binary) spawns a Node worker,
// serves a connection, detaches, re-executes itself with the state in its environment, and
// the new image resumes the Primary and serves another connection through the same worker.
func TestDetachAcrossExec(t *testing.T) {
	requireNode(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestExecHelper$", "-test.v")
	cmd.Env = append(os.Environ(), envExecHelper+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "EXEC-HELPER-OK") {
		t.Fatalf("helper: %v\n%s", err, out)
	}
}

type execState struct {
	Primary PrimaryState
	PID     int
	Body    string
}

func TestExecHelper(t *testing.T) {
	if os.Getenv(envExecHelper) != "1" {
		t.Skip("helper for TestDetachAcrossExec")
	}
	if s := os.Getenv(envExecState); s != "" {
		execHelperAfter(t, s)
		return
	}
	parent, child, err := NewPair()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", "listen.js", "3000")
	cmd.Dir = "testdata"
	cmd.ExtraFiles = []*os.File{child}
	cmd.Env = append(os.Environ(), Env(3, 1)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child.Close()
	p := &Primary{Channel: NewChannel(parent, Config{Logger: testLogger(t)})}
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(context.Background()) }()
	select {
	case <-p.Ready():
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		t.Fatal("worker not ready")
	}
	body := deliverGET(t, p, "/one")
	st, err := p.Detach()
	if err != nil {
		cmd.Process.Kill()
		t.Fatal(err)
	}
	waitDetachedRun(t, runErr)
	b, _ := json.Marshal(execState{Primary: st, PID: cmd.Process.Pid, Body: body})
	env := append(os.Environ(), envExecState+"="+string(b))
	err = syscall.Exec(os.Args[0], os.Args, env)
	cmd.Process.Kill()
	t.Fatalf("exec: %v", err)
}

func execHelperAfter(t *testing.T, s string) {
	var es execState
	if err := json.Unmarshal([]byte(s), &es); err != nil {
		t.Fatal(err)
	}
	proc, _ := os.FindProcess(es.PID)
	defer func() {
		proc.Kill()
		proc.Wait() // still our child: same pid across the exec
	}()
	p, _ := resume(t, es.Primary, nil)
	want := strings.Replace(es.Body, "/one", "/two", 1)
	if got := deliverGET(t, p, "/two"); got != want {
		t.Fatalf("after exec: %q, want %q (same worker)", got, want)
	}
	fmt.Println("EXEC-HELPER-OK")
}

// Detach in the middle of a stream of messages: every one arrives exactly once, in order,
// through the old Primary or the resumed one.
func TestDetachMidStream(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	p := &Primary{Channel: ch, Logger: testLogger(t)}
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(context.Background()) }()
	const n = 250 // fewer than Events() buffers: none is dropped even if the reader lags
	var got []int
	collect := func(q *Primary, stop <-chan error) {
		for {
			select {
			case e := <-q.Events():
				var m struct{ N int }
				if e.Kind == EventMessage && json.Unmarshal(e.Message.Raw, &m) == nil {
					got = append(got, m.N)
				}
			case err := <-stop:
				if !errors.Is(err, ErrDetached) {
					t.Errorf("Run: %v", err)
				}
				for { // Run has returned: drain what it emitted
					select {
					case e := <-q.Events():
						var m struct{ N int }
						if e.Kind == EventMessage && json.Unmarshal(e.Message.Raw, &m) == nil {
							got = append(got, m.N)
						}
					default:
						return
					}
				}
			}
		}
	}
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for i := range n {
			line := `{"N":` + strconv.Itoa(i) + `,"pad":"` + strings.Repeat("x", i%97) + `"}` + "\n"
			// Split some lines across writes.
			if i%3 == 0 {
				peer.write(line[:len(line)/2])
				peer.write(line[len(line)/2:])
			} else {
				peer.write(line)
			}
		}
	}()
	detached := make(chan PrimaryState, 1)
	go func() {
		time.Sleep(2 * time.Millisecond)
		for {
			st, err := p.Detach()
			if err == nil {
				detached <- st
				return
			}
			if !errors.Is(err, ErrBusy) {
				t.Errorf("Detach: %v", err)
				close(detached)
				return
			}
		}
	}()
	collect(p, runErr)
	st, ok := <-detached
	if !ok {
		return
	}
	t.Logf("detached after %d messages; %d queued, %d bytes pending", len(got), len(st.Queued), len(st.Pending))
	p2, runErr2 := resume(t, st, nil)
	deadline := time.After(10 * time.Second)
	for len(got) < n {
		select {
		case e := <-p2.Events():
			var m struct{ N int }
			if e.Kind == EventMessage && json.Unmarshal(e.Message.Raw, &m) == nil {
				got = append(got, m.N)
			}
		case err := <-runErr2:
			t.Fatalf("resumed Run: %v", err)
		case <-deadline:
			t.Fatalf("got %d of %d messages", len(got), n)
		}
	}
	<-writerDone
	for i, v := range got {
		if v != i {
			t.Fatalf("message %d is %d", i, v)
		}
	}
}
