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
// Measured on the 2-vCPU AMD EPYC development VM with
// `go test -run XXX -bench . -cpu 1 -count 5 ./sticky/` (medians):
//
//   - Table memory: 117 bytes per entry with a 20-byte key (93 bytes of
//     table structure plus the key's 24-byte allocation), 100k entries
//     (BenchmarkTableMemory); 1M sessions cost about 117 MB.
//   - Pick: 31 ns over 8 slots, 181 ns over 64 (BenchmarkPick8/64). On this
//     VM 64 bare splitmix64 mixes already take about 108 ns, so the scan is
//     mostly the hashing itself.
//   - Identify: 73 ns for a polling request with a sid, 0 allocations
//     (BenchmarkIdentify/sid); 220 ns through X-Forwarded-For, 355 ns
//     through Forwarded.
//   - Spread: max/mean load 1.050 for 10,000 keys over 8 workers; removing
//     one of 8 workers moves 0.1250 of the keys (ideal 1/8), none between
//     survivors (BenchmarkSpread).
package sticky
