//go:build unix

package platform

import (
	"bytes"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// The portable spellings (fork lock, unlinked file) are what macOS and FreeBSD run; they
// are tested here on Linux too, next to the Linux calls they stand in for.

func cloexec(t *testing.T, fd int) bool {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl&unix.FD_CLOEXEC != 0
}

func nonblock(t *testing.T, fd int) bool {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl&unix.O_NONBLOCK != 0
}

func TestSocketpair(t *testing.T) {
	for name, pair := range map[string]func(int) ([2]int, error){"Socketpair": Socketpair, "forkLock": socketpairForkLock} {
		for _, typ := range []int{unix.SOCK_STREAM, unix.SOCK_SEQPACKET} {
			fds, err := pair(typ)
			if err != nil {
				if typ == unix.SOCK_SEQPACKET && err == unix.EPROTONOSUPPORT {
					continue // macOS has no SOCK_SEQPACKET for AF_UNIX
				}
				t.Fatalf("%s(%d): %v", name, typ, err)
			}
			if !cloexec(t, fds[0]) || !cloexec(t, fds[1]) {
				t.Errorf("%s(%d): descriptors not close-on-exec", name, typ)
			}
			if got, err := unix.GetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_TYPE); err != nil || got != typ {
				t.Errorf("%s(%d): socket type %d, %v", name, typ, got, err)
			}
			if _, err := unix.Write(fds[0], []byte("ping")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 8)
			n, err := unix.Read(fds[1], buf)
			if err != nil || string(buf[:n]) != "ping" {
				t.Errorf("%s(%d): read %q, %v: not connected", name, typ, buf[:n], err)
			}
			unix.Close(fds[0])
			unix.Close(fds[1])
		}
	}
}

func TestAccept(t *testing.T) {
	for name, accept := range map[string]func(int) (int, unix.Sockaddr, error){"Accept": Accept, "forkLock": acceptForkLock} {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f, err := ln.(*net.TCPListener).File() // a blocking duplicate: accept waits for the dial
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		nfd, sa, err := accept(int(f.Fd()))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !cloexec(t, nfd) || !nonblock(t, nfd) {
			t.Errorf("%s: accepted socket: close-on-exec %v, non-blocking %v; want both", name, cloexec(t, nfd), nonblock(t, nfd))
		}
		if in4, ok := sa.(*unix.SockaddrInet4); !ok || in4.Port != c.LocalAddr().(*net.TCPAddr).Port {
			t.Errorf("%s: peer %#v, want the dialer's %v", name, sa, c.LocalAddr())
		}
		unix.Close(nfd)
		c.Close()
		f.Close()
		ln.Close()
	}
}

func TestAnonFile(t *testing.T) {
	for name, anon := range map[string]func(string) (int, error){"AnonFile": AnonFile, "unlinked": anonFileUnlinked} {
		fd, err := anon("stickyd-test")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if cloexec(t, fd) {
			t.Errorf("%s: descriptor is close-on-exec; it must survive execve", name)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Nlink != 0 {
			t.Errorf("%s: %d links (%v); want an anonymous file", name, st.Nlink, err)
		}
		want := []byte(`{"format":1}`)
		if _, err := unix.Write(fd, want); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 64)
		n, err := unix.Pread(fd, got, 0)
		if err != nil || !bytes.Equal(got[:n], want) {
			t.Errorf("%s: read back %q, %v", name, got[:n], err)
		}
		unix.Close(fd)
	}
}

func TestPeerCred(t *testing.T) {
	fds, err := Socketpair(unix.SOCK_STREAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	uid, pid, err := PeerCred(fds[0])
	if !Handoff {
		if err == nil {
			t.Fatal("PeerCred off Linux: want ErrUnsupported")
		}
		return
	}
	if err != nil || uid != unix.Getuid() || pid != unix.Getpid() {
		t.Errorf("PeerCred = uid %d pid %d, %v; want %d %d", uid, pid, err, unix.Getuid(), unix.Getpid())
	}
}

// PeekByte leaves the byte in the socket, RecvmsgNow takes it, and both answer EAGAIN on
// an empty socket and 0 once the peer closed.
func TestPeekByteAndRecvmsgNow(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	if _, err := PeekByte(uintptr(fds[0])); err != unix.EAGAIN {
		t.Fatalf("PeekByte on an empty socket: %v, want EAGAIN", err)
	}
	if _, _, _, err := RecvmsgNow(fds[0], make([]byte, 8), nil); err != unix.EAGAIN {
		t.Fatalf("RecvmsgNow on an empty socket: %v, want EAGAIN", err)
	}
	unix.Write(fds[1], []byte("ab"))
	for range 2 {
		if n, err := PeekByte(uintptr(fds[0])); n != 1 || err != nil {
			t.Fatalf("PeekByte: %d, %v", n, err)
		}
	}
	buf := make([]byte, 8)
	if n, oobn, _, err := RecvmsgNow(fds[0], buf, make([]byte, 64)); err != nil || string(buf[:n]) != "ab" || oobn != 0 {
		t.Fatalf("RecvmsgNow: %q, %d control bytes, %v", buf[:n], oobn, err)
	}
	unix.Close(fds[1])
	if n, err := PeekByte(uintptr(fds[0])); n != 0 || err != nil {
		t.Fatalf("PeekByte after the peer closed: %d, %v", n, err)
	}
}
