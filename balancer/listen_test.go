//go:build unix

package balancer

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/fdpass"
)

func hasIPv6Loopback() bool {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

func TestListenLocalhostBindsEveryAddress(t *testing.T) {
	lns, err := ListenConfig{}.Listen(context.Background(), "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	var got []string
	port := lns[0].Addr().(*net.TCPAddr).Port
	for _, l := range lns {
		a := l.Addr().(*net.TCPAddr)
		got = append(got, a.IP.String())
		if a.Port != port {
			t.Errorf("%v: every address must share one port (%d)", a, port)
		}
	}
	want := []string{"127.0.0.1"}
	if hasIPv6Loopback() {
		want = append(want, "::1")
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || g == w
		}
		if !found {
			t.Errorf("localhost bound %v; want %v among them", got, w)
		}
	}
}

func TestListenEmptyHostBindsBothFamilies(t *testing.T) {
	lns, err := ListenConfig{}.Listen(context.Background(), ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	if want := map[bool]int{true: 2, false: 1}[hasIPv6Loopback()]; len(lns) != want {
		t.Fatalf("bound %d sockets, want %d (one per family)", len(lns), want)
	}
	port := lns[0].Addr().(*net.TCPAddr).Port
	for _, target := range []string{"127.0.0.1", "::1"} {
		if target == "::1" && !hasIPv6Loopback() {
			continue
		}
		c, err := net.Dial("tcp", net.JoinHostPort(target, strconv.Itoa(port)))
		if err != nil {
			t.Errorf("dial %s: %v", target, err)
			continue
		}
		c.Close()
	}
}

func TestListenRefusesTakenAddressAndNamesIt(t *testing.T) {
	// Another process's listener on 127.0.0.1 only: binding localhost (both families)
	// must fail as a whole and say which address was taken.
	taken, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	before := openFDs(t)
	_, err = ListenConfig{}.Listen(context.Background(), "localhost:"+strconv.Itoa(port))
	if err == nil {
		t.Fatal("Listen succeeded on a taken address")
	}
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "127.0.0.1:"+strconv.Itoa(port)) {
		t.Fatalf("error %q does not name the taken address", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("a failed Listen leaked %d fds (it must close what it bound)", after-before)
	}
	_, err = ListenConfig{}.Listen(context.Background(), ":"+strconv.Itoa(port))
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf(":port over a taken 127.0.0.1 port: %v, want EADDRINUSE", err)
	}
}

func TestControlSocketChecksPeerUID(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to start a worker under another uid")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "run", "ctl.sock")
	ln, err := workers.ListenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	di, _ := os.Stat(filepath.Dir(path))
	if di.Mode().Perm() != 0o700 {
		t.Errorf("control directory mode %v, want 0700", di.Mode().Perm())
	}
	// A second edge on the same path is refused while the first serves it.
	if _, err := workers.ListenControl(path); err == nil || !strings.Contains(err.Error(), "another stickyd") {
		t.Fatalf("second ListenControl: %v", err)
	}
	b := New(Config{})
	cs := &workers.ControlServer{Edge: b, HelloTimeout: 5 * time.Second, AllowUIDs: []int{65533}}
	go cs.Serve(ln)
	defer ln.Close()
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir's parent
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(path), 0o755)
	os.Chmod(path, 0o666) // let the other uid reach the socket, so the uid check is what stops it

	// The test binary lives in a 0700 build directory: give the other uid a copy it can run.
	self := filepath.Join(dir, "worker")
	if err := copyFile(self, 0o755); err != nil {
		t.Fatal(err)
	}
	start := func(uid uint32) *exec.Cmd {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), workerEnv+"=echo", fdpass.EnvControl+"="+path, fdpass.EnvWorkerID+"=x")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	stranger := start(65534)
	done := make(chan error, 1)
	go func() { done <- stranger.Wait() }()
	select {
	case <-done: // the edge closed on it: its Accept failed and it exited
	case <-time.After(10 * time.Second):
		t.Fatal("a worker with a foreign uid was not turned away")
	}
	if len(b.Workers()) != 0 {
		t.Fatalf("foreign-uid worker was admitted")
	}
	start(0)
	waitFor(t, "own-uid worker admitted", 10*time.Second, func() bool { return len(b.Workers()) == 1 })
	start(65533)
	waitFor(t, "allowed uid admitted", 10*time.Second, func() bool { return len(b.Workers()) == 2 })
}

func copyFile(dst string, mode os.FileMode) error {
	src, err := os.Executable()
	if err != nil {
		return err
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, mode)
}
