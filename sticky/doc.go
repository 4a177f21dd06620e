// Package sticky decides who a client is and which worker slot gets it.
//
// It is pure code: no I/O, no goroutines, stdlib and xxhash only, so the
// edge can call it on the hot path and tests can pin its behaviour exactly.
//
//   - Rules.Identify turns a request head into a Key: the engine.io sid, a
//     cookie, a header, the client address reported by trusted proxies, or
//     the peer address, whichever source matches first.
//   - Balance.Pick maps a key onto live worker slots with rendezvous (HRW)
//     hashing under a load cap, and LeastLoaded places keyless requests by the
//     power of two choices.
//   - Table remembers learned key -> slot mappings (sids seen in handshake
//     responses) with idle expiry and an LRU cap.
//
// Measured on the development VM (go test -run XXX -bench . ./sticky/):
// a Table entry with a 20-byte key costs about MEMORY bytes including the key
// (BenchmarkTableMemory).
package sticky
