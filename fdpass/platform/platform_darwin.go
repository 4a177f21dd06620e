package platform

import "golang.org/x/sys/unix"

// TCPKeepIdle is the TCP option for the idle seconds before the first keep-alive probe
// (TCP_KEEPALIVE on macOS).
const TCPKeepIdle = unix.TCP_KEEPALIVE
