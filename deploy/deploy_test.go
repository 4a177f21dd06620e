package deploy_test

import (
	"bufio"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/stickyd/stickyd/metrics"
)

// Tests run in deploy/; the module root is its parent.
const repoRoot = ".."

func read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// yamlDocs decodes every document of a (possibly multi-document) YAML file.
func yamlDocs(t *testing.T, name string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(read(t, name)))
	var docs []map[string]any
	for {
		var d map[string]any
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", name, len(docs)+1, err)
		}
		if d == nil {
			t.Fatalf("%s: document %d is empty", name, len(docs)+1)
		}
		docs = append(docs, d)
	}
	if len(docs) == 0 {
		t.Fatalf("%s: no YAML document", name)
	}
	return docs
}

func yamlDoc(t *testing.T, name string) map[string]any {
	t.Helper()
	docs := yamlDocs(t, name)
	if len(docs) != 1 {
		t.Fatalf("%s: %d documents, want 1", name, len(docs))
	}
	return docs[0]
}

// Small accessors for decoded YAML/JSON trees; they fail the test on a
// shape mismatch rather than panic.

func m(t *testing.T, v any, what string) map[string]any {
	t.Helper()
	mv, ok := v.(map[string]any)
	if !ok {
		t.Fatalf("%s: %T, want a mapping", what, v)
	}
	return mv
}

func l(t *testing.T, v any, what string) []any {
	t.Helper()
	lv, ok := v.([]any)
	if !ok {
		t.Fatalf("%s: %T, want a list", what, v)
	}
	return lv
}

func s(t *testing.T, v any, what string) string {
	t.Helper()
	sv, ok := v.(string)
	if !ok {
		t.Fatalf("%s: %T (%v), want a string", what, v, v)
	}
	return sv
}

func strs(t *testing.T, v any, what string) []string {
	t.Helper()
	var out []string
	for i, e := range l(t, v, what) {
		out = append(out, s(t, e, fmt.Sprintf("%s[%d]", what, i)))
	}
	return out
}

func TestAllYAMLParses(t *testing.T) {
	var n int
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "node_modules" {
			return filepath.SkipDir
		}
		if ext := filepath.Ext(path); ext == ".yaml" || ext == ".yml" {
			n++
			yamlDocs(t, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// compose, prometheus, alerts, k8s, 2 grafana provisioning files.
	if n < 6 {
		t.Fatalf("found %d YAML files, want at least 6", n)
	}
}

// ---- metric names and PromQL ----

var metricRE = regexp.MustCompile(`stickyd_[a-z_]+`)

func familyOf(name string) string {
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok && slices.Contains(metrics.Names(), base) {
			return base
		}
	}
	return name
}

// TestMetricNamesExist: every stickyd_* name in the deploy files must be a
// family the metrics package exports, so renaming a metric in code breaks
// this test instead of silently breaking an alert or a panel.
func TestMetricNamesExist(t *testing.T) {
	files := []string{"alerts.yml", "grafana/dashboards/stickyd.json", "k8s.yaml", "compose.yaml", "prometheus.yml"}
	used := map[string]bool{}
	for _, f := range files {
		for _, name := range metricRE.FindAllString(string(read(t, f)), -1) {
			fam := familyOf(name)
			if !slices.Contains(metrics.Names(), fam) {
				t.Errorf("%s uses %s (family %s), not in metrics.Names() %v", f, name, fam, metrics.Names())
			}
			used[fam] = true
		}
	}
	for _, want := range []string{
		metrics.NameWorkers, metrics.NameWorkerRestarts, metrics.NameHandoffs,
		metrics.NameUnknownSessions, metrics.NameConnectionsAccepted,
		metrics.NameHandoffDuration, metrics.NameRequestsProxied,
		metrics.NameSessions, metrics.NameWebSockets,
	} {
		if !used[want] {
			t.Errorf("no deploy file uses %s", want)
		}
	}
}

var (
	selectorRE = regexp.MustCompile(`(stickyd_[a-z_]+)\s*\{([^}]*)\}`)
	matcherRE  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)
	groupingRE = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
)

// Labels every series has besides its own: added by Prometheus at scrape
// time (prometheus.yml adds "mode").
var targetLabels = []string{"instance", "job", "mode"}

// checkPromQL checks that the label matchers and groupings of expr use
// labels the referenced families have, and that equality matchers on
// closed label sets use values the code emits (state="Ready" would never
// match and an alert on it would never fire).
func checkPromQL(t *testing.T, where, expr string) {
	t.Helper()
	labels := metrics.Labels()
	allowed := map[string]bool{}
	for _, l := range targetLabels {
		allowed[l] = true
	}
	names := metricRE.FindAllString(expr, -1)
	if len(names) == 0 {
		t.Errorf("%s: expression uses no stickyd metric: %s", where, expr)
	}
	for _, name := range names {
		fam := familyOf(name)
		for l := range labels[fam] {
			allowed[l] = true
		}
		if strings.HasSuffix(name, "_bucket") {
			allowed["le"] = true
		}
	}
	for _, sel := range selectorRE.FindAllStringSubmatch(expr, -1) {
		name, body := sel[1], sel[2]
		fam := familyOf(name)
		famLabels, ok := labels[fam]
		if !ok {
			t.Errorf("%s: %s: unknown family", where, name)
			continue
		}
		for _, mt := range matcherRE.FindAllStringSubmatch(body, -1) {
			label, op, value := mt[1], mt[2], mt[3]
			values, own := famLabels[label]
			if !own && !slices.Contains(targetLabels, label) && !(label == "le" && strings.HasSuffix(name, "_bucket")) {
				t.Errorf("%s: %s has no label %q (has %v)", where, name, label, famLabels)
				continue
			}
			if (op == "=" || op == "!=") && values != nil && !strings.Contains(value, "$") && !slices.Contains(values, value) {
				t.Errorf("%s: %s{%s%s%q}: value not one of %v", where, name, label, op, value, values)
			}
		}
	}
	for _, g := range groupingRE.FindAllStringSubmatch(expr, -1) {
		for _, label := range strings.Split(g[1], ",") {
			label = strings.TrimSpace(label)
			if label != "" && !allowed[label] {
				t.Errorf("%s: grouping by %q, which none of %v has", where, label, names)
			}
		}
	}
	if strings.Count(expr, "(") != strings.Count(expr, ")") || strings.Count(expr, "{") != strings.Count(expr, "}") {
		t.Errorf("%s: unbalanced brackets: %s", where, expr)
	}
}

type rule struct {
	alert, expr, forDur string
	labels, annotations map[string]any
}

