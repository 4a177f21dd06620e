//go:build unix

package nodeipc

import (
	_ "embed"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

// Env returns the environment entries for a Node child whose channel is at childFD:
// NODE_CHANNEL_FD, NODE_CHANNEL_SERIALIZATION_MODE=json and NODE_UNIQUE_ID (which makes the
// child a cluster worker: cluster.isWorker is true and server.listen asks the primary).
// Append them after the inherited environment (exec.Cmd uses the last value of a duplicate key).
// With exec.Cmd, ExtraFiles[i] is fd 3+i in the child.
func Env(childFD, uniqueID int) []string {
	return []string{
		"NODE_CHANNEL_FD=" + strconv.Itoa(childFD),
		"NODE_CHANNEL_SERIALIZATION_MODE=json",
		"NODE_UNIQUE_ID=" + strconv.Itoa(uniqueID),
	}
}

// WrappedEnv returns the environment entries for a Node app started through a wrapper (npm,
// yarn, pnpm, npx, nodemon, sh -c …) whose channel is at childFD. Node takes NODE_CHANNEL_FD
// at bootstrap, so the wrapper's own Node process would take the channel and the app would
// listen for real; these names are ignored by Node, and the preload (PreloadEnv) turns them
// into the channel and the cluster worker in the first process of the tree that is not one of
// those CLIs. The preload is required: without it the app sees no channel.
func WrappedEnv(childFD, uniqueID int) []string {
	return []string{
		"STICKYD_NODE_CHANNEL_FD=" + strconv.Itoa(childFD),
		"STICKYD_NODE_UNIQUE_ID=" + strconv.Itoa(uniqueID),
	}
}

//go:embed preload.js
var preloadJS string

// PreloadScript returns the JavaScript source of the preload (see preload.js): it reports
// {"cmd":"STICKYD","act":"sticky-ready"} when the app installs @socket.io/sticky's worker
// handler, and does nothing else. Write it to a file and pass PreloadEnv(path) to the child.
func PreloadScript() string { return preloadJS }

// PreloadEnv returns the environment entries that load the preload at path into a Node child:
// NODE_OPTIONS=--require "<path>" followed by this process's own NODE_OPTIONS, if any, and
// STICKYD_NODEIPC=1 (the preload acts only when it is set, and deletes it).
func PreloadEnv(path string) []string {
	opt := "--require " + quoteNodeOption(path)
	if prev := strings.TrimSpace(os.Getenv("NODE_OPTIONS")); prev != "" {
		opt += " " + prev
	}
	return []string{"NODE_OPTIONS=" + opt, "STICKYD_NODEIPC=1"}
}

// quoteNodeOption quotes a value for NODE_OPTIONS, which splits on spaces and honours double
// quotes with backslash escapes.
func quoteNodeOption(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		if r == '"' || r == '\\' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}

// NewPair creates the IPC socketpair (AF_UNIX, SOCK_STREAM, close-on-exec). parent is for
// NewChannel; child goes into exec.Cmd.ExtraFiles and must be closed by the caller once the
// child has started (or failed to).
func NewPair() (parent *net.UnixConn, child *os.File, err error) {
	fds, err := platform.Socketpair(unix.SOCK_STREAM)
	if err != nil {
		return nil, nil, fmt.Errorf("nodeipc: socketpair: %w", os.NewSyscallError("socketpair", err))
	}
	pf := os.NewFile(uintptr(fds[0]), "nodeipc-parent")
	c, err := net.FileConn(pf) // dups the fd and makes it non-blocking
	pf.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("nodeipc: socketpair: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("nodeipc: socketpair: unexpected conn type %T", c)
	}
	return uc, os.NewFile(uintptr(fds[1]), "nodeipc-child"), nil
}
