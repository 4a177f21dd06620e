//go:build unix

package main

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestProxyEdgeUpgrade: an in-place upgrade of `stickyd proxy`. The backends have no
// descriptors to hand over: the new image dials them again, in the same slots, so the
// sessions it inherits stay where they were, and a long-poll in flight on a backend
// connection goes over like any other. Tunnels (WebSockets) do not: the freeze closes
// them at once — bounded, instead of holding the upgrade for its grace period — and
// their clients reconnect.
func TestProxyEdgeUpgrade(t *testing.T) {
	upgrade := func(t *testing.T, d *daemon, gen int) time.Duration {
		t.Helper()
		start := time.Now()
		out, err := exec.Command(stickydBinary(t), "upgrade", "-url", "http://"+d.metrics).CombinedOutput()
		if err != nil || !strings.Contains(string(out), fmt.Sprintf("generation %d", gen)) {
			t.Fatalf("upgrade %d: %v %s\nlogs:\n%s", gen, err, out, d.logs.String())
		}
		return time.Since(start)
	}

	t.Run("long-polls", func(t *testing.T) {
		nodeFixtures(t)
		args := []string{"proxy"}
		for i := range 2 {
			port := sioFreePort(t)
			startNodeBackend(t, i, port)
			args = append(args, "-backend", "127.0.0.1:"+strconv.Itoa(port))
		}
		d := startDaemon(t, "", args...)
		proxyWaitBackends(t, d, 2, 30*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		// socket.io sessions over long-polling only, held across two upgrades.
		run := startClients(t, ctx, sioClientArgs(d, "--clients", "40", "--transports", "polling", "--hold-ms", "6000")...)
		sioWaitEvent(t, run, "holding", 2*time.Minute)
		for gen := 1; gen <= 2; gen++ {
			t.Logf("upgrade %d with 40 sessions long-polling took %v", gen, upgrade(t, d, gen).Round(time.Millisecond))
		}
		res, err := run.Wait()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("clients.js: %s", res.Raw)
		if !res.AllOK() || res.SessionUnknown != 0 || res.WorkerChanged != 0 {
			t.Fatalf("polling sessions across two edge upgrades: %s", res.Raw)
		}
		proxyWaitBackends(t, d, 2, 30*time.Second)
		res = runClients(t, ctx, sioClientArgs(d, "--clients", "20", "--expect-upgrade")...)
		checkAllClientsOK(t, res, true, false)
	})

	t.Run("tunnels", func(t *testing.T) {
		args := []string{"proxy"}
		for i := range 2 {
			args = append(args, "-backend", wsBackend(t, i))
		}
		d := startDaemon(t, "", args...)
		proxyWaitBackends(t, d, 2, 30*time.Second)
		const tunnels = 50
		closed := make(chan time.Time, tunnels)
		for range tunnels {
			c, _, err := websocket.DefaultDialer.Dial("ws://"+d.addr+"/ws", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var h struct{ Type, Worker string }
			if err := c.ReadJSON(&h); err != nil {
				t.Fatal(err)
			}
			go func() {
				c.SetReadDeadline(time.Now().Add(time.Minute))
				for {
					if _, _, err := c.ReadMessage(); err != nil {
						closed <- time.Now()
						return
					}
				}
			}()
		}
		start := time.Now()
		took := upgrade(t, d, 1)
		var last time.Time
		for range tunnels {
			select {
			case at := <-closed:
				last = at
			case <-time.After(30 * time.Second):
				t.Fatal("a tunnel is still open 30 s after the upgrade: tunnels must end with the freeze")
			}
		}
		t.Logf("upgrade with %d tunnels took %v; the last tunnel closed %v after it started", tunnels, took.Round(time.Millisecond), last.Sub(start).Round(time.Millisecond))
		proxyWaitBackends(t, d, 2, 30*time.Second)
		// The new image dialed the backends again and tunnels new WebSockets to them.
		per := openRawWebSockets(t, d.addr, 20)
		if len(per) != 2 {
			t.Errorf("after the upgrade 20 WebSockets reached %v, want both backends", per)
		}
	})
}
