//go:build unix

package main

import (
	"math"
	"slices"
	"sync"
	"time"
)

// percentile returns the p-th percentile (0 < p <= 100) of sorted by nearest rank:
// the smallest value with at least p % of the samples at or below it. Zero for none.
func percentile(sorted []time.Duration, p float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	if p <= 0 {
		return sorted[0]
	}
	rank := int(math.Ceil(p / 100 * float64(n)))
	if rank < 1 {
		rank = 1
	}
	if rank > n {
		rank = n
	}
	return sorted[rank-1]
}

// recorder collects latency samples from many goroutines; each goroutine appends to
// its own slice (no lock per sample) and hands it over once.
type recorder struct {
	mu  sync.Mutex
	all []time.Duration
}

func (r *recorder) merge(s []time.Duration) {
	r.mu.Lock()
	r.all = append(r.all, s...)
	r.mu.Unlock()
}

// summary sorts the samples and returns count, p50, p99 and max.
type latency struct {
	P50ms float64 `json:"p50_ms"`
	P99ms float64 `json:"p99_ms"`
	Maxms float64 `json:"max_ms"`
}

func (r *recorder) summary() latency {
	r.mu.Lock()
	defer r.mu.Unlock()
	slices.Sort(r.all)
	return summarize(r.all)
}

func summarize(sorted []time.Duration) latency {
	return latency{
		P50ms: ms(percentile(sorted, 50)),
		P99ms: ms(percentile(sorted, 99)),
		Maxms: ms(percentile(sorted, 100)),
	}
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

func round1(f float64) float64 { return math.Round(f*10) / 10 }

// slope is (y2-y1)/(x2-x1), or 0 when x2 == x1.
func slope(x1, y1, x2, y2 float64) float64 {
	if x2 == x1 {
		return 0
	}
	return (y2 - y1) / (x2 - x1)
}

func round2(f float64) float64 { return math.Round(f*100) / 100 }

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }
