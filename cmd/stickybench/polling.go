//go:build unix

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	mixEcho = "echo: per virtual client once GET ?EIO=4&transport=polling (open packet 0{\"sid\"}), " +
		"POST &sid=SID body 40 (socket.io CONNECT), GET &sid=SID until 40{...} (CONNECT ack; the fixture's hello event rides along); " +
		"then loop: POST &sid=SID body 42<id>[\"echo\",\"<size bytes>\"] (event with ack) + GET &sid=SID answering 43<id>[\"...\"] (the ack). " +
		"A ping 2 in a GET is answered with POST 3. On an error the client starts a new session."
	mixHandshake = "handshake: loop: GET ?EIO=4&transport=polling (open packet 0{\"sid\"}) + POST &sid=SID body 1 (engine.io close)"
)

type pollingResult struct {
	Mode       string `json:"mode"`
	URL        string `json:"url"`
	Mix        string `json:"mix"`
	RequestMix string `json:"request_mix"`
	PinSources bool   `json:"pin_sources"`
	C          int    `json:"c"`
	Sources    int    `json:"sources"`
	Requests   int64  `json:"requests"`
	Iterations int64  `json:"iterations"`
	Sessions   int64  `json:"sessions"`
	Errors     int64  `json:"errors"`
	// SessionUnknown counts the errors that were engine.io's 400 "Session ID unknown":
	// a request of a session reached a worker that does not hold it.
	SessionUnknown int64    `json:"session_unknown"`
	ErrorSample    []string `json:"error_sample,omitempty"`
	Seconds        float64  `json:"seconds"`
	Rate           float64  `json:"rate"`
	IterRate       float64  `json:"iterations_rate"`
	latency
}

// parseOpenSid returns the sid of an engine.io v4 open packet `0{"sid":"..."}`; the
// payload may hold further packets after a record separator (0x1e).
func parseOpenSid(body []byte) (string, error) {
	pkt, _, _ := bytes.Cut(body, []byte{0x1e})
	if len(pkt) < 2 || pkt[0] != '0' {
		return "", fmt.Errorf("not an engine.io open packet: %q", trunc(body))
	}
	var open struct {
		Sid string `json:"sid"`
	}
	if err := json.Unmarshal(pkt[1:], &open); err != nil {
		return "", fmt.Errorf("open packet: %v: %q", err, trunc(body))
	}
	if open.Sid == "" {
		return "", fmt.Errorf("open packet without sid: %q", trunc(body))
	}
	return open.Sid, nil
}

func trunc(b []byte) string {
	if len(b) > 120 {
		return string(b[:120]) + "…"
	}
	return string(b)
}

// splitPackets splits an engine.io v4 polling payload into its packets.
func splitPackets(body []byte) []string {
	if len(body) == 0 {
		return nil
	}
	return strings.Split(string(body), "\x1e")
}

func runPolling(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("polling", flag.ContinueOnError)
	var cm common
	cm.register(fs, "http://127.0.0.1:8080/socket.io/")
	c := fs.Int("c", 50, "virtual clients (and idle keep-alive connections)")
	d := fs.Duration("d", 0, "duration (required)")
	mix := fs.String("mix", "echo", "request mix: echo (steady sessions, POST event+ack / GET) or handshake (GET open + POST close)")
	size := fs.Int("size", 16, "echo payload bytes (mix echo)")
	pin := fs.Bool("pin-sources", false, "virtual client i sends every request from source address i%sources (own keep-alive pool per address, like clients with one IP each; what IP-hash balancers assume); default: one pool whose connections rotate over the addresses, so a session's requests may arrive from several addresses")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cm.timeout == 10*time.Second {
		cm.timeout = 35 * time.Second // a GET may be held up to pingInterval (25 s)
	}
	u, err := cm.check("http")
	if err != nil {
		return err
	}
	if *d <= 0 || *d > time.Hour {
		return errors.New("-d is required: 1ns..1h")
	}
	if *c <= 0 || *c > 10000 {
		return errors.New("-c: want 1..10000")
	}
	if *mix != "echo" && *mix != "handshake" {
		return fmt.Errorf("-mix %q: echo or handshake", *mix)
	}
	if *size < 1 || *size > 1<<16 {
		return errors.New("-size: want 1..65536")
	}
	res, err := polling(ctx, &cm, u, *c, *d, *mix, *size, *pin)
	if err != nil {
		return err
	}
	return emit(out, res)
}

type poller struct {
	client   *http.Client
	u        *url.URL
	requests atomic.Int64
	unknown  atomic.Int64
	errs     *errSample
	parent   *poller // counters live here when set
}

func (p *poller) counters() *poller {
	if p.parent != nil {
		return p.parent
	}
	return p
}

// isSessionUnknown reports whether an engine.io answer is its "Session ID unknown" error
// (400 {"code":1,"message":"Session ID unknown"}).
func isSessionUnknown(status int, body []byte) bool {
	return status == http.StatusBadRequest && bytes.Contains(body, []byte("Session ID unknown"))
}

