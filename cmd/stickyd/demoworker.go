//go:build unix

package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"html/template"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/gorilla/websocket"

	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/wsworker"
)

//go:embed demo.html
var demoHTML string

var demoPage = template.Must(template.New("demo").Parse(demoHTML))

// runDemoWorker is the built-in Go worker of `stickyd demo`: an echo WebSocket at /ws,
// a page at / that shows which worker serves its WebSocket, and /whoami. It is an
// ordinary http.Server on the listener fdpass.Listen returns.
func runDemoWorker(ctx context.Context, args []string, log *slog.Logger) error {
	fs := flag.NewFlagSet("demo-worker", flag.ContinueOnError)
	control := fs.String("control", os.Getenv(fdpass.EnvControl), "edge control socket to dial (sidecar mode); default: the channel inherited from `stickyd run`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var ln *fdpass.Listener
	var err error
	if *control != "" && os.Getenv(fdpass.EnvFD) == "" {
		ln, err = fdpass.Dial(*control)
	} else {
		ln, err = fdpass.Listen()
	}
	if err != nil {
		return err
	}
	id := os.Getenv(fdpass.EnvWorkerID)
	pid := os.Getpid()
	var tracker wsworker.Tracker
	up := websocket.Upgrader{ReadBufferSize: 1024, WriteBufferSize: 1024}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		demoPage.Execute(w, struct {
			Worker string
			PID    int
		}{id, pid})
	})
	mux.HandleFunc("GET /whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"worker": id, "pid": pid, "remote": r.RemoteAddr})
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return // the Upgrader has answered the client
		}
		done := tracker.Add(c)
		defer done()
		defer c.Close()
		hello, _ := json.Marshal(map[string]any{"type": "hello", "worker": id, "pid": pid, "remote": r.RemoteAddr})
		wsworker.Echo(c, hello, 60*time.Second)
	})
	// fdpass.Handler: the client's address in r.RemoteAddr on proxied requests too.
	srv := &http.Server{Handler: fdpass.Handler(mux), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	srv.RegisterOnShutdown(tracker.GoingAway)
	go ln.ReportWebSocketsFrom(ctx, tracker.Len)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case <-ln.Done(): // the edge went away
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	ln.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Shutdown runs the tracker's hook: every WebSocket gets close code 1001.
	srv.Shutdown(sctx)
	tracker.Shutdown(sctx)
	return nil
}
