//go:build unix

// Package platform moved to github.com/stickyd/stickyd/fdpass/platform. What is left here
// forwards the names its last importers use until they switch (then this goes).
package platform

import "github.com/stickyd/stickyd/fdpass/platform"

// PollRDHUP is platform.PollRDHUP.
const PollRDHUP = platform.PollRDHUP

// SIOCINQ is platform.SIOCINQ.
const SIOCINQ = platform.SIOCINQ

// Socketpair is platform.Socketpair.
func Socketpair(typ int) ([2]int, error) { return platform.Socketpair(typ) }
