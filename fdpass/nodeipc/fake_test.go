//go:build unix

package nodeipc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakePeer is a Go stand-in for the child end of the channel.
type fakePeer struct {
	t    *testing.T
	uc   *net.UnixConn
	fds  int // fds received so far (all closed)
	pend []byte
}

func newFakeChannel(t *testing.T, cfg Config) (*Channel, *fakePeer) {
	t.Helper()
	a, b := unixPair(t)
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ch := NewChannel(a, cfg)
	p := &fakePeer{t: t, uc: b}
	t.Cleanup(func() {
		ch.Close()
		b.Close()
	})
	return ch, p
}

// readLine reads one line from the parent, counting and closing received fds.
func (p *fakePeer) readLine(timeout time.Duration) (string, int, error) {
	p.uc.SetReadDeadline(time.Now().Add(timeout))
	fdsBefore := p.fds
	for {
		if i := bytes.IndexByte(p.pend, '\n'); i >= 0 {
			line := string(p.pend[:i])
			p.pend = p.pend[i+1:]
			return line, p.fds - fdsBefore, nil
		}
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(4*4))
		n, oobn, _, _, err := p.uc.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for i := range msgs {
				fds, _ := unix.ParseUnixRights(&msgs[i])
				for _, fd := range fds {
					unix.Close(fd)
					p.fds++
				}
			}
		}
		if n > 0 {
			p.pend = append(p.pend, buf[:n]...)
		}
		if err != nil {
			return "", 0, err
		}
	}
}

func (p *fakePeer) write(s string) {
	p.t.Helper()
	if _, err := io.WriteString(p.uc, s); err != nil {
		p.t.Errorf("peer write: %v", err)
	}
}

func TestNACKResend(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{AckTimeout: 5 * time.Second})
	done := make(chan []string, 1)
	go func() {
		var lines []string
		for i := 0; i < 2; i++ {
			line, nfd, err := peer.readLine(5 * time.Second)
			if err != nil || nfd != 1 {
				t.Errorf("peer: line %q fds %d err %v", line, nfd, err)
				break
			}
			lines = append(lines, line)
			if i == 0 {
				peer.write(`{"cmd":"NODE_HANDLE_NACK"}` + "\n")
			} else {
				peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
			}
		}
		done <- lines
	}()
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	if err := ch.SendHandle(context.Background(), "net.Native", map[string]any{"k": 1}, b); err != nil {
		t.Fatalf("SendHandle: %v", err)
	}
	lines := <-done
	want := `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"k":1}}`
	if len(lines) != 2 || lines[0] != want || lines[1] != want {
		t.Fatalf("peer saw %q", lines)
	}
}

func TestNACKExhausted(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{MaxResends: 2})
	go func() {
		for {
			if _, _, err := peer.readLine(5 * time.Second); err != nil {
				return
			}
			io.WriteString(peer.uc, `{"cmd":"NODE_HANDLE_NACK"}`+"\n") // may race with cleanup
		}
	}()
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	err := ch.SendHandle(context.Background(), "net.Socket", map[string]any{"type": "x"}, b)
	if !errors.Is(err, ErrNACK) || !strings.Contains(err.Error(), "3 attempts") {
		t.Fatalf("SendHandle: %v, want ErrNACK after 3 attempts", err)
	}
	// The channel stays usable and the caller still owns the conn.
	if err := ch.Send(map[string]string{"after": "nack"}); err != nil {
		t.Fatalf("Send after NACK: %v", err)
	}
	if _, err := a.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
}

func TestSendOrderedBehindHandle(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	result := make(chan string, 1)
	go func() {
		line, _, err := peer.readLine(5 * time.Second)
		if err != nil || !strings.HasPrefix(line, `{"cmd":"NODE_HANDLE"`) {
			result <- "first line: " + line
			return
		}
		// Nothing else may arrive while the handle is unacknowledged.
		if extra, _, err := peer.readLine(200 * time.Millisecond); err == nil {
			result <- "got a line before ACK: " + extra
			return
		}
		peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
		line, _, err = peer.readLine(5 * time.Second)
		if err != nil || line != `{"plain":true}` {
			result <- "after ACK: " + line
			return
		}
		result <- ""
	}()
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	sent := make(chan error, 1)
	go func() { sent <- ch.SendHandle(context.Background(), "net.Native", 1, b) }()
	time.Sleep(50 * time.Millisecond)
	if err := ch.Send(map[string]bool{"plain": true}); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if r := <-result; r != "" {
		t.Fatal(r)
	}
}

func TestRecvParsesAndConsumesAcks(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	peer.write(`{"cmd":"NODE_HANDLE_ACK"}` + "\n\n" + `{"type":"sticky:connection","data":"abc","seq":3,"ack":1.5}` + "\n" + `[1,2]` + "\n")
	m, err := ch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != "sticky:connection" || m.Data != "abc" || m.Seq == nil || *m.Seq != 3 || m.Ack != nil {
		t.Fatalf("got %+v", m)
	}
	if m, err = ch.Recv(); err != nil || string(m.Raw) != "[1,2]" {
		t.Fatalf("got %+v %v", m, err)
	}
	peer.uc.Close()
	if _, err := ch.Recv(); err != io.EOF {
		t.Fatalf("Recv at EOF: %v", err)
	}
}

