//go:build unix

// Package fdpass moves client connections from the stickyd edge to worker processes.
//
// Every message travels over a SOCK_SEQPACKET Unix socket, so message boundaries are kept
// and each file descriptor stays attached to the message it belongs to. A connection
// handoff is one sendmsg: an encoded [Meta] as payload and the connection's fd in one
// SCM_RIGHTS control message. The receiver checks MSG_TRUNC and MSG_CTRUNC, closes every
// fd it did not ask for, and never keeps a raw fd number beyond the call.
//
// Workers written in Go use [Listen]: it returns a net.Listener whose Accept yields the
// handed-off connections with the real client address and any bytes the edge already
// read replayed first, so an ordinary http.Server and gorilla Upgrader serve them.
package fdpass

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stickyd/stickyd/fdpass/platform"
)

// Kind says what a message carries.
type Kind uint8

const (
	// KindConn hands a client connection to the worker (edge → worker, one fd).
	KindConn Kind = 1
	// KindVirtual hands one end of a socketpair the edge uses to proxy plain HTTP
	// requests to the worker, request by request (edge → worker, one fd).
	KindVirtual Kind = 2
	// KindHello announces a ready worker; Value is its pid (worker → edge, no fd).
	KindHello Kind = 3
	// KindStats reports the worker's live WebSockets in Value (worker → edge, no fd).
	KindStats Kind = 4
)

func (k Kind) String() string {
	switch k {
	case KindConn:
		return "conn"
	case KindVirtual:
		return "virtual"
	case KindHello:
		return "hello"
	case KindStats:
		return "stats"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k Kind) carriesFD() bool { return k == KindConn || k == KindVirtual }

// MaxConsumed bounds the bytes the edge may forward with a connection: a request head
// (16 KiB by default) plus whatever the client pipelined behind it.
const MaxConsumed = 64 << 10

// Meta is what travels with a handed-off connection.
type Meta struct {
	Kind     Kind
	ConnID   uint64         // the edge's id for the connection, for correlating logs
	Value    uint64         // KindHello: worker pid; KindStats: live WebSockets
	Remote   netip.AddrPort // the client's address as the edge saw it
	Local    netip.AddrPort // the address the client connected to
	Consumed []byte         // bytes the edge already read from the connection; replayed first
}

var (
	// ErrTruncated means the kernel cut the payload or the control data (MSG_TRUNC,
	// MSG_CTRUNC): the fd may have been dropped, for instance at the receiver's fd limit.
	ErrTruncated = errors.New("fdpass: message truncated")
	// ErrNoFD means a connection message arrived without its file descriptor.
	ErrNoFD = errors.New("fdpass: connection message without a file descriptor")
	// ErrBadMeta means the payload is not a metadata record this version understands.
	ErrBadMeta = errors.New("fdpass: malformed metadata")
	// ErrTooLarge means Meta.Consumed exceeds MaxConsumed.
	ErrTooLarge = errors.New("fdpass: consumed bytes exceed MaxConsumed")
)

const (
	magic   = 's'
	version = 1
	// header: magic, version, kind, reserved, connID, value, remote len, local len, consumed len
	headerLen  = 4 + 8 + 8 + 1 + 1 + 4
	addrMaxLen = 32 // netip.AddrPort.MarshalBinary: 16 + zone + 2; zones are bounded below
	// MaxMessage is the largest payload a peer may send.
	MaxMessage = headerLen + 2*addrMaxLen + MaxConsumed
)

// AppendMeta encodes m after b.
func AppendMeta(b []byte, m Meta) ([]byte, error) {
	if len(m.Consumed) > MaxConsumed {
		return b, ErrTooLarge
	}
	start := len(b)
	b = append(b, magic, version, byte(m.Kind), 0)
	b = binary.BigEndian.AppendUint64(b, m.ConnID)
	b = binary.BigEndian.AppendUint64(b, m.Value)
	b = append(b, 0, 0) // address lengths, filled in below
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.Consumed)))
	var err error
	n := len(b)
	if b, err = appendAddr(b, m.Remote); err != nil {
		return b[:start], err
	}
	b[start+20] = byte(len(b) - n)
	n = len(b)
	if b, err = appendAddr(b, m.Local); err != nil {
		return b[:start], err
	}
	b[start+21] = byte(len(b) - n)
	return append(b, m.Consumed...), nil
}

func appendAddr(b []byte, ap netip.AddrPort) ([]byte, error) {
	if !ap.IsValid() {
		return b, nil
	}
	// Zones are meaningless across processes and would only lengthen the record.
	ap = netip.AddrPortFrom(ap.Addr().WithZone(""), ap.Port())
	return ap.AppendBinary(b)
}

