//go:build unix

// Package platform spells the few system calls and socket options whose names differ
// between Linux and the other Unix systems stickyd builds on (macOS, FreeBSD), so the
// rest of the code has one spelling and no build constraints of its own. On Linux
// every helper is exactly the call the code made before it existed; elsewhere it is
// the portable equivalent, the way the net package does it (fork lock + FD_CLOEXEC
// where there is no SOCK_CLOEXEC or accept4, an unlinked file where there is no memfd).
//
// What no other system has at all — handing accepted connections to worker processes
// over SCM_RIGHTS with Linux's socket options, the run, serve and demo modes — is not
// emulated: those modes refuse to start off Linux; stickyd proxy works everywhere.
package platform

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrUnsupported wraps what this system cannot do (peer credentials off Linux).
var ErrUnsupported = errors.New("platform: not supported on this system")

// socketpairForkLock is Socketpair without SOCK_CLOEXEC: the descriptors become
// close-on-exec under syscall.ForkLock, so no child started meanwhile inherits them
// (what the net package does on macOS).
func socketpairForkLock(typ int) ([2]int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	fds, err := unix.Socketpair(unix.AF_UNIX, typ, 0)
	if err != nil {
		return fds, err
	}
	unix.CloseOnExec(fds[0])
	unix.CloseOnExec(fds[1])
	return fds, nil
}

// acceptForkLock is accept4(SOCK_CLOEXEC|SOCK_NONBLOCK) spelled with accept, fcntl and
// the fork lock.
func acceptForkLock(fd int) (int, unix.Sockaddr, error) {
	syscall.ForkLock.RLock()
	nfd, sa, err := unix.Accept(fd)
	if err == nil {
		unix.CloseOnExec(nfd)
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return -1, nil, err
	}
	if err := unix.SetNonblock(nfd, true); err != nil {
		unix.Close(nfd)
		return -1, nil, err
	}
	return nfd, sa, nil
}

// anonFileUnlinked is memfd_create(name, 0) spelled with a temporary file that is
// unlinked at once: a descriptor to a file nothing else can open, that survives execve
// (not close-on-exec), readable and writable, positioned at 0.
func anonFileUnlinked(name string) (int, error) {
	f, err := os.CreateTemp("", name+"-*")
	if err != nil {
		return -1, err
	}
	defer f.Close()
	if err := os.Remove(f.Name()); err != nil {
		return -1, err
	}
	// dup's copy is not close-on-exec; f's own descriptor is, and goes with f.
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return -1, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	return fd, nil
}