func alertRules(t *testing.T) map[string]rule {
	t.Helper()
	doc := yamlDoc(t, "alerts.yml")
	out := map[string]rule{}
	for gi, g := range l(t, doc["groups"], "groups") {
		gm := m(t, g, fmt.Sprintf("groups[%d]", gi))
		for ri, r := range l(t, gm["rules"], "rules") {
			what := fmt.Sprintf("groups[%d].rules[%d]", gi, ri)
			rm := m(t, r, what)
			ru := rule{alert: s(t, rm["alert"], what+".alert"), expr: s(t, rm["expr"], what+".expr")}
			if f, ok := rm["for"]; ok {
				ru.forDur = s(t, f, what+".for")
			}
			if v, ok := rm["labels"]; ok {
				ru.labels = m(t, v, what+".labels")
			}
			if v, ok := rm["annotations"]; ok {
				ru.annotations = m(t, v, what+".annotations")
			}
			if _, dup := out[ru.alert]; dup {
				t.Errorf("alert %s defined twice", ru.alert)
			}
			out[ru.alert] = ru
		}
	}
	return out
}

func compact(expr string) string { return strings.Join(strings.Fields(expr), " ") }

func TestAlerts(t *testing.T) {
	rules := alertRules(t)
	want := map[string]struct{ exprHas []string }{
		"StickydNoReadyWorkers":    {[]string{`stickyd_workers{state="ready"} == 0`}},
		"StickydWorkerRestartLoop": {[]string{`increase(stickyd_worker_restarts_total[5m]) > 3`}},
		"StickydHandoffFailures":   {[]string{`rate(stickyd_handoffs_total{result!="ok"}[5m])`, `rate(stickyd_handoffs_total[5m])`, `> 0.01`}},
		"StickydUnknownSessions":   {[]string{`stickyd_unknown_sessions_total`}},
	}
	for name, w := range want {
		r, ok := rules[name]
		if !ok {
			t.Errorf("alert %s missing", name)
			continue
		}
		for _, sub := range w.exprHas {
			if !strings.Contains(compact(r.expr), sub) {
				t.Errorf("%s: expr %q lacks %q", name, compact(r.expr), sub)
			}
		}
	}
	if d := rules["StickydNoReadyWorkers"].forDur; d != "1m" {
		t.Errorf("StickydNoReadyWorkers for %q, want 1m", d)
	}
	if d := rules["StickydHandoffFailures"].forDur; d != "5m" {
		t.Errorf("StickydHandoffFailures for %q, want 5m", d)
	}
	for name, r := range rules {
		checkPromQL(t, "alerts.yml "+name, r.expr)
		if r.forDur != "" {
			if _, err := time.ParseDuration(r.forDur); err != nil {
				t.Errorf("%s: for %q: %v", name, r.forDur, err)
			}
		}
		if sev, _ := r.labels["severity"].(string); sev != "critical" && sev != "warning" {
			t.Errorf("%s: severity %q", name, sev)
		}
		if sum, _ := r.annotations["summary"].(string); sum == "" {
			t.Errorf("%s: no summary annotation", name)
		}
	}
}

// ---- Grafana ----

type dashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		ID         int    `json:"id"`
		Type       string `json:"type"`
		Title      string `json:"title"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
		GridPos struct{ X, Y, W, H int } `json:"gridPos"`
		Targets []struct {
			Expr       string `json:"expr"`
			RefID      string `json:"refId"`
			Datasource struct {
				UID string `json:"uid"`
			} `json:"datasource"`
		} `json:"targets"`
	} `json:"panels"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(read(t, "grafana/dashboards/stickyd.json")))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	return d
}

func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard uid %q title %q", d.UID, d.Title)
	}
	ds := m(t, l(t, yamlDoc(t, "grafana/provisioning/datasources/prometheus.yaml")["datasources"], "datasources")[0], "datasources[0]")
	dsUID := s(t, ds["uid"], "datasource uid")

	ids := map[int]bool{}
	type rect struct{ x, y, w, h int }
	var rects []rect
	var exprs []string
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.Datasource.UID != dsUID {
			t.Errorf("panel %q: datasource uid %q, want provisioned %q", p.Title, p.Datasource.UID, dsUID)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, g)
		}
		for _, r := range rects {
			if g.X < r.x+r.w && r.x < g.X+g.W && g.Y < r.y+r.h && r.y < g.Y+g.H {
				t.Errorf("panel %q overlaps another panel", p.Title)
			}
		}
		rects = append(rects, rect{g.X, g.Y, g.W, g.H})
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if tg.Expr == "" || tg.RefID == "" || refs[tg.RefID] {
				t.Errorf("panel %q: target %+v: empty expr or missing/duplicate refId", p.Title, tg)
			}
			refs[tg.RefID] = true
			if tg.Datasource.UID != dsUID {
				t.Errorf("panel %q: target datasource %q, want %q", p.Title, tg.Datasource.UID, dsUID)
			}
			checkPromQL(t, "dashboard panel "+strconv.Quote(p.Title), tg.Expr)
			exprs = append(exprs, compact(tg.Expr))
		}
	}
	all := strings.Join(exprs, "\n")
	for _, want := range []string{
		"sum by (result) (rate(stickyd_connections_accepted_total",
		"sum by (result) (rate(stickyd_handoffs_total",
		"histogram_quantile(0.5, sum by (le) (rate(stickyd_handoff_duration_seconds_bucket",
		"histogram_quantile(0.99, sum by (le) (rate(stickyd_handoff_duration_seconds_bucket",
		"sum by (code) (rate(stickyd_requests_proxied_total",
		"sum by (worker) (stickyd_sessions",
		"sum by (worker) (stickyd_websockets",
		"sum by (state) (stickyd_workers",
		"stickyd_worker_restarts_total",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no dashboard query contains %q", want)
		}
	}
	for _, v := range d.Templating.List {
		if v.Name == "instance" {
			return
		}
	}
	t.Error("dashboard has no $instance variable, but its queries use it")
}

