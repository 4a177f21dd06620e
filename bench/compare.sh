#!/bin/sh
# Direct vs stickyd vs nginx vs HAProxy on loopback; prints a Markdown table.
# nginx and HAProxy are skipped when not installed (Debian: apt-get install -y nginx-light haproxy).
# Extra arguments go to `stickybench compare` (e.g. -reps 5, -idle-n 9000).
set -eu
cd "$(dirname "$0")/.."
go build -o /tmp/stickyd ./cmd/stickyd
go build -o /tmp/stickybench ./cmd/stickybench
exec /tmp/stickybench compare -stickyd /tmp/stickyd -raw /tmp/stickybench-raw.jsonl "$@"
