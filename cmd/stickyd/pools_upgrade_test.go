//go:build unix

package main

import (
	"encoding/json"
	"net/http"
	"syscall"
	"testing"
	"time"
)

// A named pool goes through an edge upgrade (its workers are handed over, same pids),
// a rolling restart (SIGHUP restarts its workers too) and SIGTERM (they stop) like the
// default pool.
func TestPoolsAcrossEdgeUpgradeRollingRestartAndStop(t *testing.T) {
	d := startDaemon(t, "", "demo", "-workers", "1", "-pool", "reports:header=X-Pool:reports,min=1,max=2,idle=1m")
	whoami := func(pool bool) int {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+d.addr+"/whoami", nil)
		if pool {
			req.Header.Set("X-Pool", "reports")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v struct{ PID int }
		json.NewDecoder(resp.Body).Decode(&v)
		return v.PID
	}
	pids := func() (def, pool int) {
		for _, w := range d.workers(t) {
			switch w.Slot {
			case 0:
				def = w.PID
			case 1:
				pool = w.PID
			}
		}
		return def, pool
	}
	waitFor(t, "the default worker and the pool's min=1 worker", 20*time.Second, func() bool { a, b := pids(); return a > 0 && b > 0 })
	def0, pool0 := pids()
	if got := whoami(true); got != pool0 {
		t.Fatalf("a pool request went to pid %d, want the pool's worker %d", got, pool0)
	}
	if got := whoami(false); got != def0 {
		t.Fatalf("a default request went to pid %d, want %d", got, def0)
	}

	d.signal(syscall.SIGUSR2)
	waitFor(t, "generation 1", 20*time.Second, func() bool { return d.generation() == 1 })
	// The new image lists the workers it adopted a moment after it reports its generation.
	waitFor(t, "the new image to list its workers", 20*time.Second, func() bool { a, b := pids(); return a > 0 && b > 0 })
	if a, b := pids(); a != def0 || b != pool0 {
		t.Fatalf("after the edge upgrade: workers %d, %d; want the same processes %d, %d", a, b, def0, pool0)
	}
	if got := whoami(true); got != pool0 {
		t.Fatalf("after the upgrade a pool request went to pid %d, want %d", got, pool0)
	}

	d.signal(syscall.SIGHUP)
	waitFor(t, "the rolling restart to replace both workers", 30*time.Second, func() bool {
		a, b := pids()
		return a > 0 && b > 0 && a != def0 && b != pool0
	})
	_, pool1 := pids()
	if got := whoami(true); got != pool1 {
		t.Fatalf("after the rolling restart a pool request went to pid %d, want %d", got, pool1)
	}

	d.signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("stickyd did not stop")
	}
	for _, pid := range []int{pool0, pool1} {
		waitFor(t, "the pool's workers to be gone", 5*time.Second, func() bool { return !alive(pid) })
	}
}
