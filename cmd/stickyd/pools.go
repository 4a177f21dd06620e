//go:build unix

package main

import (
	"fmt"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/stickyd/stickyd/balancer"
	"github.com/stickyd/stickyd/balancer/workers"
	"github.com/stickyd/stickyd/metrics"
)

// poolSpec is one -pool: where its requests come from and how its workers are sized.
type poolSpec struct {
	name                          string
	path, host, header, headerVal string
	min, max, concurrency, queue  int
	idle, queueTimeout            time.Duration
	command                       []string    // nil: the default pool's command
	backends                      backendList // stickyd proxy: the pool's own backends
}

// poolList is the repeatable -pool flag. In a config file or STICKYD_POOL several pools
// arrive as one comma-joined string: an item whose key part (before "=") holds a ":"
// starts the next pool ("reports:path=/reports/,max=8,ws:path=/live/").
type poolList []poolSpec

func (l *poolList) String() string {
	var out []string
	for _, p := range *l {
		out = append(out, p.String())
	}
	return strings.Join(out, ",")
}

func (l *poolList) Set(v string) error {
	var cur *poolSpec
	var items []string
	flush := func() error {
		if cur == nil {
			return nil
		}
		if err := cur.parse(items); err != nil {
			return err
		}
		for _, p := range *l {
			if p.name == cur.name {
				return fmt.Errorf("pool %q is given twice: give each pool one -pool", cur.name)
			}
		}
		*l = append(*l, *cur)
		return nil
	}
	for item := range strings.SplitSeq(v, ",") {
		item = strings.TrimSpace(item)
		key, _, _ := strings.Cut(item, "=")
		if name, first, ok := strings.Cut(key, ":"); ok {
			if err := flush(); err != nil {
				return err
			}
			cur, items = &poolSpec{name: strings.TrimSpace(name)}, nil
			item = first + item[len(key):]
		} else if cur == nil {
			return fmt.Errorf("%q: a pool starts with its name: NAME:path=/prefix/,max=8 (keys: %s)", v, poolKeys)
		}
		if item != "" {
			items = append(items, item)
		}
	}
	return flush()
}

const poolKeys = "path, host, header, min, max, concurrency, idle, queue, queue-timeout, cmd; in proxy mode backend (repeatable) instead of min, max, idle, cmd"

var poolNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)

func (p *poolSpec) parse(items []string) error {
	if !poolNameRE.MatchString(p.name) || p.name == metrics.DefaultPool {
		return fmt.Errorf("pool name %q: use lowercase letters, digits, - and _ (up to 32), and not %q", p.name, metrics.DefaultPool)
	}
	p.max, p.idle, p.queue, p.queueTimeout = runtime.NumCPU(), 30*time.Second, 1000, 30*time.Second
	seen := map[string]bool{}
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || v == "" {
			return fmt.Errorf("pool %s: %q: want key=value (keys: %s)", p.name, it, poolKeys)
		}
		if seen[k] && k != "backend" {
			return fmt.Errorf("pool %s: %s is given twice", p.name, k)
		}
		seen[k] = true
		var err error
		switch k {
		case "path":
			if !strings.HasPrefix(v, "/") {
				return fmt.Errorf("pool %s: path=%s: a path prefix starts with /", p.name, v)
			}
			p.path = v
		case "host":
			p.host = strings.ToLower(v)
		case "header":
			p.header, p.headerVal, _ = strings.Cut(v, ":")
			if p.header == "" {
				return fmt.Errorf("pool %s: header=%s: want header=Name or header=Name:value", p.name, v)
			}
		case "min":
			p.min, err = poolInt(v, 0)
		case "max":
			p.max, err = poolInt(v, 1)
		case "concurrency":
			p.concurrency, err = poolInt(v, 0)
		case "queue":
			p.queue, err = poolInt(v, 1)
		case "idle":
			p.idle, err = poolDuration(v)
		case "queue-timeout":
			p.queueTimeout, err = poolDuration(v)
		case "cmd":
			p.command = strings.Fields(v)
		case "backend":
			err = p.backends.Set(v)
		default:
			return fmt.Errorf("pool %s: unknown key %q (keys: %s)", p.name, k, poolKeys)
		}
		if err != nil {
			return fmt.Errorf("pool %s: %s=%s: %v", p.name, k, v, err)
		}
	}
	if p.path == "" && p.host == "" && p.header == "" {
		return fmt.Errorf("pool %s matches no request: give path=/prefix/, host=NAME or header=Name[:value]", p.name)
	}
	if !seen["max"] && p.min > p.max {
		p.max = p.min
	}
	if p.min > p.max {
		return fmt.Errorf("pool %s: min=%d is over max=%d", p.name, p.min, p.max)
	}
	return nil
}

