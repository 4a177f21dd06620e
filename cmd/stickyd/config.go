//go:build unix

package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/stickyd/stickyd/balancer"

	"go.yaml.in/yaml/v3"

	"github.com/stickyd/stickyd/sticky"
)

// ErrConfig marks a config file that cannot be used; the message names file, line and fix.
var ErrConfig = errors.New("config file")

// A config file (-config FILE, or STICKYD_CONFIG) is a YAML mapping of flag names to
// values: the same names as on the command line, without the dash.
//
//	listen: ":8080"
//	workers: 4
//	key: [sid, "cookie:io"]        # a list is joined with commas
//	trusted-proxies: 10.0.0.0/8
//	max-conns-per-ip: 200
//
// Precedence: a flag on the command line > its STICKYD_* variable > the file > the default.

// configEntry is one setting read from the file.
type configEntry struct {
	value string
	line  int
}

// readConfig parses and validates path against the flags of fs: unknown keys, values a
// flag refuses, and duplicates are errors naming the line (and, for a misspelt key, the
// nearest valid one). Nothing is applied.
func readConfig(path string, fs *flag.FlagSet) (map[string]configEntry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v: give -config the path of a YAML file", ErrConfig, err)
	}
	var doc yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(data)).Decode(&doc); err != nil {
		if err.Error() == "EOF" {
			return map[string]configEntry{}, nil // an empty file sets nothing
		}
		return nil, fmt.Errorf("%w: %s: %v", ErrConfig, path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return map[string]configEntry{}, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%w: %s:%d: the file must be a mapping of settings (listen: \":8080\"), not a %s", ErrConfig, path, root.Line, kindName(root))
	}
	// Every flag of every mode, to check values with the flag's own parser on a scratch
	// set (errors then carry the file's line, and nothing is half-applied) and to tell a
	// setting of another mode from a misspelt one.
	all := flag.NewFlagSet("check", flag.ContinueOnError)
	all.SetOutput(discard{})
	var scratch edgeFlags
	scratch.register(all, "serve")
	scratch.proxy.register(all)
	all.Var(&scratch.pools, "pool", "")
	out := map[string]configEntry{}
	var errs []error
	bad := func(line int, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s:%d: "+format, append([]any{path, line}, args...)...))
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		name := k.Value
		if name == "config" {
			bad(k.Line, "config cannot name another file: give -config once")
			continue
		}
		fl := fs.Lookup(name)
		if fl == nil && all.Lookup(name) != nil {
			bad(k.Line, "%q is not a setting of stickyd %s (another mode's: %s): remove it", name, fs.Name(), modesOf(name))
			continue
		}
		if fl == nil {
			if alt := fs.Lookup(strings.ReplaceAll(name, "_", "-")); alt != nil {
				bad(k.Line, "unknown key %q: did you mean %q? (keys are the flag names, with dashes)", name, alt.Name)
			} else {
				bad(k.Line, "unknown key %q%s", name, suggest(name, fs))
			}
			continue
		}
		if prev, ok := out[name]; ok {
			bad(k.Line, "%q is set twice (also on line %d): keep one", name, prev.line)
			continue
		}
		var val string
		switch v.Kind {
		case yaml.ScalarNode:
			val = v.Value
			if v.Tag == "!!null" {
				val = ""
			}
		case yaml.SequenceNode:
			var items []string
			for _, it := range v.Content {
				if it.Kind != yaml.ScalarNode {
					bad(it.Line, "%s: a list of plain values is allowed, not nested %ss", name, kindName(it))
					continue
				}
				items = append(items, it.Value)
			}
			val = strings.Join(items, ",")
		default:
			bad(v.Line, "%s: want a value, not a %s", name, kindName(v))
			continue
		}
		if err := all.Set(name, val); err != nil {
			bad(v.Line, "%s: %q: %v (as on the command line: -%s; %s)", name, val, unwrapFlagErr(err), name, fl.Usage)
			continue
		}
		out[name] = configEntry{value: val, line: v.Line}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrConfig, errors.Join(errs...))
	}
	return out, nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func unwrapFlagErr(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.ScalarNode:
		return "single value"
	}
	return "YAML node"
}

