// Package deploy holds stickyd's deployment files: Dockerfiles, a compose
// stack (edge, workers, Prometheus, Grafana), a Kubernetes manifest, a
// systemd unit, alert rules and a Grafana dashboard. It has no Go code; its
// tests parse the files and check them against the metrics package and the
// build.
package deploy