func TestChildHandleIsAckedAndClosed(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	raw, _ := b.SyscallConn()
	raw.Control(func(fd uintptr) {
		peer.uc.WriteMsgUnix([]byte(`{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"hi":1}}`+"\n"), unix.UnixRights(int(fd)), nil)
	})
	line, _, err := peer.readLine(5 * time.Second)
	if err != nil || line != `{"cmd":"NODE_HANDLE_ACK"}` {
		t.Fatalf("peer got %q %v", line, err)
	}
	m, err := ch.Recv()
	if err != nil || m.Cmd != "NODE_HANDLE" {
		t.Fatalf("got %+v %v", m, err)
	}
}

func TestLineTooLong(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{MaxLine: 1000})
	go peer.write(`{"ok":1}` + "\n" + strings.Repeat("x", 5000))
	if m, err := ch.Recv(); err != nil || string(m.Raw) != `{"ok":1}` {
		t.Fatalf("first: %+v %v", m, err)
	}
	if _, err := ch.Recv(); !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("Recv: %v, want ErrLineTooLong", err)
	}
	if err := ch.Send(1); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("Send: %v", err)
	}
}

func TestBadMessage(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{})
	peer.write("{not json\n")
	if _, err := ch.Recv(); !errors.Is(err, ErrBadMessage) {
		t.Fatalf("Recv: %v, want ErrBadMessage", err)
	}
	if err := ch.Send(func() {}); !errors.Is(err, ErrBadMessage) && !errors.Is(err, ErrClosed) {
		t.Fatalf("Send: %v", err)
	}
}

func TestSendHandleContextWhileWaitingForTurn(t *testing.T) {
	checkFDs(t)
	ch, peer := newFakeChannel(t, Config{AckTimeout: 2 * time.Second})
	go peer.readLine(5 * time.Second) // reads the first handle, never ACKs
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	first := make(chan error, 1)
	go func() { first <- ch.SendHandle(context.Background(), "net.Native", 1, b) }()
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := ch.SendHandle(ctx, "net.Native", 2, b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second SendHandle: %v, want deadline exceeded", err)
	}
	if err := <-first; !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("first SendHandle: %v, want ErrAckTimeout", err)
	}
}

func TestPreloadEnvQuoting(t *testing.T) {
	t.Setenv("NODE_OPTIONS", "--max-old-space-size=64")
	env := PreloadEnv(`/tmp/a b/"x".js`)
	if env[0] != `NODE_OPTIONS=--require "/tmp/a b/\"x\".js" --max-old-space-size=64` || env[1] != "STICKYD_NODEIPC=1" {
		t.Fatalf("got %q", env)
	}
	if !strings.Contains(PreloadScript(), "sticky-ready") {
		t.Fatal("preload script not embedded")
	}
}

func FuzzReadLines(f *testing.F) {
	f.Add([]byte("{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"a\":1}\npartial"), uint8(3), uint8(16))
	f.Add([]byte("\n\n\n"), uint8(1), uint8(1))
	f.Add(bytes.Repeat([]byte("x"), 300), uint8(7), uint8(64))
	f.Fuzz(func(t *testing.T, data []byte, chunk, maxLine uint8) {
		limit := int(maxLine) + 1
		step := int(chunk) + 1
		lr := lineReader{max: limit}
		var got [][]byte
		var err error
		for off := 0; off < len(data) && err == nil; off += step {
			end := min(off+step, len(data))
			err = lr.push(data[off:end], func(line []byte) error {
				if len(line) > limit {
					t.Fatalf("line of %d bytes passed the %d limit", len(line), limit)
				}
				got = append(got, append([]byte(nil), line...))
				parseMessage(line) // must not panic
				return nil
			})
			if len(lr.buf) > limit || cap(lr.buf) > max(64<<10, 2*limit+step) {
				t.Fatalf("buffer grew to len %d cap %d (limit %d)", len(lr.buf), cap(lr.buf), limit)
			}
		}
		// Reference: split on '\n'; complete lines only.
		parts := bytes.Split(data, []byte("\n"))
		complete := parts[:len(parts)-1]
		tooLong := false
		for _, p := range parts {
			if len(p) > limit {
				tooLong = true
			}
		}
		if err != nil {
			if !errors.Is(err, ErrLineTooLong) || !tooLong {
				t.Fatalf("unexpected error %v (tooLong=%v)", err, tooLong)
			}
			return
		}
		if tooLong {
			t.Fatalf("no error although a line exceeds %d", limit)
		}
		if len(got) != len(complete) {
			t.Fatalf("got %d lines, want %d", len(got), len(complete))
		}
		for i := range got {
			if !bytes.Equal(got[i], complete[i]) {
				t.Fatalf("line %d: %q want %q", i, got[i], complete[i])
			}
		}
	})
}
