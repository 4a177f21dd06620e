//go:build unix

package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"testing"
	"time"
)

// The demo's Go worker (fdpass.Handler) sees each client's own address on the requests
// the edge proxies to it over its kept-alive socketpairs (it saw "@" before).
func TestGoWorkerSeesClientAddress(t *testing.T) {
	r := startAdminRig(t, 1, time.Second)
	for _, src := range []string{"127.0.0.5", "127.0.0.6", "127.0.0.5"} {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		var local string
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				conn, err := d.DialContext(ctx, network, addr)
				if err == nil {
					local = conn.LocalAddr().String()
				}
				return conn, err
			},
		}}
		resp, err := c.Get("http://" + r.edge + "/whoami")
		if err != nil {
			t.Fatal(err)
		}
		var v struct{ Remote string }
		err = json.NewDecoder(resp.Body).Decode(&v)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if v.Remote != local {
			t.Fatalf("the worker saw %q for a request from %s", v.Remote, local)
		}
	}
}
