//go:build unix

package workers

import (
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stickyd/stickyd/fdpass"
	"github.com/stickyd/stickyd/metrics"
)

// The test binary doubles as a Go worker: the supervisor re-executes it with workerEnv
// set, so the tests run real child processes.
const workerEnv = "WORKERS_TEST_WORKER"

func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) != "" {
		os.Exit(testWorker())
	}
	os.Exit(m.Run())
}

// testWorker serves "ok" on every request until the edge hangs up.
func testWorker() int {
	ln, err := fdpass.Listen()
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})}
	go srv.Serve(ln)
	<-ln.Done()
	return 0
}

// fakeEdge is an Edge that records what the workers do to routing.
type fakeEdge struct {
	settings Settings
	mu       sync.Mutex
	routed   map[int]*Worker
}

func newFakeEdge(log *slog.Logger) *fakeEdge {
	m, _ := metrics.New(nil, false)
	return &fakeEdge{settings: Settings{HandoffTimeout: 5 * time.Second, WorkerIdle: 4 * time.Second, Logger: log, Metrics: m},
		routed: map[int]*Worker{}}
}

func (e *fakeEdge) AddWorker(w *Worker) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.routed[w.Slot] = w
}

func (e *fakeEdge) RemoveWorker(w *Worker) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.routed[w.Slot] == w {
		delete(e.routed, w.Slot)
	}
	w.SetState(StateGone)
}

func (e *fakeEdge) Drain(slot int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	w := e.routed[slot]
	return w != nil && w.CompareAndSwapState(StateReady, StateDraining)
}

func (e *fakeEdge) Load(int) int             { return 0 }
func (e *fakeEdge) WorkerSettings() Settings { return e.settings }