// DecodeMeta parses a payload written by AppendMeta. Consumed aliases b.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) < headerLen || b[0] != magic {
		return m, fmt.Errorf("%w: bad header", ErrBadMeta)
	}
	if b[1] != version {
		return m, fmt.Errorf("%w: version %d, want %d (edge and worker binaries differ)", ErrBadMeta, b[1], version)
	}
	m.Kind = Kind(b[2])
	if m.Kind < KindConn || m.Kind > KindStats {
		return m, fmt.Errorf("%w: unknown kind %d", ErrBadMeta, b[2])
	}
	m.ConnID = binary.BigEndian.Uint64(b[4:])
	m.Value = binary.BigEndian.Uint64(b[12:])
	rl, ll := int(b[20]), int(b[21])
	cl := binary.BigEndian.Uint32(b[22:])
	if rl > addrMaxLen || ll > addrMaxLen || cl > MaxConsumed || headerLen+rl+ll+int(cl) != len(b) {
		return m, fmt.Errorf("%w: lengths do not add up", ErrBadMeta)
	}
	p := b[headerLen:]
	if rl > 0 {
		if err := m.Remote.UnmarshalBinary(p[:rl]); err != nil || !m.Remote.IsValid() {
			return m, fmt.Errorf("%w: remote address", ErrBadMeta)
		}
	}
	p = p[rl:]
	if ll > 0 {
		if err := m.Local.UnmarshalBinary(p[:ll]); err != nil || !m.Local.IsValid() {
			return m, fmt.Errorf("%w: local address", ErrBadMeta)
		}
	}
	p = p[ll:]
	// The sender strips zones; a zone here is not ours to honour.
	if m.Remote.Addr().Zone() != "" || m.Local.Addr().Zone() != "" {
		return m, fmt.Errorf("%w: address with a zone", ErrBadMeta)
	}
	if cl > 0 {
		m.Consumed = p[:cl]
	}
	return m, nil
}

var payloadPool = sync.Pool{New: func() any { b := make([]byte, 0, 256); return &b }}

