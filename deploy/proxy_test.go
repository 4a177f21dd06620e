//go:build unix

package deploy_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stickyd/stickyd/balancer/workers"
)

// proxyBackends checks a `stickyd proxy` argv and returns its -backend values, each one
// an address stickyd accepts.
func proxyBackends(t *testing.T, what string, argv []string) []string {
	t.Helper()
	if len(argv) == 0 || argv[0] != "proxy" {
		t.Fatalf("%s: %q, want a stickyd proxy command", what, argv)
	}
	if !slices.Contains(argv, "-metrics") || argv[slices.Index(argv, "-metrics")+1] != ":8071" {
		t.Errorf("%s: %q: the admin port is :8071 everywhere", what, argv)
	}
	var out []string
	for i, a := range argv {
		if a == "-backend" && i+1 < len(argv) {
			if _, err := workers.ParseBackend(argv[i+1]); err != nil {
				t.Errorf("%s: %v", what, err)
			}
			out = append(out, argv[i+1])
		}
	}
	if len(out) == 0 {
		t.Errorf("%s: %q has no -backend", what, argv)
	}
	return out
}

// TestComposeProxy: each proxy service fronts a compose service by its DNS name and port,
// and that service runs an unmodified app on that port.
func TestComposeProxy(t *testing.T) {
	svcs := m(t, yamlDoc(t, "compose-proxy.yaml")["services"], "services")
	for name, port := range map[string]string{"proxy-node": "dns:app:3000", "proxy-python": "dns:pyapp:5000"} {
		svc := m(t, svcs[name], name)
		got := proxyBackends(t, name, strs(t, svc["command"], name+".command"))
		if !slices.Equal(got, []string{port}) {
			t.Errorf("%s backends %q, want %q", name, got, port)
		}
		app := strings.Split(port, ":")[1]
		inline := s(t, m(t, m(t, svcs[app], app)["build"], app+".build")["dockerfile_inline"], app+".dockerfile_inline")
		if !strings.Contains(inline, "PORT="+strings.Split(port, ":")[2]) {
			t.Errorf("%s: its image does not listen on the port %s fronts:\n%s", app, name, inline)
		}
	}
	// The Python image runs the file the e2e tests run, from Debian's packages.
	if _, err := os.Stat(filepath.Join("..", "cmd", "stickyd", "testdata", "python", "server.py")); err != nil {
		t.Error(err)
	}
}

// TestK8sProxy: each pod has the app and a stickyd proxy sidecar that reaches it on
// loopback, probes a route the app serves, and drains in preStop.
func TestK8sProxy(t *testing.T) {
	deployments := 0
	for _, doc := range yamlDocs(t, "k8s-proxy.yaml") {
		if doc["kind"] != "Deployment" {
			continue
		}
		deployments++
		spec := m(t, m(t, m(t, doc["spec"], "spec")["template"], "template")["spec"], "pod spec")
		var proxy map[string]any
		for _, c := range l(t, spec["containers"], "containers") {
			if cm := m(t, c, "container"); cm["name"] == "stickyd" {
				proxy = cm
			}
		}
		if proxy == nil {
			t.Fatalf("%v: no stickyd container", m(t, doc["metadata"], "metadata")["name"])
		}
		argv := strs(t, proxy["args"], "args")
		for _, b := range proxyBackends(t, "k8s stickyd", argv) {
			if !strings.HasPrefix(b, "127.0.0.1:") {
				t.Errorf("sidecar backend %q: want the app on loopback", b)
			}
		}
		if hp := argv[slices.Index(argv, "-health-path")+1]; hp != "/whoami" {
			t.Errorf("-health-path %q: the sample apps serve /whoami", hp)
		}
	}
	if deployments != 2 {
		t.Errorf("%d deployments, want 2 (Node and Python)", deployments)
	}
	app, err := os.ReadFile(filepath.Join("socketio-app", "app.js"))
	if err != nil || !strings.Contains(string(app), `"/whoami"`) {
		t.Errorf("deploy/socketio-app/app.js serves no /whoami (%v)", err)
	}
}
