//go:build unix

package main

import "syscall"

// childAttr is how the bench starts the servers it measures (nginx, HAProxy, stickyd,
// Node): they get SIGTERM when the bench dies, so a crashed or killed run leaves no
// server holding its ports.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
