package wsworker

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// trackedServer serves WebSockets whose handlers read until error and are
// tracked by tr. handlers counts running handlers.
func trackedServer(t *testing.T, tr *Tracker) (*httptest.Server, *sync.WaitGroup) {
	var handlers sync.WaitGroup
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		handlers.Add(1)
		defer handlers.Done()
		defer c.Close()
		done := tr.Add(c)
		defer done()
		defer done() // idempotent
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &handlers
}

func dial(t *testing.T, srv *httptest.Server) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func waitLen(t *testing.T, tr *Tracker, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); tr.Len() != n; {
		if time.Now().After(deadline) {
			t.Fatalf("Len = %d, want %d", tr.Len(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestTrackerShutdownGoingAway(t *testing.T) {
	var tr Tracker
	srv, handlers := trackedServer(t, &tr)
	clients := []*websocket.Conn{dial(t, srv), dial(t, srv), dial(t, srv)}
	waitLen(t, &tr, 3)

	codes := make(chan int, len(clients))
	for _, c := range clients {
		go func() {
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					var ce *websocket.CloseError
					if errors.As(err, &ce) {
						codes <- ce.Code
					} else {
						codes <- -1
					}
					return // gorilla's default close handler answered the Close
				}
			}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tr.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for range clients {
		if code := <-codes; code != websocket.CloseGoingAway {
			t.Errorf("client close code %d, want 1001", code)
		}
	}
	handlers.Wait()
	if tr.Len() != 0 {
		t.Errorf("Len after Shutdown = %d", tr.Len())
	}
}

func TestTrackerForceClose(t *testing.T) {
	var tr Tracker
	srv, handlers := trackedServer(t, &tr)
	c := dial(t, srv) // never reads, so never answers the Close frame
	_ = c
	waitLen(t, &tr, 1)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := tr.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
	handlers.Wait() // the force close ended the handler
	waitLen(t, &tr, 0)

	// The client sees the 1001 frame, then the connection ends.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, rerr := c.ReadMessage()
	if !websocket.IsCloseError(rerr, websocket.CloseGoingAway) {
		t.Errorf("client read %v, want close 1001", rerr)
	}
}

func TestTrackerZeroAndIdempotent(t *testing.T) {
	var tr Tracker
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	tr.GoingAway()
	if tr.Len() != 0 {
		t.Fatal(tr.Len())
	}
}

func TestTrackerAddDuringShutdown(t *testing.T) {
	var tr Tracker
	srv, _ := trackedServer(t, &tr)
	tr.Shutdown(context.Background()) // nothing tracked: returns, marks shutting down
	c := dial(t, srv)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err := c.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseGoingAway) {
		t.Errorf("late conn read %v, want close 1001", err)
	}
}
