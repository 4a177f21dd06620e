//go:build unix

package main

import (
	"strings"
	"testing"
	"time"
)

func TestPoolFlag(t *testing.T) {
	var l poolList
	if err := l.Set("reports:path=/reports/,min=0,max=8,concurrency=1,idle=45s"); err != nil {
		t.Fatal(err)
	}
	// A config file's list or STICKYD_POOL arrives comma-joined: a key part holding ":"
	// starts the next pool, a header value's ":" does not.
	if err := l.Set("live:header=X-Pool:live,queue=5,queue-timeout=2s, admin:host=Admin.example.com,cmd=node admin.js"); err != nil {
		t.Fatal(err)
	}
	if len(l) != 3 {
		t.Fatalf("%d pools: %+v", len(l), l)
	}
	r, live, admin := l[0], l[1], l[2]
	if r.name != "reports" || r.path != "/reports/" || r.min != 0 || r.max != 8 || r.concurrency != 1 || r.idle != 45*time.Second {
		t.Errorf("reports: %+v", r)
	}
	if live.header != "X-Pool" || live.headerVal != "live" || live.queue != 5 || live.queueTimeout != 2*time.Second || live.idle != 30*time.Second {
		t.Errorf("live: %+v", live)
	}
	if admin.host != "admin.example.com" || strings.Join(admin.command, " ") != "node admin.js" {
		t.Errorf("admin: %+v", admin)
	}
	// String round-trips.
	var again poolList
	if err := again.Set(l.String()); err != nil || again.String() != l.String() {
		t.Errorf("round trip: %v\n%s\n%s", err, l.String(), again.String())
	}

	for _, bad := range []struct{ in, want string }{
		{"path=/x/", "starts with its name"},
		{"Reports:path=/x/", "pool name"},
		{"default:path=/x/", "pool name"},
		{"r:max=3", "matches no request"},
		{"r:path=x", "starts with /"},
		{"r:path=/x/,min=4,max=2", "over max"},
		{"r:path=/x/,max=0", "from 1"},
		{"r:path=/x/,idle=soon", "duration"},
		{"r:path=/x/,colour=red", "unknown key"},
		{"r:path=/x/,max=2,max=3", "twice"},
		{"r:path=/x/,r:path=/y/", "given twice"},
	} {
		var l poolList
		if err := l.Set(bad.in); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("-pool %q: error %v, want one saying %q", bad.in, err, bad.want)
		}
	}

	var p poolList
	p.Set("r:path=/r/,backend=127.0.0.1:1,backend=127.0.0.1:2")
	if len(p[0].backends) != 2 {
		t.Errorf("backends %v", p[0].backends)
	}
	if err := checkPools("run", p); err == nil || !strings.Contains(err.Error(), "backend= is for stickyd proxy") {
		t.Errorf("run with backend=: %v", err)
	}
	if err := checkPools("proxy", p); err != nil {
		t.Errorf("proxy with backend=: %v", err)
	}
	var q poolList
	q.Set("r:path=/r/")
	if err := checkPools("proxy", q); err == nil || !strings.Contains(err.Error(), "names its backends") {
		t.Errorf("proxy without backend=: %v", err)
	}
}
