//go:build unix

package main

import (
	"context"
	"fmt"
	"time"

	"github.com/stickyd/stickyd/balancer/handover"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// handoverFormat is the handover state format this binary reads and writes; `stickyd
// version` prints it for the preflight of an edge upgrading to this binary.
const handoverFormat = handover.Format

// runUpgrade asks a running edge to upgrade itself and waits (until ctx ends) for the
// new image to answer with a higher generation.
func runUpgrade(ctx context.Context, c *adminClient) error {
	st, err := c.edgeStatus(ctx)
	if err != nil {
		return err
	}
	if _, err := c.post(ctx, "/admin/upgrade"); err != nil {
		return err
	}
	// Nothing signals the new image's arrival across processes: ask until it answers.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("upgrade: the edge at %s did not come back with a generation above %d within -timeout %v: see its log (a failed upgrade leaves the old image serving)", c.base, st.Generation, c.timeout)
		case <-tick.C:
		}
		// Errors are expected while the new image starts; a wrong answer is not.
		if now, err := c.edgeStatus(ctx); err == nil && now.Generation > st.Generation {
			fmt.Fprintf(c.stdout, "edge upgraded: generation %d, version %s\n", now.Generation, now.Version)
			return nil
		}
	}
}

// handoverFormatOf reads the "handover=N" a binary's version output names (1 if absent).
func handoverFormatOf(versionOutput string) int { return handover.FormatOf(versionOutput) }
