// Command stickyd is a sticky-session WebSocket load balancer for one host.
//
//	stickyd demo                         edge on :8080 with 4 built-in Go echo workers
//	stickyd run [flags] -- CMD ARGS...   spawn workers (Go, or Node apps unmodified)
//	stickyd health -url URL              exit 0 when URL answers 200 (container health checks)
//
// Every flag has an environment equivalent: -listen is STICKYD_LISTEN, -shutdown-timeout
// is STICKYD_SHUTDOWN_TIMEOUT, and so on. A flag on the command line wins.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "stickyd:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

const usage = `stickyd — sticky-session WebSocket load balancer

Usage:
  stickyd demo [flags]                 edge on :8080, 4 built-in Go echo workers, metrics on :9090
  stickyd run [flags] -- CMD ARGS...   spawn -workers copies of CMD as workers (Go or Node)
  stickyd serve -control PATH [flags]  sidecar: Go workers started elsewhere connect to PATH
  stickyd health -url URL              exit 0 when URL answers 200 OK
  stickyd drain -url URL               ask a running edge to drain (e.g. a Kubernetes preStop hook)
  stickyd upgrade [-url URL]           replace the running edge's binary in place (same as SIGUSR2):
                                       WebSockets, workers, sessions and keep-alive clients stay
  stickyd version

Run "stickyd run -h" for the flags.`

func run(ctx context.Context, args []string, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("%w: no subcommand", errUsage)
	}
	switch args[0] {
	case "demo":
		return runEdge(ctx, "demo", args[1:], stderr)
	case "run":
		return runEdge(ctx, "run", args[1:], stderr)
	case "serve":
		return runEdge(ctx, "serve", args[1:], stderr)
	case "drain":
		return runPost(ctx, "drain", "http://127.0.0.1:9090/admin/drain", args[1:])
	case "demo-worker":
		log, err := newLogger(stderr, "text", "info")
		if err != nil {
			return err
		}
		return runDemoWorker(ctx, args[1:], log)
	case "health":
		return runHealth(ctx, args[1:])
	case "upgrade":
		return runUpgrade(ctx, args[1:])
	case "version", "-version", "--version":
		fmt.Println("stickyd", version, "handover="+strconv.Itoa(handoverFormat))
		return nil
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(stderr, usage)
		return nil
	}
	fmt.Fprintln(stderr, usage)
	return fmt.Errorf("%w: unknown subcommand %q", errUsage, args[0])
}

func runHealth(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	url := fs.String("url", "http://127.0.0.1:9090/healthz", "URL to check")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", *url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health: %s answered %s", *url, resp.Status)
	}
	return nil
}

// runPost POSTs to an admin URL and succeeds on 200 (drain, restart).
func runPost(ctx context.Context, name, def string, args []string) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	url := fs.String("url", def, "admin URL")
	timeout := fs.Duration("timeout", 60*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", *url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s answered %s: %s", name, *url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("-log-format %q: want text or json", format)
}