func TestGrafanaProvisioning(t *testing.T) {
	compose := yamlDoc(t, "compose.yaml")
	services := m(t, compose["services"], "services")
	grafana := m(t, services["grafana"], "services.grafana")
	mounts := map[string]string{} // source -> target
	for _, v := range composeVolumes(t, "grafana", grafana) {
		mounts[v.source] = v.target
	}
	if mounts["./grafana/provisioning"] != "/etc/grafana/provisioning" {
		t.Errorf("grafana: ./grafana/provisioning mounted at %q, want /etc/grafana/provisioning", mounts["./grafana/provisioning"])
	}
	dashTarget, ok := mounts["./grafana/dashboards"]
	if !ok {
		t.Fatal("grafana: ./grafana/dashboards not mounted")
	}
	prov := yamlDoc(t, "grafana/provisioning/dashboards/stickyd.yaml")
	p := m(t, l(t, prov["providers"], "providers")[0], "providers[0]")
	if typ := s(t, p["type"], "provider type"); typ != "file" {
		t.Errorf("provider type %q", typ)
	}
	if path := s(t, m(t, p["options"], "provider options")["path"], "provider path"); path != dashTarget {
		t.Errorf("dashboard provider reads %q, compose mounts the dashboards at %q", path, dashTarget)
	}

	ds := m(t, l(t, yamlDoc(t, "grafana/provisioning/datasources/prometheus.yaml")["datasources"], "datasources")[0], "datasources[0]")
	if typ := s(t, ds["type"], "datasource type"); typ != "prometheus" {
		t.Errorf("datasource type %q", typ)
	}
	url := s(t, ds["url"], "datasource url")
	host := strings.TrimPrefix(url, "http://")
	host, port, _ := strings.Cut(strings.TrimSuffix(host, "/"), ":")
	if _, ok := services[host]; !ok || port != "9090" {
		t.Errorf("datasource url %q: want a compose service on port 9090", url)
	}
}

// ---- compose ----

type volumeRef struct{ kind, source, target string }

// composeVolumes reads a service's volumes in short ("src:dst[:mode]") or
// long syntax.
func composeVolumes(t *testing.T, svc string, service map[string]any) []volumeRef {
	t.Helper()
	raw, ok := service["volumes"]
	if !ok {
		return nil
	}
	var out []volumeRef
	for i, v := range l(t, raw, svc+".volumes") {
		what := fmt.Sprintf("%s.volumes[%d]", svc, i)
		var ref volumeRef
		switch v := v.(type) {
		case string:
			parts := strings.Split(v, ":")
			if len(parts) < 2 || len(parts) > 3 {
				t.Errorf("%s: %q: want SOURCE:TARGET[:MODE]", what, v)
				continue
			}
			ref.source, ref.target = parts[0], parts[1]
			ref.kind = "volume"
			if strings.HasPrefix(ref.source, ".") || strings.HasPrefix(ref.source, "/") || strings.HasPrefix(ref.source, "~") {
				ref.kind = "bind"
			}
		case map[string]any:
			ref.kind = s(t, v["type"], what+".type")
			ref.source, _ = v["source"].(string)
			ref.target = s(t, v["target"], what+".target")
		default:
			t.Errorf("%s: %T", what, v)
			continue
		}
		out = append(out, ref)
	}
	return out
}

func TestCompose(t *testing.T) {
	doc := yamlDoc(t, "compose.yaml")
	services := m(t, doc["services"], "services")
	for _, want := range []string{"stickyd", "worker", "socketio", "prometheus", "grafana"} {
		if _, ok := services[want]; !ok {
			t.Errorf("service %s missing", want)
		}
	}
	declared := map[string]bool{}
	if v, ok := doc["volumes"]; ok {
		for name := range m(t, v, "volumes") {
			declared[name] = true
		}
	}
	usedVolumes := map[string]bool{}
	for name, raw := range services {
		svc := m(t, raw, "services."+name)
		for _, v := range composeVolumes(t, name, svc) {
			switch v.kind {
			case "volume":
				usedVolumes[v.source] = true
				if !declared[v.source] {
					t.Errorf("service %s uses volume %q, not declared under volumes:", name, v.source)
				}
			case "bind":
				if _, err := os.Stat(v.source); err != nil {
					t.Errorf("service %s bind-mounts %s: %v", name, v.source, err)
				}
			}
		}
		if deps, ok := svc["depends_on"]; ok {
			var names []string
			switch deps := deps.(type) {
			case []any:
				names = strs(t, deps, name+".depends_on")
			case map[string]any:
				for d := range deps {
					names = append(names, d)
				}
			}
			for _, d := range names {
				if _, ok := services[d]; !ok {
					t.Errorf("service %s depends on unknown service %s", name, d)
				}
			}
		}
		if b, ok := svc["build"]; ok {
			bm := m(t, b, name+".build")
			ctx := s(t, bm["context"], name+".build.context")
			df := s(t, bm["dockerfile"], name+".build.dockerfile")
			if _, err := os.Stat(filepath.Join(ctx, df)); err != nil {
				t.Errorf("service %s builds %s in %s: %v", name, df, ctx, err)
			}
		}
		if name != "worker" {
			hc, ok := svc["healthcheck"].(map[string]any)
			if !ok || len(strs(t, hc["test"], name+".healthcheck.test")) < 2 {
				t.Errorf("service %s has no healthcheck test", name)
			}
		}
	}
	for name := range declared {
		if !usedVolumes[name] {
			t.Errorf("volume %s declared but unused", name)
		}
	}

	// The edge and the workers share the control socket's volume.
	const sock = "/run/stickyd/ctl.sock"
	ctlVolume := func(svc string) string {
		for _, v := range composeVolumes(t, svc, m(t, services[svc], svc)) {
			if v.target == "/run/stickyd" {
				return v.source
			}
		}
		t.Errorf("service %s does not mount /run/stickyd", svc)
		return ""
	}
	if a, b := ctlVolume("stickyd"), ctlVolume("worker"); a != b || a != "ctl" {
		t.Errorf("control volume: stickyd %q, worker %q, want both ctl", a, b)
	}
	edgeCmd := strs(t, m(t, services["stickyd"], "stickyd")["command"], "stickyd.command")
	if edgeCmd[0] != "serve" || !hasFlag(edgeCmd, "-control", sock) {
		t.Errorf("stickyd command %v: want serve -control %s", edgeCmd, sock)
	}
	worker := m(t, services["worker"], "worker")
	if cmd := strs(t, worker["command"], "worker.command"); !slices.Equal(cmd, []string{"/stickyd", "demo-worker", "-control", sock}) {
		t.Errorf("worker command %v", cmd)
	}
	if ep, ok := worker["entrypoint"]; !ok || len(l(t, ep, "worker.entrypoint")) != 0 {
		t.Error("worker: command starts with /stickyd, so the image ENTRYPOINT must be cleared (entrypoint: [])")
	}
	if r := m(t, worker["deploy"], "worker.deploy")["replicas"]; r != 4 {
		t.Errorf("worker replicas %v, want 4", r)
	}
	sio := m(t, services["socketio"], "socketio")
	if ports := strs(t, sio["ports"], "socketio.ports"); !slices.ContainsFunc(ports, func(p string) bool { return strings.HasPrefix(p, "8081:") }) {
		t.Errorf("socketio ports %v: want 8081 published", ports)
	}
	if cmd := strings.Join(strs(t, sio["command"], "socketio.command"), " "); !strings.HasPrefix(cmd, "run ") || !strings.Contains(cmd, " -- node app.js") {
		t.Errorf("socketio command %q: want run ... -- node app.js", cmd)
	}

	// Prometheus: the mounted config is the one in deploy/, its rule files
	// are mounted too, and its targets are compose services.
	prom := m(t, services["prometheus"], "prometheus")
	mounts := map[string]string{} // target -> source
	for _, v := range composeVolumes(t, "prometheus", prom) {
		mounts[v.target] = v.source
	}
	configPath := "/etc/prometheus/prometheus.yml"
	for _, a := range strs(t, prom["command"], "prometheus.command") {
		if p, ok := strings.CutPrefix(a, "--config.file="); ok {
			configPath = p
		}
	}
	src, ok := mounts[configPath]
	if !ok {
		t.Fatalf("prometheus config %s is not mounted", configPath)
	}
	if filepath.Clean(src) != "prometheus.yml" {
		t.Errorf("prometheus config mounted from %s, want ./prometheus.yml", src)
	}
	pcfg := yamlDoc(t, src)
	for _, rf := range strs(t, pcfg["rule_files"], "rule_files") {
		rsrc, ok := mounts[rf]
		if !ok {
			t.Errorf("rule file %s is not mounted into prometheus", rf)
			continue
		}
		if filepath.Clean(rsrc) != "alerts.yml" {
			t.Errorf("rule file %s mounted from %s, want ./alerts.yml", rf, rsrc)
		}
	}
	var targets []string
	for i, sc := range l(t, pcfg["scrape_configs"], "scrape_configs") {
		scm := m(t, sc, fmt.Sprintf("scrape_configs[%d]", i))
		for j, st := range l(t, scm["static_configs"], "static_configs") {
			targets = append(targets, strs(t, m(t, st, fmt.Sprintf("static_configs[%d]", j))["targets"], "targets")...)
		}
	}
	for _, want := range []string{"stickyd:8071", "socketio:8071"} {
		if !slices.Contains(targets, want) {
			t.Errorf("prometheus.yml does not scrape %s (targets %v)", want, targets)
		}
	}
	for _, tg := range targets {
		host, _, _ := strings.Cut(tg, ":")
		if _, ok := services[host]; !ok && host != "127.0.0.1" && host != "localhost" {
			t.Errorf("scrape target %s is not a compose service", tg)
		}
	}
}

