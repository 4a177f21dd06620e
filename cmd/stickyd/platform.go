//go:build unix

package main

import (
	"errors"
	"fmt"
)

// errNeedsLinux means an edge mode was asked for on a system that cannot hand
// connections to worker processes.
var errNeedsLinux = errors.New("needs Linux")

// modeSupported reports whether the edge mode can run on goos (runtime.GOOS). run,
// serve and demo hand each accepted connection to a worker process over SCM_RIGHTS and
// rely on Linux socket options on the way (SOCK_SEQPACKET control channels, SIOCINQ,
// TCP_DEFER_ACCEPT, SO_PEERCRED, memfd for the upgrade, /proc for Node workers): they
// stop at once elsewhere, naming the alternatives, instead of failing half-way. proxy
// dials its backends by address and works on every Unix system.
func modeSupported(mode, goos string) error {
	switch mode {
	case "run", "serve", "demo":
		if goos == "linux" {
			return nil
		}
		return fmt.Errorf("%s %w: it hands connections to worker processes (SCM_RIGHTS + Linux socket options), "+
			"and this is %s. Use `stickyd proxy -backend HOST:PORT …` in front of servers that listen themselves, "+
			"or run stickyd %s in a Linux container or VM", mode, errNeedsLinux, goos, mode)
	}
	return nil
}
