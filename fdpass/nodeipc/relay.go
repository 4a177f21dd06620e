//go:build unix

package nodeipc

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Relay forwards @socket.io/cluster-adapter messages between the Node workers of one app, as
// the adapter's setupPrimary() does in a Node cluster primary. Without it an app that follows
// the socket.io cluster recipe (io.adapter(createAdapter())) loses every cross-worker message:
// io.emit reaches only the clients of the emitting worker, fetchSockets sees only its own.
//
// The adapter (NodeClusterAdapter of @socket.io/cluster-adapter 0.3.x, over socket.io-adapter's
// ClusterAdapterWithHeartbeat) sends every message with
// process.send({source:"_sio_adapter", type, uid, nsp, data, requesterUid?}). setupPrimary
// records, per worker, every uid (one per namespace) that worker sent, then:
//   - FETCH_SOCKETS_RESPONSE (8) and SERVER_SIDE_EMIT_RESPONSE (10) go to the one worker that
//     sent requesterUid (dropped when none did);
//   - everything else goes to every worker but the sender.
//
// (0.1.x/0.2.x, which carry no uid and number their types differently, are routed as their
// own setupPrimary does: responses by data.workerId, the cluster.worker.id of the requester;
// a worker that goes away is announced with WORKER_EXIT.)
//
// Relay does the same, with two differences that change nothing the adapter can observe:
// BROADCAST_CLIENT_COUNT (11) and BROADCAST_ACK (12) — responses that setupPrimary sends to
// every other worker, where all but the requester ignore them — go to the requester only when
// it is known (one copy instead of N-1 per client acknowledgement); and when a worker goes
// away (exit, crash) the others get an ADAPTER_CLOSE (13) for each of its uids, so that their
// fetchSockets/serverSideEmit stop waiting for it at once instead of timing out (5 s) until
// the heartbeat timeout (10 s) removes it.
//
// Messages are relayed byte for byte as received. In JSON serialization mode (the only mode
// stickyd speaks) a Buffer in a packet travels as {"type":"Buffer","data":[...]}: the preload
// turns those back into Buffers in the receiving worker (0.3.x; see preload.js). Messages
// sent to a worker while it is being handed to the next edge image (stickyd upgrade) are
// lost, like those to a worker that is not running.
//
// The relay never blocks a worker's reader: each worker has a bounded queue (QueueLen
// messages, QueueBytes bytes) drained by its own writer goroutine; a message that does not fit
// is dropped for that worker, counted and logged (at most once per 10 s per worker). A message
// is held once in memory whatever the number of its receivers.
//
// The zero value is usable. Set the fields before the first worker joins.
type Relay struct {
	QueueLen   int // messages queued per worker; 0: 4096
	QueueBytes int // bytes queued per worker (a single larger message still fits an empty queue); 0: 16 MiB
	// Stats, if set, is called with counts of message copies: relayed (written to a worker's
	// channel) and dropped (its queue was full, the worker went away before they were
	// written, or a response's requester is unknown). It is called from several goroutines.
	Stats func(relayed, dropped int)

	relayed, dropped atomic.Int64

	mu      sync.Mutex
	members map[*relayMember]struct{}
	uids    map[string]*relayMember // adapter uid -> the worker that sent it
	legacy  map[int]*relayMember    // 0.1/0.2 adapters: cluster.worker.id -> the worker
}

// Adapter message types (socket.io-adapter's MessageType) the relay routes specially.
const (
	sioFetchSocketsResponse   = 8
	sioServerSideEmitResponse = 10
	sioBroadcastClientCount   = 11
	sioBroadcastAck           = 12
	sioAdapterClose           = 13
	sioSource                 = "_sio_adapter"

	// @socket.io/cluster-adapter 0.1.x/0.2.x numbered its own types.
	legacyWorkerInit             = 1
	legacyWorkerPing             = 2
	legacyWorkerExit             = 3
	legacyFetchSocketsResponse   = 9
	legacyServerSideEmitResponse = 11

	maxUIDsPerWorker = 1024 // one per namespace; a bound against a runaway app
)

// RelayTotals are the relay's counts since it was created.
type RelayTotals struct {
	Relayed, Dropped int64 // copies written to a worker; copies lost (see Relay.Stats)
	Workers          int   // workers taking part now
}

// Totals returns the relay's counts.
func (r *Relay) Totals() RelayTotals {
	r.mu.Lock()
	n := len(r.members)
	r.mu.Unlock()
	return RelayTotals{Relayed: r.relayed.Load(), Dropped: r.dropped.Load(), Workers: n}
}