func hasFlag(args []string, flag, value string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag && args[i+1] == value {
			return true
		}
	}
	return false
}

// ---- Kubernetes ----

func TestK8s(t *testing.T) {
	docs := yamlDocs(t, "k8s.yaml")
	byKind := map[string]map[string]any{}
	for i, d := range docs {
		kind := s(t, d["kind"], fmt.Sprintf("doc %d kind", i))
		s(t, d["apiVersion"], kind+".apiVersion")
		byKind[kind] = d
	}
	dep, ok := byKind["Deployment"]
	if !ok {
		t.Fatal("no Deployment")
	}
	svc, ok := byKind["Service"]
	if !ok {
		t.Fatal("no Service")
	}
	spec := m(t, dep["spec"], "spec")
	tmpl := m(t, spec["template"], "template")
	meta := m(t, tmpl["metadata"], "template.metadata")
	podLabels := m(t, meta["labels"], "template labels")
	if sel := m(t, m(t, spec["selector"], "selector")["matchLabels"], "matchLabels"); !subset(sel, podLabels) {
		t.Errorf("Deployment selector %v does not match pod labels %v", sel, podLabels)
	}
	ann := m(t, meta["annotations"], "template annotations")
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != "8071" {
		t.Errorf("scrape annotations %v", ann)
	}
	pod := m(t, tmpl["spec"], "pod spec")
	if g := pod["terminationGracePeriodSeconds"]; g != 45 {
		t.Errorf("terminationGracePeriodSeconds %v, want 45", g)
	}
	if psc := m(t, pod["securityContext"], "pod securityContext"); psc["runAsNonRoot"] != true {
		t.Errorf("pod runAsNonRoot %v", psc["runAsNonRoot"])
	}
	emptyDirs := map[string]bool{}
	for i, v := range l(t, pod["volumes"], "volumes") {
		vm := m(t, v, fmt.Sprintf("volumes[%d]", i))
		if _, ok := vm["emptyDir"]; ok {
			emptyDirs[s(t, vm["name"], "volume name")] = true
		}
	}
	containers := map[string]map[string]any{}
	var portNames []string
	for i, c := range l(t, pod["containers"], "containers") {
		cm := m(t, c, fmt.Sprintf("containers[%d]", i))
		name := s(t, cm["name"], "container name")
		containers[name] = cm
		if sc := m(t, cm["securityContext"], name+".securityContext"); sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false {
			t.Errorf("container %s securityContext %v: want readOnlyRootFilesystem, no privilege escalation", name, sc)
		}
		shared := false
		for j, vm := range l(t, cm["volumeMounts"], name+".volumeMounts") {
			vmm := m(t, vm, fmt.Sprintf("%s.volumeMounts[%d]", name, j))
			if vmm["mountPath"] == "/run/stickyd" && emptyDirs[s(t, vmm["name"], "mount name")] {
				shared = true
			}
		}
		if !shared {
			t.Errorf("container %s does not mount an emptyDir at /run/stickyd", name)
		}
		if ports, ok := cm["ports"]; ok {
			for j, p := range l(t, ports, name+".ports") {
				if n, ok := m(t, p, fmt.Sprintf("%s.ports[%d]", name, j))["name"].(string); ok {
					portNames = append(portNames, n)
				}
			}
		}
	}
	edge, ok := containers["stickyd"]
	if !ok {
		t.Fatal("no stickyd container")
	}
	if _, ok := containers["worker"]; !ok || len(containers) != 2 {
		t.Fatalf("containers %v: want stickyd and worker", slices.Collect(mapsKeys(containers)))
	}
	args := strs(t, edge["args"], "stickyd.args")
	if args[0] != "serve" || !hasFlag(args, "-control", "/run/stickyd/ctl.sock") {
		t.Errorf("stickyd args %v", args)
	}
	if cmd := strs(t, containers["worker"]["command"], "worker.command"); !hasFlag(cmd, "-control", "/run/stickyd/ctl.sock") {
		t.Errorf("worker command %v: want -control /run/stickyd/ctl.sock", cmd)
	}
	probe := func(kind, path string) {
		get := m(t, m(t, edge[kind], kind)["httpGet"], kind+".httpGet")
		if get["path"] != path || get["port"] != 8071 {
			t.Errorf("%s: GET %v on port %v, want %s on 8071", kind, get["path"], get["port"], path)
		}
	}
	probe("readinessProbe", "/readyz")
	probe("livenessProbe", "/healthz")
	pre := m(t, m(t, m(t, edge["lifecycle"], "lifecycle")["preStop"], "preStop")["exec"], "preStop.exec")
	if cmd := strs(t, pre["command"], "preStop command"); !slices.Equal(cmd, []string{"/stickyd", "drain", "127.0.0.1:8071"}) {
		t.Errorf("preStop %v", cmd)
	}

	sspec := m(t, svc["spec"], "Service spec")
	if sel := m(t, sspec["selector"], "Service selector"); !subset(sel, podLabels) {
		t.Errorf("Service selector %v does not match pod labels %v", sel, podLabels)
	}
	found := false
	for i, p := range l(t, sspec["ports"], "Service ports") {
		pm := m(t, p, fmt.Sprintf("Service ports[%d]", i))
		if pm["port"] == 8080 {
			found = true
			if tp, ok := pm["targetPort"].(string); ok && !slices.Contains(portNames, tp) {
				t.Errorf("Service targetPort %q is no container port name (%v)", tp, portNames)
			}
		}
	}
	if !found {
		t.Error("Service does not expose 8080")
	}
}

