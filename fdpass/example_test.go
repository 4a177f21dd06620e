//go:build unix

package fdpass_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"time"

	"github.com/stickyd/stickyd/fdpass"
)

// A Go worker behind `stickyd run -- ./worker` (or `stickyd serve`, with
// STICKYD_CONTROL naming the edge's control socket): Listen returns a net.Listener
// whose connections are the clients the edge routed here, with their real addresses.
// WebSocket upgrades arrive as the client's own socket; plain requests arrive over
// keep-alive connections from the edge. Anything that serves a net.Listener works.
func ExampleListen() {
	ln, err := fdpass.Listen()
	if err != nil {
		// Not started by stickyd: the error says how to run it.
		fmt.Println(err != nil)
		return
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from "+r.RemoteAddr+"\n") // the client's address, not the edge's
	})}
	go srv.Serve(ln)
	<-ln.Done() // the edge went away (shut down or upgraded without us): stop too
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Print(err)
	}
	// Output: true
}
