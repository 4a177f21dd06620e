package platform

import "golang.org/x/sys/unix"

// TCPKeepIdle is the TCP option for the idle seconds before the first keep-alive probe.
const TCPKeepIdle = unix.TCP_KEEPIDLE
