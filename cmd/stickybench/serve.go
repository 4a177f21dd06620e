//go:build unix

package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/gorilla/websocket"

	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/wsworker"
)

// echoHandler serves /ws like stickyd's demo worker (a JSON hello, then every message
// echoed with its type) and /whoami.
func echoHandler(id string) (http.Handler, *wsworker.Tracker) {
	pid := os.Getpid()
	tracker := new(wsworker.Tracker)
	up := websocket.Upgrader{ReadBufferSize: 1024, WriteBufferSize: 1024}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"worker": id, "pid": pid, "remote": r.RemoteAddr})
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		defer tracker.Add(c)()
		hello, _ := json.Marshal(map[string]any{"type": "hello", "worker": id, "pid": pid, "remote": r.RemoteAddr})
		wsworker.Echo(c, hello, 120*time.Second)
	})
	return mux, tracker
}

// runServe is `serve` (a TCP listener, the direct baseline) or `serve-worker` (the
// connections come from a stickyd edge through fdpass.Listen).
func runServe(ctx context.Context, args []string, worker bool) error {
	name := "serve"
	if worker {
		name = "serve-worker"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	listen := "127.0.0.1:0"
	if !worker {
		fs.StringVar(&listen, "listen", listen, "loopback address to listen on (port 0: any); the bound address is printed as JSON on stdout")
	}
	id := fs.String("id", os.Getenv(fdpass.EnvWorkerID), "worker id in the hello (default: $"+fdpass.EnvWorkerID+", else the pid)")
	var certFile, keyFile string
	if !worker {
		fs.StringVar(&certFile, "tls-cert", "", "serve TLS with this certificate (and -tls-key): the direct baseline of compare -tls")
		fs.StringVar(&keyFile, "tls-key", "", "the key of -tls-cert")
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *id == "" {
		*id = fmt.Sprint(os.Getpid())
	}
	var ln net.Listener
	var fl *fdpass.Listener
	if worker {
		var err error
		fl, err = fdpass.Listen()
		if err != nil {
			return err
		}
		ln = fl
	} else {
		host, _, err := net.SplitHostPort(listen)
		if err != nil {
			return fmt.Errorf("-listen: %v", err)
		}
		if err := checkLoopback(host); err != nil {
			return fmt.Errorf("-listen: %v", err)
		}
		ln, err = net.Listen("tcp", listen)
		if err != nil {
			return err
		}
		if certFile != "" {
			cert, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				return fmt.Errorf("-tls-cert: %v", err)
			}
			ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
		}
		emit(os.Stdout, map[string]any{"mode": "serve", "listen": ln.Addr().String(), "pid": os.Getpid()})
	}
	h, tracker := echoHandler(*id)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	srv.RegisterOnShutdown(tracker.GoingAway)
	var done <-chan struct{}
	if fl != nil {
		done = fl.Done()
		go fl.ReportWebSocketsFrom(ctx, tracker.Len)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case <-done:
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	ln.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	tracker.Shutdown(sctx)
	return nil
}