// Send writes one message on uc. For KindConn and KindVirtual, conn's descriptor travels
// with it; conn stays open and owned by the caller, who closes its copy once Send
// returns nil. Send honours the write deadline set on uc: a worker that stops reading
// fills the socket buffer, and the deadline turns that into an error instead of a
// blocked edge.
func Send(uc *net.UnixConn, conn syscall.Conn, m Meta) error {
	bp := payloadPool.Get().(*[]byte)
	defer payloadPool.Put(bp)
	payload, err := AppendMeta((*bp)[:0], m)
	*bp = payload[:0]
	if err != nil {
		return err
	}
	if !m.Kind.carriesFD() {
		_, _, err = uc.WriteMsgUnix(payload, nil, nil)
		return err
	}
	if conn == nil {
		return ErrNoFD
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var sendErr error
	// Control, not File(): File() would flip the shared file description to blocking
	// mode and break the edge's and the worker's deadlines on it.
	err = raw.Control(func(fd uintptr) {
		var oob [24]byte // CmsgSpace(4) on 64-bit Linux; checked in init
		_, _, sendErr = uc.WriteMsgUnix(payload, rights(oob[:0], fd), nil)
	})
	if err != nil {
		return err
	}
	return sendErr
}

// ErrWouldBlock means TrySend found the channel full.
var ErrWouldBlock = errors.New("fdpass: channel full")

// TrySend is Send for a raw descriptor that must not wait: it makes one non-blocking
// sendmsg and fails with ErrWouldBlock when the worker's channel is full. fd stays owned
// by the caller.
func TrySend(uc *net.UnixConn, fd int, m Meta) error {
	if !m.Kind.carriesFD() {
		return ErrNoFD
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	bp := payloadPool.Get().(*[]byte)
	defer payloadPool.Put(bp)
	payload, err := AppendMeta((*bp)[:0], m)
	*bp = payload[:0]
	if err != nil {
		return err
	}
	var oob [24]byte
	var serr error
	err = raw.Write(func(ufd uintptr) bool {
		serr = unix.Sendmsg(int(ufd), payload, rights(oob[:0], uintptr(fd)), nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		return true // one attempt, whatever happened: the caller never parks here
	})
	if err != nil {
		return err
	}
	if errors.Is(serr, unix.EAGAIN) {
		return ErrWouldBlock
	}
	return serr
}

// rights appends an SCM_RIGHTS control message carrying one descriptor, without the
// allocation unix.UnixRights makes.
func rights(b []byte, fd uintptr) []byte {
	b = b[:unix.CmsgSpace(4)]
	clear(b)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.SOL_SOCKET
	h.Type = unix.SCM_RIGHTS
	h.SetLen(unix.CmsgLen(4))
	*(*int32)(unsafe.Pointer(&b[unix.CmsgLen(0)])) = int32(fd)
	return b
}

func init() {
	if unix.CmsgSpace(4) > 24 {
		panic("fdpass: control buffer too small for this platform")
	}
}

// oobSpace leaves room for more fds than we expect, so a misbehaving peer's extra fds are
// received (and closed) rather than silently dropped with MSG_CTRUNC.
var oobSpace = unix.CmsgSpace(4 * 8)

var recvPool = sync.Pool{New: func() any { b := make([]byte, recvBufSize); return &b }}

// Recv reads one message from uc. For KindConn and KindVirtual it returns the connection
// (a *Conn that replays Meta.Consumed and reports Meta.Remote); for other kinds conn is
// nil. Every descriptor the kernel delivered is closed on every error path.
func Recv(uc *net.UnixConn) (net.Conn, Meta, error) {
	bp := recvPool.Get().(*[]byte)
	defer recvPool.Put(bp)
	return recvInto(uc, *bp)
}

// recvBufSize is the buffer recvInto needs: the largest message plus one byte (to see
// truncation) plus room for control data.
var recvBufSize = MaxMessage + 1 + oobSpace

// recvInto is Recv with the caller's buffer of recvBufSize bytes (a listener keeps one).
func recvInto(uc *net.UnixConn, b []byte) (net.Conn, Meta, error) {
	buf, oob := b[:MaxMessage+1], b[MaxMessage+1:]
	n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
	fds, perr := parseRights(oob[:oobn])
	fd, m, err := received(buf, n, flags, fds, err, perr)
	if fd < 0 {
		return nil, m, err
	}
	c, err := fileConn(fd)
	if err != nil {
		return nil, m, err
	}
	return newConn(c, m), m, nil
}

// received checks what one ReadMsgUnix of a handoff brought — n bytes of buf, the
// descriptors fds, the read and control-data errors — and decodes its Meta. It returns
// the one descriptor to wrap, or -1 when there is none to (an error, or a message that
// carries none). Every other descriptor the kernel delivered is closed.
func received(buf []byte, n, flags int, fds []int, err, perr error) (int, Meta, error) {
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch {
	case err != nil:
		closeAll()
		return -1, Meta{}, err
	case perr != nil:
		closeAll()
		return -1, Meta{}, perr
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMessage:
		closeAll()
		return -1, Meta{}, fmt.Errorf("%w (flags %#x, %d fds arrived)", ErrTruncated, flags, len(fds))
	case n == 0 && len(fds) == 0:
		// A zero-length read on SEQPACKET is the peer's orderly shutdown.
		return -1, Meta{}, os.ErrClosed
	}
	m, err := DecodeMeta(buf[:n])
	if err != nil {
		closeAll()
		return -1, Meta{}, err
	}
	// Consumed must outlive the reused buffer.
	if m.Consumed != nil {
		m.Consumed = append([]byte(nil), m.Consumed...)
	}
	if !m.Kind.carriesFD() {
		closeAll()
		return -1, m, nil
	}
	if len(fds) == 0 {
		return -1, m, ErrNoFD
	}
	for _, fd := range fds[1:] {
		unix.Close(fd)
	}
	return fds[0], m, nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("fdpass: control message: %w", err)
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// fileConn turns a received descriptor into a net.Conn and releases the descriptor:
// net.FileConn dups it, so the original must be closed here or it leaks.
func fileConn(fd int) (net.Conn, error) {
	// Blocking for a moment, so os.NewFile does not register this short-lived descriptor
	// with the poller only to remove it again; FileConn's duplicate shares the file
	// description and makes it non-blocking again.
	unix.SetNonblock(fd, false)
	f := os.NewFile(uintptr(fd), "fdpass")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("fdpass: received descriptor is not a socket: %w", err)
	}
	return c, nil
}

// SocketPair returns a connected pair of Unix sockets of the given type with close-on-exec
// set (unix.SOCK_SEQPACKET for control channels, unix.SOCK_STREAM for virtual
// connections). The second one is returned as an *os.File, ready for exec.Cmd.ExtraFiles
// or for Send through [FileSyscallConn].
func SocketPair(typ int) (*net.UnixConn, *os.File, error) {
	fds, err := platform.Socketpair(typ)
	if err != nil {
		return nil, nil, fmt.Errorf("fdpass: socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "stickyd-pair")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("fdpass: socketpair: %w", err)
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "stickyd-pair-peer"), nil
}
