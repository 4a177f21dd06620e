//go:build !unix

// stickybench drives stickyd, nginx, HAProxy and Node servers as Unix processes and reads
// their numbers from /proc; on other systems it says where to run it instead.
package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	fmt.Fprintf(os.Stderr, "stickybench: needs a Unix system (Linux for the comparisons and memory figures), "+
		"and this is %s: run it under WSL2 or in a Linux container\n", runtime.GOOS)
	os.Exit(1)
}
