//go:build unix

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	for _, tc := range []struct {
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{nil, 50, 0},
		{ms(7), 50, 7 * time.Millisecond},
		{ms(7), 99, 7 * time.Millisecond},
		{ms(1, 2), 50, 1 * time.Millisecond},
		{ms(1, 2, 3), 50, 2 * time.Millisecond},
		{ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{ms(1, 2, 3, 4), 75, 3 * time.Millisecond},
		{ms(1, 2, 3, 4), 100, 4 * time.Millisecond},
		{ms(1, 2, 3, 4), 0, 1 * time.Millisecond},
		{hundred, 50, 50 * time.Millisecond},
		{hundred, 99, 99 * time.Millisecond},
		{hundred, 99.5, 100 * time.Millisecond},
		{hundred, 1, 1 * time.Millisecond},
	} {
		if got := percentile(tc.in, tc.p); got != tc.want {
			t.Errorf("percentile(%v, %v) = %v, want %v", tc.in, tc.p, got, tc.want)
		}
	}
	// p99 of 1000 samples: the 990th smallest.
	th := make([]time.Duration, 1000)
	for i := range th {
		th[i] = time.Duration(i + 1)
	}
	if got := percentile(th, 99); got != 990 {
		t.Errorf("p99 of 1..1000 = %v, want 990", got)
	}
	if got := summarize(ms(1, 2, 3)); got.P50ms != 2 || got.Maxms != 3 {
		t.Errorf("summarize = %+v", got)
	}
}

func TestSlopeAndSteps(t *testing.T) {
	if got := slope(5000, 100_000, 10000, 190_000); got != 18 {
		t.Errorf("slope = %v, want 18", got)
	}
	if got := slope(5, 1, 5, 9); got != 0 {
		t.Errorf("slope with equal x = %v", got)
	}
	s, err := parseSteps("5000, 10000")
	if err != nil || len(s) != 2 || s[0] != 5000 || s[1] != 10000 {
		t.Errorf("parseSteps = %v, %v", s, err)
	}
	for _, bad := range []string{"10000,5000", "0", "x", "5,5"} {
		if _, err := parseSteps(bad); err == nil {
			t.Errorf("parseSteps(%q) accepted", bad)
		}
	}
}

func TestParseOpenSid(t *testing.T) {
	sid, err := parseOpenSid([]byte(`0{"sid":"dLpui65lN8Yt_VXIAAAA","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":2000000}`))
	if err != nil || sid != "dLpui65lN8Yt_VXIAAAA" {
		t.Errorf("got %q, %v", sid, err)
	}
	// Further packets after the record separator are ignored.
	sid, err = parseOpenSid([]byte("0{\"sid\":\"abc\"}\x1e40{\"sid\":\"zzz\"}"))
	if err != nil || sid != "abc" {
		t.Errorf("with trailing packets: %q, %v", sid, err)
	}
	for _, bad := range []string{
		``, `0`, `{"sid":"x"}`, `4{"sid":"x"}`, `0{"sid":""}`, `0{"upgrades":[]}`, `0{"sid":`,
		`{"code":1,"message":"Session ID unknown"}`,
	} {
		if sid, err := parseOpenSid([]byte(bad)); err == nil {
			t.Errorf("parseOpenSid(%q) = %q, want error", bad, sid)
		}
	}
	if got := splitPackets([]byte("40{\"sid\":\"a\"}\x1e42[\"hello\"]")); len(got) != 2 || got[1] != `42["hello"]` {
		t.Errorf("splitPackets = %q", got)
	}
}

func TestCheckLoopback(t *testing.T) {
	for _, ok := range []string{"127.0.0.1", "127.0.0.8", "127.255.255.254", "::1", "localhost", "LOCALHOST", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1"} {
		if err := checkLoopback(ok); err != nil {
			t.Errorf("checkLoopback(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "10.0.0.1", "128.0.0.1", "0.0.0.0", "::", "::2", "example.com", "localhost.example.com", "127.0.0.1.nip.io", "192.168.1.1"} {
		if err := checkLoopback(bad); err == nil {
			t.Errorf("checkLoopback(%q) accepted", bad)
		}
	}
	for _, tc := range []struct {
		url     string
		sources int
		ok      bool
	}{
		{"ws://127.0.0.1:8080/ws", 8, true},
		{"ws://localhost:8080/ws", 8, true},
		{"ws://[::1]:8080/ws", 1, true},
		{"ws://[::1]:8080/ws", 8, false}, // 127.0.0.x sources need an IPv4 target
		{"ws://10.1.2.3:8080/ws", 1, false},
		{"http://127.0.0.1:8080/ws", 1, false}, // wrong scheme for a ws mode
		{"ws://127.0.0.1:8080/ws", 0, false},
	} {
		cm := common{url: tc.url, sources: tc.sources, timeout: time.Second}
		if _, err := cm.check("ws", "wss"); (err == nil) != tc.ok {
			t.Errorf("check(%s, sources %d) = %v, want ok=%v", tc.url, tc.sources, err, tc.ok)
		}
	}
}

func TestHelloWorker(t *testing.T) {
	if got := helloWorker([]byte(`{"type":"hello","worker":"3","pid":42}`)); got != "3" {
		t.Errorf("got %q", got)
	}
	if got := helloWorker([]byte(`{"type":"hello","pid":42}`)); got != "pid:42" {
		t.Errorf("got %q", got)
	}
	if got := helloWorker([]byte(`not json`)); got != "?" {
		t.Errorf("got %q", got)
	}
}

func TestParseVmRSS(t *testing.T) {
	got, err := parseVmRSS([]byte("Name:\tx\nVmPeak:\t  9999 kB\nVmRSS:\t   12345 kB\nThreads: 4\n"))
	if err != nil || got != 12345 {
		t.Errorf("got %d, %v", got, err)
	}
	if _, err := parseVmRSS([]byte("Name: x\n")); err == nil {
		t.Error("no VmRSS accepted")
	}
}

// TestModesAgainstEchoServer runs handshake and echo (and a tiny idle) for a handful of
// connections against an in-process gorilla echo server with the demo worker's /ws.
func TestModesAgainstEchoServer(t *testing.T) {
	h, _ := echoHandler("t")
	srv := httptest.NewServer(h)
	defer srv.Close()
	u := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var out bytes.Buffer
	if err := runHandshake(ctx, []string{"-q", "-url", u, "-n", "20", "-c", "4", "-sources", "2"}, &out); err != nil {
		t.Fatal(err)
	}
	var hs handshakeResult
	if err := json.Unmarshal(out.Bytes(), &hs); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if hs.Mode != "handshake" || hs.OK != 20 || hs.Errors != 0 || hs.Rate <= 0 || hs.P99ms < hs.P50ms || hs.Workers["t"] != 20 {
		t.Errorf("handshake result %+v", hs)
	}

	out.Reset()
	if err := runEcho(ctx, []string{"-q", "-url", u, "-c", "3", "-m", "25", "-size", "100"}, &out); err != nil {
		t.Fatal(err)
	}
	var ec echoResult
	if err := json.Unmarshal(out.Bytes(), &ec); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if ec.Mode != "echo" || ec.Connected != 3 || ec.Messages != 75 || ec.Errors != 0 || ec.Rate <= 0 || ec.P50ms <= 0 {
		t.Errorf("echo result %+v", ec)
	}

	out.Reset()
	if err := runEcho(ctx, []string{"-q", "-url", u, "-c", "2", "-d", "200ms", "-binary"}, &out); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(out.Bytes(), &ec); err != nil || ec.Messages == 0 || ec.Errors != 0 {
		t.Errorf("echo -d result %+v, %v", ec, err)
	}

	// idle against our own process: RSS/fd sampling plumbing, slope fields present.
	out.Reset()
	if err := runIdle(ctx, []string{"-q", "-url", u, "-n", "10", "-steps", "4,10", "-settle", "0s", "-pid", "self"}, &out); err == nil {
		t.Error("-pid self accepted")
	}
	out.Reset()
	if err := runIdle(ctx, []string{"-q", "-url", u, "-n", "10", "-steps", "4,10", "-settle", "0s", "-pid", pidString()}, &out); err != nil {
		t.Fatal(err)
	}
	var id idleResult
	if err := json.Unmarshal(out.Bytes(), &id); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	// Client and server live in this process: 2 fds per held connection.
	if id.Held != 10 || id.Alive != 10 || len(id.Steps) != 2 || id.FDsPerConn != 2 || id.NofileSoft == 0 {
		t.Errorf("idle result %+v", id)
	}
}

func TestRefusals(t *testing.T) {
	ctx := context.Background()
	var out bytes.Buffer
	for _, args := range [][]string{
		{"-url", "ws://127.0.0.1:1/ws"},                       // no -n
		{"-url", "ws://192.0.2.1:80/ws", "-n", "1"},           // not loopback
		{"-url", "ws://example.com/ws", "-n", "1"},            // not loopback
		{"-url", "ws://127.0.0.1:1/ws", "-n", "1", "-c", "0"}, // bad -c
	} {
		if err := runHandshake(ctx, append([]string{"-q"}, args...), &out); err == nil {
			t.Errorf("handshake %v accepted", args)
		}
	}
	if err := runEcho(ctx, []string{"-q", "-url", "ws://127.0.0.1:1/ws"}, &out); err == nil {
		t.Error("echo without -m or -d accepted")
	}
	if err := runPolling(ctx, []string{"-q", "-url", "http://127.0.0.1:1/socket.io/"}, &out); err == nil {
		t.Error("polling without -d accepted")
	}
	soft, _ := nofile()
	if err := runIdle(ctx, []string{"-q", "-url", "ws://127.0.0.1:1/ws", "-n", strconvU(soft)}, &out); err == nil || !strings.Contains(err.Error(), "open-file limit") {
		t.Errorf("idle -n soft limit: %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("refused runs printed %q", out.String())
	}
}

func pidString() string { return strconvU(uint64(os.Getpid())) }

func strconvU(v uint64) string { return strconv.FormatUint(v, 10) }