// relayMember is one worker taking part in the relay.
type relayMember struct {
	r        *Relay
	c        *Channel
	log      *slog.Logger
	uids     map[string]string // uid -> nsp
	legacyID *int              // (Relay.mu) cluster.worker.id a 0.1/0.2 adapter of this worker announced
	notify   chan struct{}     // capacity 1
	stop     chan struct{}
	done     chan struct{}

	qmu    sync.Mutex
	queue  [][]byte // lines without '\n'
	qbytes int

	lastWarn atomic.Int64 // unix nanos of the last overflow warning
}

// join adds a worker; its messages are relayed to the others and theirs to it until leave.
func (r *Relay) join(c *Channel, log *slog.Logger) *relayMember {
	m := &relayMember{
		r: r, c: c, log: log,
		uids:   map[string]string{},
		notify: make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	r.mu.Lock()
	if r.members == nil {
		r.members = map[*relayMember]struct{}{}
		r.uids = map[string]*relayMember{}
		r.legacy = map[int]*relayMember{}
	}
	r.members[m] = struct{}{}
	r.mu.Unlock()
	go m.write()
	return m
}

// leave removes the worker. With gone (the worker exited or its channel broke) the others are
// told that its adapters closed; without (handover to the next edge image) they are not.
func (m *relayMember) leave(gone bool) {
	r := m.r
	r.mu.Lock()
	delete(r.members, m)
	var closes [][]byte
	for uid, nsp := range m.uids {
		if r.uids[uid] == m {
			delete(r.uids, uid)
		}
		if gone {
			b, err := json.Marshal(struct {
				Type   int    `json:"type"`
				UID    string `json:"uid"`
				Nsp    string `json:"nsp"`
				Source string `json:"source"`
			}{sioAdapterClose, uid, nsp, sioSource})
			if err == nil {
				closes = append(closes, b)
			}
		}
	}
	if id := m.legacyID; id != nil {
		if r.legacy[*id] == m {
			delete(r.legacy, *id)
		}
		if gone { // what 0.1/0.2's setupPrimary sends on cluster "exit"
			b, _ := json.Marshal(struct {
				Source string `json:"source"`
				Type   int    `json:"type"`
				Data   int    `json:"data"`
			}{sioSource, legacyWorkerExit, *id})
			closes = append(closes, b)
		}
	}
	var others []*relayMember
	if len(closes) > 0 {
		for o := range r.members {
			others = append(others, o)
		}
	}
	r.mu.Unlock()
	close(m.stop)
	<-m.done
	for _, line := range closes {
		r.count(0, m.fanout(line, others))
	}
}

// adapterMsg is the part of an adapter message the relay routes on.
type adapterMsg struct {
	Source       string          `json:"source"`
	Type         json.RawMessage `json:"type"`
	UID          string          `json:"uid"`
	Nsp          string          `json:"nsp"`
	RequesterUID string          `json:"requesterUid"`
}

// isAdapterMessage is a cheap pre-check before decoding.
func isAdapterMessage(raw []byte) bool {
	return bytes.Contains(raw, []byte(`"_sio_adapter"`))
}

// handle routes one message from m's worker. It reports whether the message was an adapter
// message (consumed).
func (m *relayMember) handle(raw []byte) bool {
	if !isAdapterMessage(raw) {
		return false
	}
	var a adapterMsg
	if json.Unmarshal(raw, &a) != nil || a.Source != sioSource {
		return false
	}
	typ := -1
	if v := rawInt(a.Type); v != nil {
		typ = *v
	}
	r := m.r
	if a.UID == "" {
		return m.handleLegacy(raw, typ)
	}
	var targets []*relayMember
	r.mu.Lock()
	if a.UID != "" {
		if _, ok := m.uids[a.UID]; ok || len(m.uids) < maxUIDsPerWorker {
			m.uids[a.UID] = a.Nsp
			r.uids[a.UID] = m
		}
	}
	toRequester := false
	switch typ {
	case sioFetchSocketsResponse, sioServerSideEmitResponse:
		toRequester = true
	case sioBroadcastClientCount, sioBroadcastAck:
		_, toRequester = r.uids[a.RequesterUID]
	}
	if toRequester {
		if to := r.uids[a.RequesterUID]; to != nil {
			targets = append(targets, to)
		}
	} else {
		for o := range r.members {
			if o != m {
				targets = append(targets, o)
			}
		}
	}
	r.mu.Unlock()
	if toRequester && len(targets) == 0 {
		r.count(0, 1)
		m.log.Debug("nodeipc: cluster adapter response for an unknown requester dropped", "type", typ, "requester", a.RequesterUID)
		return true
	}
	r.count(0, m.fanout(raw, targets))
	return true
}

// handleLegacy routes a message of @socket.io/cluster-adapter 0.1.x/0.2.x (no uid; its own
// type numbers), as that version's setupPrimary does: FETCH_SOCKETS_RESPONSE (9) and
// SERVER_SIDE_EMIT_RESPONSE (11) go to the worker whose cluster.worker.id is data.workerId,
// everything else to every other worker. A worker's id is learnt from its WORKER_INIT (1) and
// WORKER_PING (2), whose data it is.
func (m *relayMember) handleLegacy(raw []byte, typ int) bool {
	var msg struct {
		Data json.RawMessage `json:"data"`
	}
	_ = json.Unmarshal(raw, &msg) // valid JSON: handle decoded it
	data := msg.Data
	r := m.r
	var targets []*relayMember
	toRequester := typ == legacyFetchSocketsResponse || typ == legacyServerSideEmitResponse
	r.mu.Lock()
	switch {
	case typ == legacyWorkerInit || typ == legacyWorkerPing:
		if id := rawInt(data); id != nil {
			m.legacyID = id
			r.legacy[*id] = m
		}
	case toRequester:
		var d struct {
			WorkerID json.RawMessage `json:"workerId"`
		}
		_ = json.Unmarshal(data, &d)
		if id := rawInt(d.WorkerID); id != nil && r.legacy[*id] != nil {
			targets = append(targets, r.legacy[*id])
		}
	}
	if !toRequester {
		for o := range r.members {
			if o != m {
				targets = append(targets, o)
			}
		}
	}
	r.mu.Unlock()
	if toRequester && len(targets) == 0 {
		r.count(0, 1)
		m.log.Debug("nodeipc: cluster adapter (0.2) response for an unknown worker dropped", "type", typ)
		return true
	}
	r.count(0, m.fanout(raw, targets))
	return true
}

func (r *Relay) count(relayed, dropped int) {
	if relayed == 0 && dropped == 0 {
		return
	}
	r.relayed.Add(int64(relayed))
	r.dropped.Add(int64(dropped))
	if r.Stats != nil {
		r.Stats(relayed, dropped)
	}
}

// fanout queues line for every target and returns how many queues were full. The writers
// count the copies they write.
func (m *relayMember) fanout(line []byte, targets []*relayMember) (dropped int) {
	for _, t := range targets {
		if !t.enqueue(line) {
			dropped++
		}
	}
	return dropped
}

func (m *relayMember) limits() (n, b int) {
	n, b = m.r.QueueLen, m.r.QueueBytes
	if n <= 0 {
		n = 4096
	}
	if b <= 0 {
		b = 16 << 20
	}
	return n, b
}

// enqueue adds line to the worker's queue unless it is full; it never blocks.
func (m *relayMember) enqueue(line []byte) bool {
	maxN, maxB := m.limits()
	m.qmu.Lock()
	ok := len(m.queue) == 0 || (len(m.queue) < maxN && m.qbytes+len(line) <= maxB)
	if ok {
		m.queue = append(m.queue, line)
		m.qbytes += len(line)
	}
	queued, qbytes := len(m.queue), m.qbytes
	m.qmu.Unlock()
	if !ok {
		now := time.Now().UnixNano()
		if last := m.lastWarn.Load(); now-last > int64(10*time.Second) && m.lastWarn.CompareAndSwap(last, now) {
			m.log.Warn("nodeipc: cluster adapter message dropped: the worker's relay queue is full (it reads its IPC channel too slowly); "+
				"cross-worker messages for it are being lost", "queued", queued, "queued_bytes", qbytes,
				"dropped_total", m.r.dropped.Load()+1)
		}
		return false
	}
	select {
	case m.notify <- struct{}{}:
	default:
	}
	return true
}

// write is the worker's writer: it sends queued lines in batches until leave or the channel
// closes. Lines still queued then are counted as dropped.
func (m *relayMember) write() {
	defer close(m.done)
	var buf []byte
	const batch = 256 << 10
	for {
		select {
		case <-m.notify:
		case <-m.stop:
			m.discard()
			return
		case <-m.c.Done():
			m.discard()
			return
		}
		for {
			buf = buf[:0]
			m.qmu.Lock()
			i := 0
			for ; i < len(m.queue) && (i == 0 || len(buf)+len(m.queue[i]) < batch); i++ {
				buf = append(buf, m.queue[i]...)
				buf = append(buf, '\n')
				m.qbytes -= len(m.queue[i])
				m.queue[i] = nil
			}
			m.queue = m.queue[i:]
			if len(m.queue) == 0 {
				m.queue = nil // let the backing array go
			}
			m.qmu.Unlock()
			if i == 0 {
				break
			}
			if err := m.c.sendRaw(buf); err != nil {
				m.r.count(0, i)
				m.discard()
				return
			}
			m.r.count(i, 0)
			if cap(buf) > 4*batch {
				buf = nil
			}
		}
	}
}

func (m *relayMember) discard() {
	m.qmu.Lock()
	n := len(m.queue)
	m.queue, m.qbytes = nil, 0
	m.qmu.Unlock()
	if n > 0 {
		m.r.count(0, n)
	}
}