func mapsKeys[V any](mp map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range mp {
			if !yield(k) {
				return
			}
		}
	}
}

func subset(sub, super map[string]any) bool {
	if len(sub) == 0 {
		return false
	}
	for k, v := range sub {
		if super[k] != v {
			return false
		}
	}
	return true
}

// ---- Dockerfiles ----

type instruction struct {
	cmd  string // upper case
	args string
}

// parseDockerfile joins continuation lines and drops comments and the
// parser directives.
func parseDockerfile(t *testing.T, name string) []instruction {
	t.Helper()
	var out []instruction
	var cur strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(read(t, name)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || (line == "" && cur.Len() == 0) {
			continue
		}
		if body, ok := strings.CutSuffix(line, `\`); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(line)
		full := strings.TrimSpace(cur.String())
		cur.Reset()
		if full == "" {
			continue
		}
		cmd, args, _ := strings.Cut(full, " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func execForm(t *testing.T, what, args string) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(args), &v); err != nil {
		t.Errorf("%s %s: not exec (JSON) form: %v", what, args, err)
	}
	return v
}

// shellWords splits a POSIX shell word list with single and double quotes
// (enough for a RUN line; no expansions).
func shellWords(t *testing.T, line string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	inWord := false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\'':
			j := strings.IndexByte(line[i+1:], '\'')
			if j < 0 {
				t.Fatalf("unterminated ' in %q", line)
			}
			w.WriteString(line[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(line) && line[i] != '"'; i++ {
				if line[i] == '\\' && i+1 < len(line) {
					i++
				}
				w.WriteByte(line[i])
			}
			if i >= len(line) {
				t.Fatalf("unterminated \" in %q", line)
			}
			inWord = true
		case c == ' ' || c == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

var envAssignRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// goBuild is the `go build` command of a Dockerfile's RUN line.
type goBuild struct {
	raw  string   // the shell command as written
	env  []string // NAME=VALUE prefixes
	args []string // after "go"
}

func dockerfileGoBuild(t *testing.T, name string) goBuild {
	t.Helper()
	var found []goBuild
	for _, in := range parseDockerfile(t, name) {
		if in.cmd != "RUN" || !strings.Contains(in.args, "go build") {
			continue
		}
		for _, seg := range strings.Split(in.args, "&&") {
			if !strings.Contains(seg, "go build") {
				continue
			}
			words := shellWords(t, seg)
			for len(words) > 0 && strings.HasPrefix(words[0], "--") { // RUN --mount=...
				words = words[1:]
			}
			var gb goBuild
			for len(words) > 0 && envAssignRE.MatchString(words[0]) {
				gb.env = append(gb.env, words[0])
				words = words[1:]
			}
			if len(words) < 2 || words[0] != "go" || words[1] != "build" {
				t.Fatalf("%s: cannot read the go build command from %q", name, seg)
			}
			gb.args = words[1:]
			i := strings.Index(seg, "go build")
			j := strings.LastIndex(seg[:i], "--mount")
			if j >= 0 {
				j += strings.IndexByte(seg[j:], ' ')
			} else {
				j = 0
			}
			gb.raw = strings.Join(strings.Fields(seg[j:]), " ")
			found = append(found, gb)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s: %d go build commands, want 1", name, len(found))
	}
	return found[0]
}

func TestDockerfile(t *testing.T) {
	ins := parseDockerfile(t, "Dockerfile")
	var froms []string
	byCmd := map[string][]string{}
	for _, in := range ins {
		byCmd[in.cmd] = append(byCmd[in.cmd], in.args)
		if in.cmd == "FROM" {
			froms = append(froms, in.args)
		}
	}
	if len(froms) < 2 || !strings.HasPrefix(froms[0], "golang:1.26-bookworm ") {
		t.Errorf("stages %v: want a golang:1.26-bookworm builder first", froms)
	}
	if last := froms[len(froms)-1]; last != "gcr.io/distroless/static-debian12:nonroot" {
		t.Errorf("final stage %q", last)
	}
	gb := dockerfileGoBuild(t, "Dockerfile")
	if want := `CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/stickyd ./cmd/stickyd`; gb.raw != want {
		t.Errorf("build line\n  %s\nwant\n  %s", gb.raw, want)
	}
	if !slices.Contains(gb.env, "CGO_ENABLED=0") || gb.args[len(gb.args)-1] != "./cmd/stickyd" {
		t.Errorf("go build env %v args %v", gb.env, gb.args)
	}
	if got := byCmd["EXPOSE"]; !slices.Equal(got, []string{"8080 8071"}) {
		t.Errorf("EXPOSE %v", got)
	}
	if users := byCmd["USER"]; len(users) == 0 || strings.HasPrefix(users[len(users)-1], "0") || strings.HasPrefix(users[len(users)-1], "root") {
		t.Errorf("USER %v: want a non-root user", users)
	}
	hc := byCmd["HEALTHCHECK"]
	if len(hc) != 1 {
		t.Fatalf("HEALTHCHECK %v", hc)
	}
	_, hcCmd, ok := strings.Cut(hc[0], "CMD ")
	if !ok || !slices.Equal(execForm(t, "HEALTHCHECK", hcCmd), []string{"/stickyd", "health", "127.0.0.1:8071"}) {
		t.Errorf("HEALTHCHECK %q", hc[0])
	}
	if ep := byCmd["ENTRYPOINT"]; len(ep) != 1 || !slices.Equal(execForm(t, "ENTRYPOINT", ep[0]), []string{"/stickyd"}) {
		t.Errorf("ENTRYPOINT %v", ep)
	}
	if cmd := byCmd["CMD"]; len(cmd) != 1 || !slices.Equal(execForm(t, "CMD", cmd[0]),
		[]string{"serve", "-listen", ":8080", "-metrics", ":8071", "-control", "/run/stickyd/ctl.sock"}) {
		t.Errorf("CMD %v", cmd)
	}
}

func TestDockerfileNodeWorker(t *testing.T) {
	ins := parseDockerfile(t, "Dockerfile.node-worker")
	// Same binary as the edge image: identical build command.
	if a, b := dockerfileGoBuild(t, "Dockerfile").raw, dockerfileGoBuild(t, "Dockerfile.node-worker").raw; a != b {
		t.Errorf("build lines differ:\n  Dockerfile:             %s\n  Dockerfile.node-worker: %s", a, b)
	}
	var froms, cmds, copies []string
	for _, in := range ins {
		switch in.cmd {
		case "FROM":
			froms = append(froms, in.args)
		case "CMD":
			cmds = append(cmds, in.args)
		case "COPY":
			copies = append(copies, in.args)
		}
	}
	if last := froms[len(froms)-1]; last != "node:20-bookworm-slim" {
		t.Errorf("final stage %q, want node:20-bookworm-slim", last)
	}
	if !slices.ContainsFunc(copies, func(c string) bool { return strings.HasPrefix(c, "--from=build /out/stickyd ") }) {
		t.Errorf("no COPY of the stickyd binary from the build stage: %v", copies)
	}
	if len(cmds) != 1 || !strings.HasSuffix(strings.Join(execForm(t, "CMD", cmds[0]), " "), "-workers 4 -- node app.js") ||
		execForm(t, "CMD", cmds[0])[0] != "run" {
		t.Errorf("CMD %v: want run ... -workers 4 -- node app.js", cmds)
	}
	// Every local source of a COPY exists (context = repository root).
	for _, c := range copies {
		words := strings.Fields(c)
		if strings.HasPrefix(words[0], "--from=") {
			continue
		}
		for _, w := range words[:len(words)-1] {
			if strings.HasPrefix(w, "--") {
				continue
			}
			if _, err := os.Stat(filepath.Join(repoRoot, w)); err != nil {
				t.Errorf("COPY %s: %v", w, err)
			}
		}
	}
	if !strings.Contains(string(read(t, "Dockerfile.node-worker")), "IPC") {
		t.Error("Dockerfile.node-worker must say why the workers share the edge's container (IPC parent)")
	}
	lock := map[string]any{}
	if err := json.Unmarshal(read(t, "socketio-app/package-lock.json"), &lock); err != nil {
		t.Errorf("socketio-app/package-lock.json: %v", err)
	}
}

// ---- systemd ----

// unitKeys reads a systemd unit file into "Section.Key" -> values.
func unitKeys(t *testing.T, name string) (keys map[string][]string, one func(k string) string) {
	t.Helper()
	keys = map[string][]string{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(read(t, name)))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: %q", name, n, line)
			}
			keys[section+"."+strings.TrimSpace(k)] = append(keys[section+"."+strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	one = func(k string) string {
		v := keys[k]
		if len(v) != 1 {
			t.Errorf("%s: %s: %v, want exactly one", name, k, v)
			return ""
		}
		return v[0]
	}
	return keys, one
}

// execStartFlag is the value of -flag in the unit's ExecStart.
func execStartFlag(t *testing.T, execStart, flag string) string {
	t.Helper()
	words := strings.Fields(execStart)
	for i, w := range words {
		if w == flag && i+1 < len(words) {
			return words[i+1]
		}
	}
	t.Fatalf("ExecStart %q has no %s", execStart, flag)
	return ""
}

// TestSystemdSockets: the socket units match the service: the one named "admin" listens
// on the service's -metrics address (loopback), the client one on its -listen port, and
// both belong to stickyd.service.
func TestSystemdSockets(t *testing.T) {
	_, svc := unitKeys(t, "stickyd.service")
	execStart := svc("Service.ExecStart")
	_, web := unitKeys(t, "stickyd.socket")
	_, admin := unitKeys(t, "stickyd-admin.socket")
	if web("Socket.FileDescriptorName") == "admin" || admin("Socket.FileDescriptorName") != "admin" {
		t.Errorf("FileDescriptorName: client %q, admin %q: stickyd serves -metrics on the socket named admin", web("Socket.FileDescriptorName"), admin("Socket.FileDescriptorName"))
	}
	for _, one := range []func(string) string{web, admin} {
		if one("Socket.Service") != "stickyd.service" || one("Install.WantedBy") != "sockets.target" {
			t.Errorf("socket unit: Service=%q WantedBy=%q", one("Socket.Service"), one("Install.WantedBy"))
		}
	}
	if got, want := admin("Socket.ListenStream"), execStartFlag(t, execStart, "-metrics"); got != want || !strings.HasPrefix(got, "127.0.0.1:") {
		t.Errorf("admin socket ListenStream=%q, want the service's -metrics %q on loopback", got, want)
	}
	_, port, _ := strings.Cut(execStartFlag(t, execStart, "-listen"), ":")
	if got := web("Socket.ListenStream"); got != port {
		t.Errorf("client socket ListenStream=%q, want the service's -listen port %q", got, port)
	}
	if !strings.Contains(string(read(t, "stickyd.socket")), "Sockets=stickyd.socket stickyd-admin.socket") {
		t.Error("stickyd.socket must say how the service gets both sockets (Sockets=)")
	}
}

func TestSystemdUnit(t *testing.T) {
	keys, one := unitKeys(t, "stickyd.service")
	if w := one("Service.WatchdogSec"); w == "" || w == "0" {
		t.Errorf("WatchdogSec=%q: stickyd pings the watchdog, set it", w)
	}
	if m := execStartFlag(t, one("Service.ExecStart"), "-metrics"); !strings.HasPrefix(m, "127.0.0.1:") {
		t.Errorf("-metrics %s: keep the admin port on loopback", m)
	}
	for k, want := range map[string]string{
		"Service.ExecStart":               "/usr/local/bin/stickyd run -listen :8080 -metrics 127.0.0.1:8071 -workers 4 -- /usr/bin/node /srv/app/server.js",
		"Service.Type":                    "notify",
		"Service.NotifyAccess":            "main",
		"Service.ExecReload":              "/bin/kill -HUP $MAINPID",
		"Service.KillSignal":              "SIGTERM",
		"Service.TimeoutStopSec":          "45",
		"Service.LimitNOFILE":             "1048576",
		"Service.RuntimeDirectory":        "stickyd",
		"Service.NoNewPrivileges":         "yes",
		"Service.ProtectSystem":           "strict",
		"Service.ProtectHome":             "yes",
		"Service.PrivateTmp":              "yes",
		"Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
		"Service.SystemCallArchitectures": "native",
		"Install.WantedBy":                "multi-user.target",
	} {
		if got := one(k); got != want {
			t.Errorf("%s=%q, want %q", k, got, want)
		}
	}
	if keys["Service.DynamicUser"] == nil && keys["Service.User"] == nil {
		t.Error("neither DynamicUser nor User: the service would run as root")
	}
	// Capabilities: none unless the edge binds a port below 1024.
	listen := strings.Fields(one("Service.ExecStart"))
	port := 0
	for i, a := range listen {
		if a == "-listen" && i+1 < len(listen) {
			_, p, _ := strings.Cut(listen[i+1], ":")
			port, _ = strconv.Atoi(p)
		}
	}
	caps := one("Service.CapabilityBoundingSet")
	if port >= 1024 && caps != "" {
		t.Errorf("listen port %d needs no capability, CapabilityBoundingSet=%q", port, caps)
	}
	if port < 1024 && caps != "CAP_NET_BIND_SERVICE" {
		t.Errorf("listen port %d needs CAP_NET_BIND_SERVICE, CapabilityBoundingSet=%q", port, caps)
	}
	// V8's JIT needs W+X pages.
	if v := keys["Service.MemoryDenyWriteExecute"]; slices.Contains(v, "yes") || slices.Contains(v, "true") {
		t.Error("MemoryDenyWriteExecute breaks Node workers")
	}
}

// ---- the Dockerfile's go build, for real ----

// runDockerfileBuild runs the Dockerfile's go build command in module
// root modRoot with the Dockerfile's environment, writing the binary into a
// temporary directory, and checks that it is static, stripped and trimmed.
func runDockerfileBuild(t *testing.T, modRoot, wantPath string) {
	t.Helper()
	gb := dockerfileGoBuild(t, "Dockerfile")
	args := slices.Clone(gb.args)
	// What docker build --build-arg VERSION=... --build-arg COMMIT=... substitutes.
	const testVersion, testCommit = "v9.8.7-test", "0123456789abcdef"
	for i, a := range args {
		args[i] = strings.NewReplacer("${VERSION}", testVersion, "${COMMIT}", testCommit).Replace(a)
	}
	out := filepath.Join(t.TempDir(), "stickyd")
	i := slices.Index(args, "-o")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("go build %v has no -o", args)
	}
	args[i+1] = out

	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), goBin, args...)
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), gb.env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v in %s: %v\n%s", strings.Join(gb.env, " "), strings.Join(args, " "), modRoot, err, b)
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("binary has a PT_INTERP program header: dynamically linked, will not run on distroless/static")
		}
	}
	needed, err := f.DynValue(elf.DT_NEEDED)
	if err != nil {
		t.Fatal(err)
	}
	if libs, _ := f.ImportedLibraries(); len(needed) > 0 || len(libs) > 0 {
		t.Errorf("binary needs shared libraries: DT_NEEDED %v, imported %v", needed, libs)
	}
	if f.Section(".symtab") != nil {
		t.Error("binary has a symbol table: -ldflags -s not applied")
	}
	for _, sec := range f.Sections {
		if strings.HasPrefix(sec.Name, ".debug_") || strings.HasPrefix(sec.Name, ".zdebug_") {
			t.Errorf("binary has DWARF section %s: -ldflags -w not applied", sec.Name)
		}
	}
	bi, err := buildinfo.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if wantPath == "github.com/stickyd/stickyd/cmd/stickyd" {
		// The stamped version and commit are what the binary reports.
		v, err := exec.CommandContext(t.Context(), out, "version").Output()
		if err != nil || !strings.HasPrefix(string(v), "stickyd "+testVersion+" commit="+testCommit+" ") {
			t.Errorf("%s version: %q %v, want stickyd %s commit=%s", out, v, err, testVersion, testCommit)
		}
	}
	if bi.Path != wantPath {
		t.Errorf("built %s, want %s", bi.Path, wantPath)
	}
	settings := map[string]string{}
	for _, st := range bi.Settings {
		settings[st.Key] = st.Value
	}
	// (-ldflags is not recorded when -trimpath is set; the section checks above cover -s -w.)
	for k, want := range map[string]string{"CGO_ENABLED": "0", "-trimpath": "true"} {
		if settings[k] != want {
			t.Errorf("build setting %s=%q, want %q (all: %v)", k, settings[k], want, settings)
		}
	}
	abs, err := filepath.Abs(modRoot)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(bin, []byte(abs+string(filepath.Separator))) {
		t.Errorf("binary contains the build directory %s: -trimpath not applied", abs)
	}
}

func hasMainPackage(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err == nil && regexp.MustCompile(`(?m)^package main\b`).Match(b) {
			return true
		}
	}
	return false
}

// TestDockerfileBuildFlags runs exactly the Dockerfile's go build on the
// real ./cmd/stickyd and checks the binary is what the distroless static
// image needs.
func TestDockerfileBuildFlags(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the daemon; skipped with -short")
	}
	if !hasMainPackage(filepath.Join(repoRoot, "cmd", "stickyd")) {
		t.Skip("./cmd/stickyd has no main package yet (TestDockerfileBuildFlagsThrowaway covers the build line meanwhile)")
	}
	runDockerfileBuild(t, repoRoot, "github.com/stickyd/stickyd/cmd/stickyd")
}

// TestDockerfileBuildFlagsThrowaway runs the same command on a throwaway
// module with the same layout, so the build line and the static-binary
// checks are verified even while ./cmd/stickyd is absent or broken.
func TestDockerfileBuildFlagsThrowaway(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go build; skipped with -short")
	}
	mod := t.TempDir()
	write := func(name, body string) {
		p := filepath.Join(mod, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("go.mod", "module example.com/throwaway\n\ngo 1.26\n")
	// net and os/user are the packages that pull in cgo when CGO_ENABLED=1.
	write("cmd/stickyd/main.go", `package main

import (
	"fmt"
	"net"
	"os/user"
)

func main() {
	_, err := net.LookupHost("localhost")
	u, _ := user.Current()
	fmt.Println(err, u)
}
`)
	runDockerfileBuild(t, mod, "example.com/throwaway/cmd/stickyd")
}

// ---- several hosts (deploy/multihost) ----

// needProxyTool returns the path of haproxy or nginx; outside CI a missing one skips
// (the config is then only checked by the assertions), under CI=true it fails: .ci/run
// installs both.
func needProxyTool(t *testing.T, name string) string {
	t.Helper()
	for _, p := range []string{name, "/usr/sbin/" + name} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found (CI=true: required; apt-get install -y %s)", name, name)
	}
	t.Skipf("%s not found: apt-get install -y %s to check the file with it", name, name)
	return ""
}

// TestMultihostHAProxy: the stick table learns from the header stickyd sends (the
// command line the file documents) and matches on the sid parameter, the table is shared
// through peers, the cookie backends use stickyd's cookie and HAProxy's own, and haproxy
// itself accepts the file.
func TestMultihostHAProxy(t *testing.T) {
	cfg := string(read(t, "multihost/haproxy.cfg"))
	hdr := regexp.MustCompile(`-sid-header (\S+)`).FindStringSubmatch(cfg)
	ck := regexp.MustCompile(`-affinity-cookie (\S+)`).FindStringSubmatch(cfg)
	if hdr == nil || ck == nil {
		t.Fatal("haproxy.cfg does not show the stickyd command line (-sid-header, -affinity-cookie)")
	}
	for _, want := range []string{
		"stick store-response res.hdr(" + hdr[1] + ")",
		"stick match url_param(sid)",
		"stick-table type string len 64",
		"peers stickyd_lbs",
		"\n    cookie " + ck[1] + "\n",
		"cookie SRV insert indirect nocache",
		"option redispatch",
		"timeout tunnel",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy.cfg lacks %q", want)
		}
	}
	haproxy := needProxyTool(t, "haproxy")
	for _, local := range []string{"lb1", "lb2"} {
		out, err := exec.Command(haproxy, "-c", "-f", "multihost/haproxy.cfg", "-L", local).CombinedOutput()
		if err != nil {
			t.Errorf("haproxy -c -L %s: %v\n%s", local, err, out)
		}
	}
}

// TestMultihostNginx: the map routes by stickyd's cookie to one upstream group per host,
// WebSocket upgrades pass, and nginx -t accepts the file.
func TestMultihostNginx(t *testing.T) {
	cfg := string(read(t, "multihost/nginx.conf"))
	ck := regexp.MustCompile(`-affinity-cookie (\S+)`).FindStringSubmatch(cfg)
	if ck == nil {
		t.Fatal("nginx.conf does not show the stickyd command line (-affinity-cookie)")
	}
	for _, want := range []string{"map $cookie_" + ck[1] + " ", "proxy_pass http://$stickyd_upstream", "proxy_set_header Upgrade $http_upgrade", "proxy_http_version 1.1", "X-Forwarded-Proto $scheme"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("nginx.conf lacks %q", want)
		}
	}
	nginx := needProxyTool(t, "nginx")
	abs, err := filepath.Abs("multihost/nginx.conf")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	out, err := exec.Command(nginx, "-t", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", abs, "-g", "pid "+filepath.Join(dir, "nginx.pid")+";").CombinedOutput()
	if err != nil {
		t.Errorf("nginx -t: %v\n%s", err, out)
	}
}

// TestMultihostK8s: the app's pods run `stickyd run` with their pod name as node id and
// the Redis URL of the Redis Service; the Ingress uses ingress-nginx cookie affinity
// (persistent) and points at the app's Service, whose selector matches the pods.
func TestMultihostK8s(t *testing.T) {
	docs := yamlDocs(t, "multihost/k8s.yaml")
	deps, svcs := map[string]map[string]any{}, map[string]map[string]any{}
	var ing map[string]any
	for i, d := range docs {
		kind := s(t, d["kind"], fmt.Sprintf("doc %d kind", i))
		name := s(t, m(t, d["metadata"], kind+".metadata")["name"], kind+".name")
		switch kind {
		case "Deployment":
			deps[name] = d
		case "Service":
			svcs[name] = d
		case "Ingress":
			ing = d
		}
	}
	app, redis := deps["socketio"], deps["socketio-redis"]
	if app == nil || redis == nil || ing == nil || svcs["socketio"] == nil || svcs["socketio-redis"] == nil {
		t.Fatalf("want Deployments socketio and socketio-redis, their Services and an Ingress; have %v %v", slices.Collect(maps.Keys(deps)), slices.Collect(maps.Keys(svcs)))
	}
	spec := m(t, app["spec"], "spec")
	if r, _ := spec["replicas"].(int); r < 2 {
		t.Errorf("replicas %v: several hosts need at least 2", spec["replicas"])
	}
	tmpl := m(t, spec["template"], "template")
	labels := m(t, m(t, tmpl["metadata"], "template.metadata")["labels"], "labels")
	for name, svc := range svcs {
		if name == "socketio" && !subset(m(t, m(t, svc["spec"], "svc spec")["selector"], "selector"), labels) {
			t.Errorf("Service socketio selects %v, pods have %v", m(t, svc["spec"], "svc spec")["selector"], labels)
		}
	}
	c := m(t, l(t, m(t, tmpl["spec"], "pod spec")["containers"], "containers")[0], "container")
	args := strs(t, c["args"], "args")
	if args[0] != "run" || !slices.Contains(args, "--") || !slices.Contains(args, "node") {
		t.Errorf("args %v: want stickyd run … -- node app.js (Node workers need stickyd as their IPC parent)", args)
	}
	if i := slices.Index(args, "-node-id"); i < 0 || args[i+1] != "$(POD_NAME)" {
		t.Errorf("args %v: want -node-id $(POD_NAME)", args)
	}
	env := map[string]map[string]any{}
	for i, e := range l(t, c["env"], "env") {
		em := m(t, e, fmt.Sprintf("env[%d]", i))
		env[s(t, em["name"], "env name")] = em
	}
	if pod := env["POD_NAME"]; pod == nil || m(t, m(t, pod["valueFrom"], "valueFrom")["fieldRef"], "fieldRef")["fieldPath"] != "metadata.name" {
		t.Errorf("POD_NAME must come from metadata.name: %v", env["POD_NAME"])
	}
	if r := env["REDIS_URL"]; r == nil || r["value"] != "redis://socketio-redis:6379" {
		t.Errorf("REDIS_URL %v, want the socketio-redis Service", env["REDIS_URL"])
	}
	ann := m(t, m(t, ing["metadata"], "ingress metadata")["annotations"], "ingress annotations")
	for k, v := range map[string]string{
		"nginx.ingress.kubernetes.io/affinity":            "cookie",
		"nginx.ingress.kubernetes.io/affinity-mode":       "persistent",
		"nginx.ingress.kubernetes.io/session-cookie-path": "/",
	} {
		if ann[k] != v {
			t.Errorf("Ingress annotation %s = %v, want %q", k, ann[k], v)
		}
	}
	if timeout, _ := strconv.Atoi(fmt.Sprint(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"])); timeout <= 25 {
		t.Errorf("proxy-read-timeout %v: must exceed engine.io's pingInterval (25 s)", ann["nginx.ingress.kubernetes.io/proxy-read-timeout"])
	}
	rule := m(t, l(t, m(t, ing["spec"], "ingress spec")["rules"], "rules")[0], "rule")
	path := m(t, l(t, m(t, rule["http"], "http")["paths"], "paths")[0], "path")
	if name := m(t, m(t, path["backend"], "backend")["service"], "service")["name"]; name != "socketio" {
		t.Errorf("Ingress backend %v, want the socketio Service", name)
	}
}
