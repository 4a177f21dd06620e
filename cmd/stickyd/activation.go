//go:build unix

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/fdpass/platform"
)

// errAddrInUse marks a listen failure because another process holds the address.
var errAddrInUse = errors.New("address in use")

// activated are the listening sockets systemd passed (socket activation, sd_listen_fds(3)):
// LISTEN_FDS descriptors from fd 3 on, meant for this process when LISTEN_PID is our pid,
// named by LISTEN_FDNAMES (a socket unit's FileDescriptorName=). The one named "admin" (or
// "metrics") serves -metrics; all others are client listeners.
type activated struct {
	client []net.Listener
	admin  net.Listener
}

// listenFDsStart is SD_LISTEN_FDS_START.
const listenFDsStart = 3

// takeActivated reads and clears the socket-activation environment. It is cleared in any
// case, as sd_listen_fds(1) does, so that workers (which inherit the environment) and a
// re-executed edge never take the variables for their own.
func takeActivated() (*activated, error) {
	pidStr, nStr, names := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if nStr == "" {
		return nil, nil
	}
	if pid, err := strconv.Atoi(pidStr); err != nil || pid != os.Getpid() {
		return nil, nil // meant for another process (e.g. a wrapper's parent)
	}
	n, err := strconv.Atoi(nStr)
	if err != nil || n < 1 {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q: want a positive count", nStr)
	}
	var nameList []string
	if names != "" {
		nameList = strings.Split(names, ":")
	}
	a := &activated{}
	for i := range n {
		fd := listenFDsStart + i
		name := ""
		if i < len(nameList) {
			name = nameList[i]
		}
		// The descriptors arrive without close-on-exec; FileListener's duplicate has it
		// and the original is closed, so workers never inherit a listening socket.
		unix.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), "activated-"+name)
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("socket activation: fd %d (%q): %w: the socket unit must use ListenStream= (a TCP or unix stream socket, Accept=no)", fd, name, err)
		}
		switch name {
		case "admin", "metrics":
			if a.admin != nil {
				ln.Close()
				return nil, fmt.Errorf("socket activation: two sockets named %q: give one FileDescriptorName=admin", name)
			}
			a.admin = ln
		default:
			tuneClientListener(ln)
			a.client = append(a.client, ln)
		}
	}
	return a, nil
}

// tuneClientListener gives an inherited client socket the options the edge sets on the
// sockets it binds itself (balancer.ListenConfig), best effort: a socket unit may already
// set them (DeferAcceptSec=, NoDelay=, KeepAlive=).
func tuneClientListener(ln net.Listener) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		platform.SetDeferAccept(int(fd))
		for _, o := range [][3]int{
			{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
			{unix.IPPROTO_TCP, platform.TCPKeepIdle, 15},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		} {
			unix.SetsockoptInt(int(fd), o[0], o[1], o[2])
		}
	})
}

// closeAll closes listeners, for error paths.
func closeAll(lns []net.Listener) {
	for _, ln := range lns {
		ln.Close()
	}
}

// listenClient returns the client listeners: systemd's, if it passed any, else bound on addr.
func listenClient(ctx context.Context, act *activated, addr string) ([]net.Listener, error) {
	if act != nil && len(act.client) > 0 {
		return act.client, nil
	}
	return (balancer.ListenConfig{DeferAccept: true}).Listen(ctx, addr)
}

// listenAdmin returns the admin/metrics listener: systemd's, if it passed one named admin,
// else bound on addr (nil for an empty addr). A taken port names the flag that moves it.
func listenAdmin(act *activated, addr string) (net.Listener, error) {
	if act != nil && act.admin != nil {
		return act.admin, nil
	}
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("-metrics %s is in use (%w: another process, perhaps an earlier stickyd, holds it): pick another with -metrics ADDR, or -metrics '' to turn the admin port off", addr, errAddrInUse)
	}
	if err != nil {
		return nil, fmt.Errorf("-metrics %s: %w", addr, err)
	}
	return ln, nil
}
