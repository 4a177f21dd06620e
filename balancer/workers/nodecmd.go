//go:build unix

package workers

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// wrappedChannelFD is where a Node app started through a wrapper finds the edge's channel
// (STICKYD_NODE_CHANNEL_FD). High, with nothing open below it but stdio: a Node process
// (npm's, nodemon's) marks the inherited descriptors at the low end (3 up to about 16, and
// those contiguous with them) close-on-exec, so its children would not inherit them (seen
// on Node 20); and nodemon forks its child with an IPC channel of its own at 3.
const wrappedChannelFD = 100

// nodeBinaries run Node directly: Node itself takes the channel from NODE_CHANNEL_FD.
var nodeBinaries = map[string]bool{"node": true, "nodejs": true}

// nodeWrappers start a Node app as a child process; the preload passes the channel through.
var nodeWrappers = map[string]bool{
	"npm": true, "npx": true, "yarn": true, "yarnpkg": true, "pnpm": true, "pnpx": true,
	"corepack": true, "nodemon": true, "node-dev": true, "ts-node-dev": true,
}

// shells and launchers whose arguments name the program they run.
var launchers = map[string]bool{"sh": true, "bash": true, "dash": true, "zsh": true, "ash": true, "env": true, "exec": true}

func isNodeBinary(arg0 string) bool { return nodeBinaries[filepath.Base(arg0)] }

// IsNodeCommand reports whether a worker command runs a Node app: node itself, a package
// manager or watcher that starts one (npm start, yarn start, npx, pnpm, nodemon), or a shell
// or env whose command line names one of those (sh -c 'node app.js').
func IsNodeCommand(cmd []string) bool {
	if len(cmd) == 0 {
		return false
	}
	base := filepath.Base(cmd[0])
	if nodeBinaries[base] || nodeWrappers[base] {
		return true
	}
	if !launchers[base] {
		return false
	}
	for _, arg := range cmd[1:] {
		for _, word := range strings.FieldsFunc(arg, func(r rune) bool {
			return strings.ContainsRune(" \t\n;&|()'\"`", r)
		}) {
			b := filepath.Base(word)
			if nodeBinaries[b] || nodeWrappers[b] {
				return true
			}
		}
	}
	return false
}

// ErrUnsupportedCommand: a worker command that cannot get the edge's channel to the app.
var ErrUnsupportedCommand = errors.New("balancer: this worker command cannot work under stickyd")

// CheckWorkerCommand refuses, at start, the commands that hide the app from the edge for
// good, with the fix (pm2, forever, node --watch).
func CheckWorkerCommand(cmd []string) error {
	if len(cmd) == 0 {
		return nil
	}
	base := filepath.Base(cmd[0])
	switch base {
	case "pm2", "pm2-runtime", "pm2-docker", "forever":
		return fmt.Errorf("%w: %s runs the app as a daemon of its own, not as stickyd's child: use `stickyd run -- node server.js` (stickyd restarts workers itself)", ErrUnsupportedCommand, base)
	}
	if nodeBinaries[base] {
		for _, a := range cmd[1:] {
			if !strings.HasPrefix(a, "-") {
				break // the script: what follows is the app's
			}
			if a == "--watch" || strings.HasPrefix(a, "--watch=") || a == "--watch-path" || strings.HasPrefix(a, "--watch-path=") {
				return fmt.Errorf("%w: node --watch runs the app in a child process that cannot get stickyd's channel: drop --watch (`stickyd run -- node server.js`; restart workers with SIGHUP), or use nodemon: `stickyd run -- npx nodemon server.js`", ErrUnsupportedCommand)
			}
		}
	}
	return nil
}