// suggest names the valid key nearest to name (edit distance), if one is close enough.
func suggest(name string, fs *flag.FlagSet) string {
	best, bestD := "", 1<<30
	fs.VisitAll(func(f *flag.Flag) {
		if d := editDistance(name, f.Name); d < bestD {
			best, bestD = f.Name, d
		}
	})
	if best == "" || bestD > max(2, len(name)/2) {
		return ": see stickyd run -h for the settings"
	}
	return fmt.Sprintf(": did you mean %q?", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// applySources fills the flags of fs not given on the command line: from STICKYD_*
// variables first, then from the -config file, so the precedence is flag > env > file >
// default. fs must have been parsed.
func applySources(fs *flag.FlagSet) error {
	fromEnv := map[string]bool{}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := os.LookupEnv(envName(f.Name)); ok && !set[f.Name] {
			fromEnv[f.Name] = true
		}
	})
	if err := applyEnv(fs); err != nil {
		return err
	}
	cf := fs.Lookup("config")
	if cf == nil || cf.Value.String() == "" {
		return nil
	}
	entries, err := readConfig(cf.Value.String(), fs)
	if err != nil {
		return err
	}
	for name, e := range entries {
		if set[name] || fromEnv[name] {
			continue
		}
		if err := fs.Set(name, e.value); err != nil { // checked by readConfig; a mode-specific parse may still differ
			return fmt.Errorf("%w: %s:%d: %s: %v", ErrConfig, cf.Value.String(), e.line, name, err)
		}
	}
	return nil
}

func envName(flagName string) string {
	return "STICKYD_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// What a reload can do with each setting. Live ones are applied at once; the balancer's
// and the supervisor's settings are fixed while an edge image runs and are applied by an
// edge upgrade (`stickyd upgrade`, SIGUSR2), which re-reads the file and keeps every
// connection; sockets and the worker set need a restart.
var (
	reloadLive    = map[string]bool{"log-level": true, "admin-remote": true}
	reloadRestart = map[string]bool{"listen": true, "metrics": true, "control": true, "workers": true, "node": true, "app-port": true}
)

// reloader re-reads the edge's settings (command line, environment, file) on request.
type reloader struct {
	mode   string
	args   []string
	log    *slog.Logger
	level  *slog.LevelVar
	remote *atomic.Bool

	mu    sync.Mutex
	cur   map[string]string      // every flag's value now in force
	certs *balancer.Certificates // TLS at the edge: reloaded by every reload; nil: none
}

func newReloader(mode string, args []string, fs *flag.FlagSet, log *slog.Logger, level *slog.LevelVar, remote *atomic.Bool) *reloader {
	r := &reloader{mode: mode, args: args, log: log, level: level, remote: remote, cur: map[string]string{}}
	fs.VisitAll(func(f *flag.Flag) { r.cur[f.Name] = f.Value.String() })
	return r
}

// reload reads the settings again and applies what can change live. It answers with
// what it applied and what waits for an upgrade or a restart; a file with errors
// changes nothing.
func (r *reloader) reload(ctx context.Context) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fs := flag.NewFlagSet(r.mode, flag.ContinueOnError)
	fs.SetOutput(discard{})
	var f edgeFlags
	f.register(fs, r.mode)
	if err := fs.Parse(r.args); err != nil {
		return "", fmt.Errorf("reload: command line: %v", err)
	}
	if err := applySources(fs); err != nil {
		return "", fmt.Errorf("reload: nothing changed: %w", err)
	}
	var live, upgrade, restart []string
	next := map[string]string{}
	fs.VisitAll(func(fl *flag.Flag) {
		v := fl.Value.String()
		next[fl.Name] = v
		if old := r.cur[fl.Name]; old != v {
			change := fmt.Sprintf("%s %s → %s", fl.Name, quoteEmpty(old), quoteEmpty(v))
			switch {
			case reloadLive[fl.Name]:
				live = append(live, change)
			case reloadRestart[fl.Name]:
				restart = append(restart, change)
			default:
				upgrade = append(upgrade, change)
			}
		}
	})
	if len(live) > 0 {
		var lv slog.Level
		if err := lv.UnmarshalText([]byte(next["log-level"])); err != nil {
			return "", fmt.Errorf("reload: nothing changed: log-level %q: want debug, info, warn or error", next["log-level"])
		}
		if r.level != nil {
			r.level.Set(lv)
		}
		if r.remote != nil {
			r.remote.Store(next["admin-remote"] == "true")
		}
		for name := range reloadLive {
			r.cur[name] = next[name]
		}
	}
	if r.certs != nil {
		// The files are watched anyway; a reload makes a renewal take effect now.
		n, err := r.certs.Reload()
		switch {
		case err != nil:
			live = append(live, fmt.Sprintf("TLS certificates: %d reloaded, the previous kept for the others: %v", n, err))
		case n > 0:
			live = append(live, fmt.Sprintf("TLS certificates: %d reloaded", n))
		}
	}
	sort.Strings(live)
	sort.Strings(upgrade)
	sort.Strings(restart)
	var b strings.Builder
	if len(live)+len(upgrade)+len(restart) == 0 {
		b.WriteString("reloaded: no change\n")
	} else {
		b.WriteString("reloaded\n")
	}
	if len(live) > 0 {
		fmt.Fprintf(&b, "applied now: %s\n", strings.Join(live, "; "))
	}
	if len(upgrade) > 0 {
		fmt.Fprintf(&b, "applied by an edge upgrade (stickyd upgrade, or SIGUSR2: re-reads the settings, drops nothing): %s\n", strings.Join(upgrade, "; "))
	}
	if len(restart) > 0 {
		fmt.Fprintf(&b, "need a restart of stickyd (sockets and the worker set stay across an upgrade): %s\n", strings.Join(restart, "; "))
	}
	r.log.Info("settings reloaded", "applied", live, "on_upgrade", upgrade, "on_restart", restart)
	return b.String(), nil
}

