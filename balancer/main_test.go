//go:build unix

package balancer

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/fdpass/wsworker"
	"github.com/stickyd/stickyd/upgrade"
)

// The test binary doubles as a Go worker: the supervisor re-executes it with
// BALANCER_TEST_WORKER set, so the tests run real child processes.
const workerEnv = "BALANCER_TEST_WORKER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(workerEnv); mode != "" {
		os.Exit(testWorker(mode))
	}
	os.Exit(m.Run())
}

// testWorker is a small Go worker. Modes: "echo" serves; "stuck" announces itself and
// never reads its channel again; "crash" exits as soon as a connection arrives.
func testWorker(mode string) int {
	if m, dir, ok := strings.Cut(mode, ":"); ok && m == "rogue" || mode == "rogue" {
		return rogueWorker(dir)
	}
	if mode == "stuck" {
		ln, err := fdpass.Listen()
		if err != nil {
			return 1
		}
		_ = ln
		select {} // the receive goroutine blocks on the unbuffered channel: nobody accepts
	}
	var ln net.Listener
	var err error
	if mode == "tcp" {
		// Baseline for benchmarks: the same worker, reached directly.
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			os.Stdout.WriteString(ln.Addr().String() + "\n")
		}
	} else {
		ln, err = fdpass.Listen()
	}
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	id := os.Getenv(fdpass.EnvWorkerID)
	if mode == "crash" {
		ln.Accept()
		os.Exit(3)
	}
	var tracker wsworker.Tracker
	var up websocket.Upgrader
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer tracker.Add(c)()
		defer c.Close()
		hello, _ := json.Marshal(map[string]any{"worker": id, "pid": os.Getpid(), "remote": r.RemoteAddr})
		c.WriteMessage(websocket.TextMessage, hello)
		for {
			typ, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			c.WriteMessage(typ, msg)
		}
	})
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"worker": id, "pid": os.Getpid(), "xff": r.Header.Get("X-Forwarded-For")})
	})
	mux.HandleFunc("/echo-body", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(w, r.Body)
		_ = n
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		io.WriteString(w, "slow "+id)
	})
	mux.HandleFunc("/close", func(w http.ResponseWriter, r *http.Request) {
		// Like @socket.io/sticky 2.x workers: every answer closes the connection.
		w.Header().Set("Connection", "close")
		io.WriteString(w, "closed "+id)
	})
	mux.HandleFunc("/socket.io/", engineIOStandIn(id))
	srv := &http.Server{Handler: mux}
	srv.RegisterOnShutdown(tracker.GoingAway)
	if mode == "tcp" {
		srv.Serve(ln)
		return 0
	}
	go srv.Serve(ln)
	<-ln.(*fdpass.Listener).Done()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	tracker.Shutdown(ctx)
	return 0
}

// engineIOStandIn answers like engine.io v4 polling: a handshake mints a sid owned by
// this worker; a request naming a sid this worker did not mint gets engine.io's 400.
func engineIOStandIn(id string) http.HandlerFunc {
	var mu sync.Mutex
	sids := map[string]bool{}
	var n int
	return func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		sid := r.URL.Query().Get("sid")
		if sid == "" {
			n++
			sid = "w" + id + "s" + strconv.Itoa(n) + strings.Repeat("x", 12)
			sids[sid] = true
			if r.URL.Query().Get("cookie") != "" {
				http.SetCookie(w, &http.Cookie{Name: "io", Value: sid, Path: "/", HttpOnly: true})
			}
			w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
			io.WriteString(w, `0{"sid":"`+sid+`","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}`)
			return
		}
		if !sids[sid] {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(400)
			io.WriteString(w, upgrade.SessionUnknownBody)
			return
		}
		io.WriteString(w, "6:worker"+id)
	}
}

// The misbehaving answers of the rogue worker, each written as the worker would: the
// extra bytes in a write of their own, so they are not read together with the answer.
const (
	rogueLeak      = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nSet-Cookie: victim=SECRET\r\n\r\nLEAKED"
	rogueMarkLate  = "late-sent"
	rogueMarkDying = "dying"
)

// rogueWorker is a worker that breaks HTTP/1.1 on purpose, one way per path:
//
//	/whoami           a correct answer naming the request's X-Req and the worker
//	/extra            Content-Length: 2 and then more bytes (a whole second response)
//	/204              a 204 followed by a body
//	HEAD /head        a HEAD answer followed by a body
//	/late             a correct answer, then 50 ms later an unsolicited response
//
// Each of those creates dir/late-sent-ID once its extra bytes are written.
//
//	/hang             never answers
//	/die              reads the whole request, then exits (dir/dying first)
//
// It reads requests with net/http's parser and writes its answers by hand.
func rogueWorker(dir string) int {
	ln, err := fdpass.Listen()
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	id := os.Getenv(fdpass.EnvWorkerID)
	mark := func(name string) {
		if dir != "" {
			os.WriteFile(dir+"/"+name+"-"+id, nil, 0o644)
		}
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return 0
		}
		go func() {
			defer c.Close()
			br := bufio.NewReader(c)
			for {
				r, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				io.Copy(io.Discard, r.Body)
				answer := func(s string) {
					if _, err := io.WriteString(c, s); err != nil {
						return
					}
				}
				switch r.URL.Path {
				case "/extra":
					answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
					time.Sleep(20 * time.Millisecond) // a write of its own
					answer(rogueLeak)
					mark(rogueMarkLate)
				case "/204":
					answer("HTTP/1.1 204 No Content\r\n\r\n")
					time.Sleep(20 * time.Millisecond)
					answer(rogueLeak)
					mark(rogueMarkLate)
				case "/head":
					answer("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
					time.Sleep(20 * time.Millisecond)
					answer("LEAKED")
					mark(rogueMarkLate)
				case "/late":
					answer("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
					go func() {
						time.Sleep(50 * time.Millisecond)
						answer(rogueLeak)
						mark(rogueMarkLate)
					}()
				case "/hang":
					select {}
				case "/die":
					mark(rogueMarkDying)
					os.Exit(7)
				default:
					body := "worker=" + id + " req=" + r.Header.Get("X-Req") + " xff=" + r.Header.Get("X-Forwarded-For") +
						" xfp=" + r.Header.Get("X-Forwarded-Proto") + " fwd=" + strings.Join(r.Header.Values("Forwarded"), ", ") + " expect=" + r.Header.Get("Expect") +
						" client=" + strings.Join(r.Header.Values("X-Stickyd-Client-Addr"), "|")
					answer("HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\nSet-Cookie: owner=" + r.Header.Get("X-Req") + "\r\n\r\n" + body)
				}
			}
		}()
	}
}