// ownListeners lists the TCP sockets listening in the process group pgid that this process
// does not hold too (a Node app's other servers are bound by the edge and shared): a Node
// worker that listens itself never got the edge's channel. nodeOnly: only Node processes'.
// It runs every 250 ms while a worker starts, so it looks at the worker's few sockets
// first and asks which sockets listen only when the worker has any: the kernel's list of
// every TCP socket (/proc/net/tcp) is as long as the host's connections — 130,000 lines
// cost the edge half a second of CPU per starting worker. Linux /proc; nil elsewhere.
func ownListeners(pgid int, nodeOnly bool) []string {
	if pgid <= 0 {
		return nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	socks := map[int]map[string]bool{} // pid → its socket inodes
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || procPgid(pid) != pgid {
			continue
		}
		if nodeOnly && !nodeBinaries[procComm(pid)] {
			continue
		}
		if inos := socketInodes(pid); len(inos) > 0 {
			socks[pid] = inos
		}
	}
	if len(socks) == 0 {
		return nil
	}
	listening := listeningTCP()
	var mine map[string]bool // this process's sockets, read only if a worker's socket listens
	var out []string
	for _, pid := range slices.Sorted(maps.Keys(socks)) {
		for ino := range socks[pid] {
			addr, ok := listening[ino]
			if !ok {
				continue
			}
			if mine == nil {
				mine = socketInodes(os.Getpid())
			}
			if !mine[ino] {
				out = append(out, fmt.Sprintf("process %d (%s) listens on %s itself", pid, procComm(pid), addr))
			}
		}
	}
	return out
}

// listeningFromProc reads the listening sockets from /proc/net/tcp{,6}: socket inode →
// local address. The fallback where the kernel's sock_diag netlink is not available.
func listeningFromProc() map[string]string {
	listening := map[string]string{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 || fs[3] != "0A" { // 0A: TCP_LISTEN
				continue
			}
			listening[fs[9]] = procNetAddr(fs[1])
		}
	}
	return listening
}

func procPgid(pid int) int {
	pg, _ := procStat(pid)
	return pg
}

// procStat reads a process's group and state ('Z': zombie) from /proc; -1 when unknown.
func procStat(pid int) (pgid int, state byte) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return -1, 0
	}
	// pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1, 0
	}
	fs := strings.Fields(s[i+1:])
	if len(fs) < 3 || len(fs[0]) == 0 {
		return -1, 0
	}
	pg, err := strconv.Atoi(fs[2])
	if err != nil {
		return -1, 0
	}
	return pg, fs[0][0]
}

// groupLiving reports whether the process group pgid has a member that is not a zombie.
// Without /proc it assumes so.
func groupLiving(pgid int) bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pg, st := procStat(pid); pg == pgid && st != 'Z' {
			return true
		}
	}
	return false
}

func procComm(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	return strings.TrimSpace(string(b))
}

func socketInodes(pid int) map[string]bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	out := map[string]bool{}
	for _, e := range ents {
		l, err := os.Readlink(dir + "/" + e.Name())
		if err == nil && strings.HasPrefix(l, "socket:[") {
			out[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	return out
}

// procNetAddr turns /proc/net/tcp's "0100007F:0BB8" into "127.0.0.1:3000" (and the IPv6 form).
func procNetAddr(hexAddr string) string {
	h, p, ok := strings.Cut(hexAddr, ":")
	if !ok {
		return hexAddr
	}
	port, _ := strconv.ParseUint(p, 16, 16)
	var ip []byte
	for i := 0; i+8 <= len(h); i += 8 {
		// Each 32-bit word is in host (little-endian) order.
		w, _ := strconv.ParseUint(h[i:i+8], 16, 32)
		ip = append(ip, byte(w), byte(w>>8), byte(w>>16), byte(w>>24))
	}
	host := "?"
	switch len(ip) {
	case 4:
		host = fmt.Sprintf("%d.%d.%d.%d", ip[0], ip[1], ip[2], ip[3])
	case 16:
		allZero := true
		for _, b := range ip {
			allZero = allZero && b == 0
		}
		if allZero {
			host = "[::]"
		} else {
			host = "[" + netIP(ip) + "]"
		}
	}
	return fmt.Sprintf("%s:%d", host, port)
}

func netIP(b []byte) string { return net.IP(b).String() }