// do runs one request and returns the body of a 200; anything else is an error that
// carries the status and the body (so "Session ID unknown" shows up).
func (p *poller) do(ctx context.Context, method, sid string, body string, lat *[]time.Duration) ([]byte, error) {
	q := url.Values{"EIO": {"4"}, "transport": {"polling"}}
	if sid != "" {
		q.Set("sid", sid)
	}
	u := *p.u
	u.RawQuery = q.Encode()
	var rd io.Reader
	if method == http.MethodPost {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, err
	}
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "text/plain;charset=UTF-8")
	}
	t0 := time.Now()
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	resp.Body.Close()
	p.counters().requests.Add(1)
	*lat = append(*lat, time.Since(t0))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		if isSessionUnknown(resp.StatusCode, b) && ctx.Err() == nil {
			p.counters().unknown.Add(1)
		}
		return nil, fmt.Errorf("%s %s: %d %s", method, strings.SplitN(body, "[", 2)[0], resp.StatusCode, trunc(b))
	}
	return b, nil
}

func polling(ctx context.Context, cm *common, u *url.URL, c int, dur time.Duration, mix string, size int, pin bool) (*pollingResult, error) {
	pools := 1
	if pin {
		pools = cm.sources
	}
	var pollers []*poller
	for i := range pools {
		dial := sourceDialer(cm.sources, cm.timeout)
		if pin && cm.sources > 1 {
			d := &net.Dialer{Timeout: cm.timeout, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i+1))}}
			dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp4", addr) }
		}
		tr := &http.Transport{
			DialContext:         dial,
			MaxIdleConnsPerHost: c,
			MaxIdleConns:        c,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		}
		defer tr.CloseIdleConnections()
		pollers = append(pollers, &poller{client: &http.Client{Transport: tr, Timeout: cm.timeout}, u: u})
	}
	p := &poller{errs: newErrSample()} // the counters; pollers[i] only carries a client
	for _, q := range pollers {
		q.parent = p
	}
	var iters, sessions atomic.Int64
	var rec recorder
	rctx, cancel := context.WithTimeout(ctx, dur)
	defer cancel()
	stop := progress(cm.quiet, "polling", func() string {
		return fmt.Sprintf("requests=%d iterations=%d errors=%d", p.requests.Load(), iters.Load(), p.errs.n.Load())
	})
	payload := strings.Repeat("x", size)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := pollers[i%len(pollers)]
			var lat []time.Duration
			defer func() { rec.merge(lat) }()
			fail := func(err error) {
				if rctx.Err() == nil {
					p.counters().errs.add(err.Error())
				}
			}
			sid := ""
			ack := 0
			for rctx.Err() == nil {
				if mix == "handshake" {
					b, err := p.do(rctx, http.MethodGet, "", "", &lat)
					if err != nil {
						fail(err)
						continue
					}
					sid, err := parseOpenSid(b)
					if err != nil {
						fail(err)
						continue
					}
					sessions.Add(1)
					if _, err := p.do(rctx, http.MethodPost, sid, "1", &lat); err != nil {
						fail(err)
						continue
					}
					iters.Add(1)
					continue
				}
				if sid == "" {
					s, err := p.openSession(rctx, &lat)
					if err != nil {
						fail(err)
						continue
					}
					sid = s
					sessions.Add(1)
				}
				ack++
				id := strconv.Itoa(ack)
				if _, err := p.do(rctx, http.MethodPost, sid, "42"+id+`["echo","`+payload+`"]`, &lat); err != nil {
					fail(err)
					sid = ""
					continue
				}
				want := "43" + id + "["
				for got := false; !got && rctx.Err() == nil; {
					b, err := p.do(rctx, http.MethodGet, sid, "", &lat)
					if err != nil {
						fail(err)
						sid = ""
						break
					}
					for _, pk := range splitPackets(b) {
						switch {
						case strings.HasPrefix(pk, want):
							got = true
						case pk == "2":
							if _, err := p.do(rctx, http.MethodPost, sid, "3", &lat); err != nil {
								fail(err)
							}
						}
					}
				}
				if sid != "" && rctx.Err() == nil {
					iters.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	stop()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	desc := mixEcho
	if mix == "handshake" {
		desc = mixHandshake
	}
	return &pollingResult{
		Mode: "polling", URL: cm.url, Mix: mix, RequestMix: desc, PinSources: pin, C: c, Sources: cm.sources,
		Requests: p.requests.Load(), Iterations: iters.Load(), Sessions: sessions.Load(),
		Errors: p.errs.n.Load(), SessionUnknown: p.unknown.Load(), ErrorSample: p.errs.list(),
		Seconds: round3(el.Seconds()), Rate: round1(float64(p.requests.Load()) / el.Seconds()),
		IterRate: round1(float64(iters.Load()) / el.Seconds()), latency: rec.summary(),
	}, nil
}

// openSession opens an engine.io session and connects the main socket.io namespace.
func (p *poller) openSession(ctx context.Context, lat *[]time.Duration) (string, error) {
	b, err := p.do(ctx, http.MethodGet, "", "", lat)
	if err != nil {
		return "", err
	}
	sid, err := parseOpenSid(b)
	if err != nil {
		return "", err
	}
	if _, err := p.do(ctx, http.MethodPost, sid, "40", lat); err != nil {
		return "", err
	}
	for range 3 {
		b, err := p.do(ctx, http.MethodGet, sid, "", lat)
		if err != nil {
			return "", err
		}
		for _, pk := range splitPackets(b) {
			if strings.HasPrefix(pk, "40") {
				return sid, nil
			}
			if strings.HasPrefix(pk, "44") {
				return "", fmt.Errorf("socket.io CONNECT refused: %q", trunc([]byte(pk)))
			}
		}
	}
	return "", errors.New("no socket.io CONNECT ack after 3 GETs")
}
