//go:build unix

package main

import (
	"strings"
	"testing"
	"time"
)

func TestVerdict(t *testing.T) {
	v := verdict(3000, 2500, 1000, 0)
	if !v.HAProxyMet || !v.StickyMet || !v.ErrorsOK || v.VsHAProxy != 1.2 || v.VsSticky != 3 {
		t.Errorf("%+v", v)
	}
	v = verdict(2000, 2500, 1000, 3)
	if v.HAProxyMet || v.StickyMet || v.ErrorsOK {
		t.Errorf("%+v", v)
	}
	v = verdict(2000, 0, 0, 0) // neither measured
	if v.HAProxyMet || v.StickyMet || v.VsHAProxy != 0 || v.VsSticky != 0 {
		t.Errorf("%+v", v)
	}
}

func TestPollTargetList(t *testing.T) {
	got, err := pollTargetList(" direct, stickyd ,sticky,")
	if err != nil || strings.Join(got, ",") != "direct,stickyd,sticky" {
		t.Errorf("%v %v", got, err)
	}
	if _, err := pollTargetList("direct,envoy"); err == nil {
		t.Error("unknown target accepted")
	}
	if _, err := pollTargetList(","); err == nil {
		t.Error("empty list accepted")
	}
}

func TestPollingConfigs(t *testing.T) {
	be := []string{"127.0.0.1:1001", "127.0.0.1:1002"}
	h := haproxyPollingConf("127.0.0.1:9", be)
	for _, want := range []string{"nbthread 2", "mode http", "option http-keep-alive", "balance source", "bind 127.0.0.1:9", "server n1 127.0.0.1:1002"} {
		if !strings.Contains(h, want) {
			t.Errorf("haproxy config lacks %q:\n%s", want, h)
		}
	}
	n := nginxPollingConf("/tmp/x", "127.0.0.1:9", be, false)
	for _, want := range []string{"worker_processes 2;", "ip_hash;", "keepalive 64;", "proxy_http_version 1.1;", "listen 127.0.0.1:9;", "server 127.0.0.1:1001;", `"" "";`} {
		if !strings.Contains(n, want) {
			t.Errorf("nginx config lacks %q:\n%s", want, n)
		}
	}
	if c := nginxPollingConf("/tmp/x", "127.0.0.1:9", be, true); !strings.Contains(c, "hash $remote_addr consistent;") || strings.Contains(c, "ip_hash") {
		t.Errorf("nginx-hash config:\n%s", c)
	}
}

func TestIsSessionUnknown(t *testing.T) {
	if !isSessionUnknown(400, []byte(`{"code":1,"message":"Session ID unknown"}`)) {
		t.Error("engine.io's error not recognised")
	}
	if isSessionUnknown(200, []byte("Session ID unknown")) || isSessionUnknown(400, []byte(`{"code":3,"message":"Bad request"}`)) {
		t.Error("false positive")
	}
}

func TestClassifyLossesAndHTTP(t *testing.T) {
	t0 := time.Unix(1000, 0)
	kills := []killEvent{{Slot: 0, PID: 10, At: t0}, {Slot: 1, PID: 11, At: t0.Add(10 * time.Second)}}
	losses := []lossEvent{
		{PID: 10, At: t0.Add(time.Second)},           // after its worker's kill: expected
		{PID: 11, At: t0.Add(11 * time.Second)},      // expected
		{PID: 11, At: t0.Add(5 * time.Second)},       // before pid 11 was killed: unexpected
		{PID: 12, At: t0.Add(time.Second), Err: "x"}, // never killed: unexpected
	}
	exp, unexp, samples := classifyLosses(losses, kills)
	if exp != 2 || unexp != 2 || len(samples) != 2 || !strings.Contains(samples[1], "pid 12") {
		t.Errorf("expected %d unexpected %d samples %q", exp, unexp, samples)
	}
	fails := []httpFailure{
		{Stream: 0, LastPID: 10, At: t0.Add(30 * time.Millisecond)},
		{Stream: 1, LastPID: 11, At: t0.Add(10*time.Second + 80*time.Millisecond)},
		{Stream: 2, LastPID: 12, At: t0.Add(time.Second)},  // its worker was not killed
		{Stream: 3, LastPID: 0, At: t0.Add(time.Second)},   // never had a success
		{Stream: 4, LastPID: 10, At: t0.Add(-time.Second)}, // before the kill
	}
	by, other, win, fs := classifyHTTP(fails, kills)
	if by != 2 || other != 3 || win != 80*time.Millisecond || len(fs) != 3 {
		t.Errorf("by kill %d other %d window %v samples %q", by, other, win, fs)
	}
}

func TestProbeStats(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var s []probeSample
	for i := range 100 {
		s = append(s, probeSample{At: t0.Add(time.Duration(i) * 10 * time.Millisecond), Latency: time.Millisecond})
	}
	s[50].Latency = 40 * time.Millisecond // inside the window
	s[51].Err = "reset"
	s[90].Latency = 20 * time.Millisecond // outside: part of the baseline
	base, maxIn, failed := probeStats(s, []window{{t0.Add(495 * time.Millisecond), t0.Add(520 * time.Millisecond)}})
	if failed != 1 || len(maxIn) != 1 || maxIn[0] != 40*time.Millisecond || base.P50ms != 1 || base.Maxms != 20 {
		t.Errorf("base %+v maxIn %v failed %d", base, maxIn, failed)
	}
}

func TestAdminState(t *testing.T) {
	st := &adminState{Workers: []adminWorker{{Slot: 0, PID: 30, State: "ready"}, {Slot: 1, PID: 20, State: "starting"}}}
	if st.allReady(2) || st.allReady(1) {
		t.Error("not all ready")
	}
	st.Workers[1].State = "ready"
	if !st.allReady(2) {
		t.Error("all ready")
	}
	if p := st.workerPIDs(); len(p) != 2 || p[0] != 20 || p[1] != 30 {
		t.Errorf("pids %v", p)
	}
	if w, ok := st.slot(1); !ok || w.PID != 20 {
		t.Errorf("slot 1: %+v %v", w, ok)
	}
	if _, ok := st.slot(7); ok {
		t.Error("slot 7 found")
	}
	if helloPID([]byte(`{"type":"hello","worker":"1","pid":42}`)) != 42 || helloPID([]byte(`{"type":"x","pid":42}`)) != 0 {
		t.Error("helloPID")
	}
}
