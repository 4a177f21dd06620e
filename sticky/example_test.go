package sticky_test

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/stickyd/stickyd/sticky"
)

func Example() {
	srcs, _ := sticky.ParseSources("sid,cookie:io,xff,ip")
	trusted, _ := sticky.ParsePrefixes("10.0.0.0/8")
	rules := sticky.Rules{Sources: srcs, TrustedProxies: trusted}

	// A request that reached us through a trusted proxy at 10.0.0.1.
	key := rules.Identify(sticky.Request{
		Peer:  netip.MustParseAddr("::ffff:10.0.0.1"),
		Query: "EIO=4&transport=polling&t=N8hyd6w",
		Header: func(name string) string {
			if name == "X-Forwarded-For" {
				return "203.0.113.7, 10.0.0.9"
			}
			return ""
		},
	})
	fmt.Println(key)

	// Learned sids win; otherwise hash with a load cap over the live slots.
	var table sticky.Table
	workers := []sticky.Candidate{{Slot: 0, Load: 3}, {Slot: 1, Load: 2}, {Slot: 2, Load: 4}}
	slot, ok := table.Get(key.String(), time.Now())
	if !ok {
		slot = workers[sticky.Balance{}.Pick(key.Hash(), workers)].Slot
	}
	fmt.Println(slot >= 0 && slot <= 2)
	// Output:
	// xff:203.0.113.7
	// true
}
