//go:build unix

package main

import (
	"errors"
	"strings"
	"testing"
)

func TestModeSupported(t *testing.T) {
	for _, tc := range []struct {
		mode, goos string
		ok         bool
	}{
		{"run", "linux", true},
		{"serve", "linux", true},
		{"demo", "linux", true},
		{"proxy", "linux", true},
		{"run", "darwin", false},
		{"serve", "darwin", false},
		{"demo", "darwin", false},
		{"proxy", "darwin", true},
		{"run", "freebsd", false},
		{"serve", "freebsd", false},
		{"demo", "freebsd", false},
		{"proxy", "freebsd", true},
		{"proxy", "openbsd", true},
		{"status", "darwin", true}, // client commands only talk HTTP
		{"version", "freebsd", true},
	} {
		err := modeSupported(tc.mode, tc.goos)
		if (err == nil) != tc.ok {
			t.Errorf("modeSupported(%q, %q) = %v; want ok=%v", tc.mode, tc.goos, err, tc.ok)
			continue
		}
		if err == nil {
			continue
		}
		// The message names the problem, the system and both ways out.
		msg := err.Error()
		for _, want := range []string{tc.mode + " needs Linux", tc.goos, "stickyd proxy -backend", "Linux container"} {
			if !strings.Contains(msg, want) {
				t.Errorf("modeSupported(%q, %q) = %q; want it to mention %q", tc.mode, tc.goos, msg, want)
			}
		}
		if !errors.Is(err, errNeedsLinux) {
			t.Errorf("modeSupported(%q, %q): %v does not wrap errNeedsLinux", tc.mode, tc.goos, err)
		}
	}
}
