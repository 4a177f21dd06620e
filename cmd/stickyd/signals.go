//go:build unix

package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// forceExitAfter is how long the process may take to stop after a second SIGINT/SIGTERM
// before it exits without finishing its cleanup.
const forceExitAfter = 10 * time.Second

// shutdownContext is cancelled by the first SIGINT or SIGTERM: a graceful stop. A second
// signal means "now": runEdge hears it too (it kills the workers' process groups and stops
// waiting), and should the process still be running forceExitAfter later, or on a third
// signal, it exits at once. signal.NotifyContext alone would swallow every signal after
// the first.
func shutdownContext() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 3)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		cancel()
		<-sigs
		select {
		case <-sigs:
			fmt.Fprintln(os.Stderr, "stickyd: third signal: exiting now")
		case <-time.After(forceExitAfter):
			fmt.Fprintf(os.Stderr, "stickyd: still stopping %v after the second signal: exiting now\n", forceExitAfter)
		}
		os.Exit(1)
	}()
	return ctx, func() { signal.Stop(sigs); cancel() }
}
