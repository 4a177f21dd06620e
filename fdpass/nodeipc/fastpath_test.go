//go:build unix

package nodeipc

import (
	"bytes"
	"context"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHandleLineMatchesJSON: the precomputed NODE_HANDLE lines are byte for byte what
// json.Marshal writes, whatever the key, type or id (escaping included), also when the
// key changes between handoffs (the app server was replaced).
func TestHandleLineMatchesJSON(t *testing.T) {
	var hc handleCache
	var buf []byte
	msgs := []struct {
		typ string
		msg any
	}{
		{"net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "::3000:4:-1", Seq: 1}},
		{"net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "::3000:4:-1", Seq: 123456789}},
		{"net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "/tmp/a<b>&\"c\"\\ü\u2028.sock", Seq: -7}},
		{"net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "::3000:4:-1", Seq: 0}},
		{"net.Socket", stickyConnMsg{Type: "sticky:connection", Data: "", ConnectionID: "0123456789abcdef"}},
		{"net.Socket", stickyConnMsg{Type: "sticky:connection", Data: "", ConnectionID: "fedcba9876543210"}},
		{"net.Socket", stickyConnMsg{Type: "sticky:connection", Data: "GET / HTTP/1.1", ConnectionID: "<x>\"\\"}},
		{"net.Socket", stickyConnMsg{Type: "sticky:connection", Data: "", ConnectionID: ""}},
		{"net.Native", map[string]any{"cmd": "NODE_CLUSTER", "seq": 3}},
	}
	for round := range 2 {
		for i, m := range msgs {
			want, err := marshalLine(handleEnvelope{Cmd: "NODE_HANDLE", Type: m.typ, Msg: m.msg})
			if err != nil {
				t.Fatal(err)
			}
			got, err := hc.appendLine(buf[:0], m.typ, m.msg)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("round %d message %d:\n got %s\nwant %s", round, i, got, want)
			}
			buf = got
		}
	}
}

func sameMessage(a, b Message) bool {
	ip := func(p *int) any {
		if p == nil {
			return nil
		}
		return *p
	}
	return bytes.Equal(a.Raw, b.Raw) && a.Cmd == b.Cmd && a.Act == b.Act && a.Type == b.Type && a.Data == b.Data &&
		reflect.DeepEqual(ip(a.Seq), ip(b.Seq)) && reflect.DeepEqual(ip(a.Ack), ip(b.Ack))
}

// FuzzParseMessage: the decoder without reflection agrees with encoding/json on every line,
// and takes the fast path for the lines Node sends every handoff.
func FuzzParseMessage(f *testing.F) {
	for _, s := range []string{
		`{"cmd":"NODE_HANDLE_ACK"}`, `{"cmd":"NODE_HANDLE_NACK"}`,
		`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":9}`,
		`{"cmd":"NODE_CLUSTER","act":"online","seq":0}`,
		`{"cmd":"NODE_CLUSTER","act":"listening","address":null,"port":3000,"addressType":4,"fd":-1,"backlog":511,"data":null,"seq":1}`,
		` { "CMD" : "x" , "Seq": 1.0, "ack": 1e3 } `, `{"cmd":"\u004eODE","seq":null,"ack":-0}`,
		`{"data":"ü","type":{"a":[1,"]}",{"b":"\\\""}]}}`, `{"seq":12345678901234567890}`, `{"ſeq":1}`,
		`[1,2]`, `"str"`, `{"a":1,}`, `{"cmd":"a","cmd":"b","seq":1,"seq":2}`, ``, `   `, `{}`, `{"x":{}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		if bytes.IndexByte(line, '\n') >= 0 {
			return // lines never contain one
		}
		want, werr := parseMessageSlow(line)
		got, gerr := parseMessage(line)
		if (werr == nil) != (gerr == nil) || !sameMessage(got, want) {
			t.Fatalf("%q: got %+v, %v; encoding/json %+v, %v", line, got, gerr, want, werr)
		}
		if m, ok := parseMessageFast(line); ok && !sameMessage(m, want) {
			t.Fatalf("%q: fast %+v, encoding/json %+v", line, m, want)
		}
	})
}

func TestParseMessageFastTakesNodeLines(t *testing.T) {
	for _, s := range []string{
		`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":9}`,
		`{"cmd":"NODE_CLUSTER","act":"online","seq":0}`,
		`{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"x"}}`,
	} {
		if _, ok := parseMessageFast([]byte(s)); !ok {
			t.Errorf("%s: not decoded by the fast path", s)
		}
	}
}

// ackingPeer answers every NODE_HANDLE line with an ACK, as a Node child does, reusing its
// buffers so that the measurement counts the channel's allocations.
func ackingPeer(tb testing.TB) (*Channel, func()) {
	a, b := unixPair(tb)
	ch := NewChannel(a, Config{AckTimeout: 5 * time.Second, Logger: testLogger(tb)})
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		oob := make([]byte, unix.CmsgSpace(4*4))
		ack := []byte(`{"cmd":"NODE_HANDLE_ACK"}` + "\n")
		rc, _ := b.SyscallConn()
		for {
			var n, oobn int
			var err error
			rerr := rc.Read(func(fd uintptr) bool {
				// No MSG_CMSG_CLOEXEC (Linux only): the rights are closed right below.
				n, oobn, _, _, err = unix.Recvmsg(int(fd), buf, oob, 0)
				return err != unix.EAGAIN
			})
			if rerr != nil || err != nil || n == 0 {
				return
			}
			if oobn > 0 {
				closeRights(oob[:oobn])
			}
			for range bytes.Count(buf[:n], []byte("NODE_HANDLE")) {
				if _, err := b.Write(ack); err != nil {
					return
				}
			}
		}
	}()
	return ch, func() { ch.Close(); b.Close(); <-done }
}

func closeRights(oob []byte) {
	msgs, _ := unix.ParseSocketControlMessage(oob)
	for i := range msgs {
		fds, _ := unix.ParseUnixRights(&msgs[i])
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}

// BenchmarkSendHandle: one newconn handle (the message Primary.Deliver sends) and its ACK
// from a peer that acks at once; allocs/op and ns/op are the channel's per handoff.
func BenchmarkSendHandle(b *testing.B) {
	ch, stop := ackingPeer(b)
	defer stop()
	_, conn := unixPair(b)
	ctx := context.Background()
	b.ReportAllocs()
	seq := 0
	for b.Loop() {
		seq++
		if err := ch.SendHandle(ctx, "net.Native", newconnMsg{Cmd: "NODE_CLUSTER", Act: "newconn", Key: "::3000:4:-1", Seq: seq}, conn); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseReply: the worker's newconn answer, decoded once per handoff.
func BenchmarkParseReply(b *testing.B) {
	line := []byte(`{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":9}`)
	b.ReportAllocs()
	for b.Loop() {
		m, err := parseMessage(line)
		if err != nil || m.Ack == nil {
			b.Fatal(err)
		}
	}
}