func poolInt(v string, least int) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil || n < least || n > 10_000 {
		return 0, fmt.Errorf("want a whole number from %d to 10000", least)
	}
	return n, nil
}

func poolDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("want a duration such as 30s or 2m")
	}
	return d, nil
}

func (p poolSpec) String() string {
	s := p.name + ":"
	var kv []string
	add := func(k, v string) {
		if v != "" {
			kv = append(kv, k+"="+v)
		}
	}
	add("path", p.path)
	add("host", p.host)
	if p.header != "" {
		add("header", strings.TrimSuffix(p.header+":"+p.headerVal, ":"))
	}
	kv = append(kv, "min="+strconv.Itoa(p.min), "max="+strconv.Itoa(p.max), "concurrency="+strconv.Itoa(p.concurrency),
		"idle="+p.idle.String(), "queue="+strconv.Itoa(p.queue), "queue-timeout="+p.queueTimeout.String())
	add("cmd", strings.Join(p.command, " "))
	for _, b := range p.backends {
		add("backend", b)
	}
	return s + strings.Join(kv, ",")
}

// checkPools checks what a mode allows: `stickyd proxy` pools name their backends and
// spawn nothing; the others spawn their workers and have no backends.
func checkPools(mode string, specs []poolSpec) error {
	for _, p := range specs {
		if mode == "proxy" {
			if len(p.backends) == 0 {
				return fmt.Errorf("-pool %s: in proxy mode a pool names its backends: backend=HOST:PORT (repeat for each)", p.name)
			}
			if p.command != nil || p.min != 0 {
				return fmt.Errorf("-pool %s: in proxy mode a pool's backends run on their own: no cmd= or min=", p.name)
			}
			continue
		}
		if len(p.backends) > 0 {
			return fmt.Errorf("-pool %s: backend= is for stickyd proxy; here the pool runs the edge's command (or cmd=…)", p.name)
		}
		if p.command != nil {
			if err := workers.CheckWorkerCommand(p.command); err != nil {
				return fmt.Errorf("-pool %s: cmd=: %w", p.name, err)
			}
		}
	}
	return nil
}

// buildPools makes the balancer's pool rules and the supervisors of the named pools. Their
// slots follow the default pool's defaultWorkers.
func buildPools(specs []poolSpec, defaultWorkers int, m *metrics.Metrics) ([]balancer.Pool, []*workers.Supervisor) {
	if defaultWorkers <= 0 {
		defaultWorkers = runtime.NumCPU()
	}
	var rules []balancer.Pool
	var sups []*workers.Supervisor
	next := defaultWorkers
	for _, p := range specs {
		g := &workers.Gate{Name: p.name, Concurrency: p.concurrency, MaxQueue: p.queue, Timeout: p.queueTimeout, Metrics: m}
		rules = append(rules, balancer.Pool{Name: p.name, PathPrefix: p.path, Host: p.host, Header: p.header, HeaderValue: p.headerVal, Gate: g})
		sups = append(sups, &workers.Supervisor{Name: p.name, FirstSlot: next, Min: p.min, Max: p.max, Idle: p.idle, Gate: g, Command: p.command})
		next += p.max
	}
	return rules, sups
}

// adminPool is a pool in GET /admin/workers.
type adminPool struct {
	balancer.PoolStat
	Min int `json:"min"`
	Max int `json:"max"` // 0 for the default pool: a fixed size
}

func poolStats(b *balancer.Balancer, sup *workers.Supervisor) []adminPool {
	var out []adminPool
	for _, st := range b.PoolStats() {
		ap := adminPool{PoolStat: st}
		if sup != nil {
			for _, ps := range sup.Pools {
				if ps.Name == st.Name {
					ap.Min, ap.Max = ps.Min, ps.Max
				}
			}
		}
		out = append(out, ap)
	}
	return out
}

// poolLabel names a worker's pool as the admin views and metrics do.
func poolLabel(name string) string {
	if name == "" {
		return metrics.DefaultPool
	}
	return name
}
