//go:build unix && !linux

package main

import "syscall"

// childAttr is how the bench starts the servers it measures. There is no parent-death
// signal off Linux: the bench stops them itself, and a bench that is killed -9 leaves
// them running.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{}
}