func quoteEmpty(s string) string {
	if s == "" {
		return `""`
	}
	return s
}

// checkSettings is the hidden `stickyd check-settings MODE ARGS...`: it reads the settings
// as `stickyd MODE ARGS...` would (flags, STICKYD_*, the -config file) and exits without
// starting anything. An edge about to upgrade runs it with the new binary, because the new
// image re-reads the file: a file broken since the edge started must fail the upgrade, not
// the new image after the exec (which would end the edge).
func checkSettings(args []string) error {
	if len(args) == 0 || (args[0] != "demo" && args[0] != "run" && args[0] != "serve" && args[0] != "proxy") {
		return fmt.Errorf("%w: check-settings demo|run|serve|proxy [flags]", errUsage)
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.SetOutput(discard{})
	var f edgeFlags
	f.register(fs, args[0])
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := applySources(fs); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if _, err := newLogger(discard{}, f.logFormat, f.logLevel); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if _, err := sticky.ParseSources(f.key); err != nil {
		return fmt.Errorf("-key: %w", err)
	}
	if _, err := sticky.ParsePrefixes(f.trusted); err != nil {
		return fmt.Errorf("-trusted-proxies: %w", err)
	}
	return nil
}

// preflightSettings runs the binary an upgrade will exec with this edge's arguments in
// check-settings mode. A binary from before check-settings existed cannot check: that is
// not an error.
func preflightSettings() error {
	exe, err := os.Executable()
	if err != nil {
		return nil // the upgrade itself reports this
	}
	out, err := exec.Command(exe, append([]string{"check-settings"}, os.Args[1:]...)...).CombinedOutput()
	if err == nil || strings.Contains(string(out), `unknown subcommand "check-settings"`) {
		return nil
	}
	msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(string(out)), "stickyd:"))
	msg = strings.TrimPrefix(msg, errUsage.Error()+": ")
	return fmt.Errorf("the new image would not start with these settings, so the edge stays as it is: %s", msg)
}

// modesOf names the modes that have the flag name.
func modesOf(name string) string {
	var modes []string
	for _, mode := range []string{"demo", "run", "serve", "proxy"} {
		fs := flag.NewFlagSet(mode, flag.ContinueOnError)
		var f edgeFlags
		f.register(fs, mode)
		if fs.Lookup(name) != nil {
			modes = append(modes, mode)
		}
	}
	return strings.Join(modes, ", ")
}
