//go:build !unix

// stickyd is built from Unix code only (it hands sockets between processes and speaks
// the Unix socket API); on other systems the binary says where to run it instead.
package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	fmt.Fprintf(os.Stderr, "stickyd: needs a Unix system (Linux for every mode; macOS or FreeBSD for stickyd proxy), "+
		"and this is %s: run it under WSL2 or in a Linux container (deploy/Dockerfile)\n", runtime.GOOS)
	os.Exit(1)
}
