#!/bin/bash
# Front-end cost per proxied engine.io polling request: stickyd proxy (one or more
# binaries: a baseline built from a worktree, and the new one) against HAProxy, side by
# side in one run, on the compare-polling load.
#
#   bench/polling_cpu.sh REPS DUR TARGET...     TARGET: a stickyd binary, or "haproxy"
#   e.g. git worktree add /tmp/base HEAD~4 && (cd /tmp/base && go build -o /tmp/stickyd-old ./cmd/stickyd)
#        go build -o /tmp/stickyd ./cmd/stickyd && go build -o /tmp/stickybench ./cmd/stickybench
#        bench/polling_cpu.sh 3 4s /tmp/stickyd-old /tmp/stickyd haproxy
#
# 4 Node socket.io backends (cmd/stickyd/testdata/socketio/server-listen.js, node_modules
# installed) are started once and warmed up; per repetition and target (order rotated)
# the front is started alone under `perf stat` (Linux, perf installed, tracepoints
# readable: root), one `stickybench polling -c 64 -mix echo -pin-sources -sources 16`
# runs through it (the compare-polling load), and the front's own counts are divided by
# the requests served: CPU (task-clock) per request, system calls per request (I/O:
# read, recvfrom, write, sendto; the rest are the runtime's), context switches per
# request. Medians per target at the end. The machine's other load moves the CPU and
# rate figures; the system call counts hardly move.
set -u
REPS=$1; DUR=$2; shift 2
TARGETS=("$@")
STICKYBENCH=${STICKYBENCH:-/tmp/stickybench}
TMP=$(mktemp -d)
cd "$(dirname "$0")/../cmd/stickyd/testdata/socketio"
PIDS=(); BACKENDS=()
cleanup(){ for p in "${PIDS[@]}"; do kill $p 2>/dev/null; done; rm -rf "$TMP"; }
trap cleanup EXIT
for i in 0 1 2 3; do
  port=$((24100 + i + RANDOM % 500 * 4))
  PORT=$port STICKYD_WORKER_ID=$i node server-listen.js >/dev/null 2>&1 &
  PIDS+=($!); BACKENDS+=("127.0.0.1:$port")
done
sleep 2
# Warm the Node workers up (JIT) first: the first run through a fresh Node process is slow.
for b in "${BACKENDS[@]}"; do $STICKYBENCH polling -q -url http://$b/socket.io/ -c 16 -d 1s >/dev/null 2>&1; done
RES=$TMP/runs; : > $RES
name(){ if [ "$1" = haproxy ]; then echo haproxy; else basename $1; fi; }
for rep in $(seq 1 $REPS); do
  n=${#TARGETS[@]}
  for k in $(seq 0 $((n-1))); do
    t=${TARGETS[$(( (k+rep) % n ))]}
    fport=$((30000 + RANDOM % 2000))
    if [ "$t" = haproxy ]; then
      cf=$TMP/haproxy.cfg
      { printf 'global\n  nbthread 2\n  maxconn 5000\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-request 10s\n  timeout http-keep-alive 60s\nfrontend fe\n  bind 127.0.0.1:%s\n  default_backend be\nbackend be\n  balance source\n  http-reuse safe\n' $fport
        j=0; for b in "${BACKENDS[@]}"; do echo "  server n$j $b"; j=$((j+1)); done; } > $cf
      perf stat -x, -o $TMP/perf -e task-clock,raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_sendto -- haproxy -db -f $cf >/dev/null 2>&1 &
    else
      args=(); for b in "${BACKENDS[@]}"; do args+=(-backend $b); done
      perf stat -x, -o $TMP/perf -e task-clock,raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_sendto -- $t proxy -listen 127.0.0.1:$fport -log-level warn -shutdown-timeout 1s "${args[@]}" >/dev/null 2>&1 &
    fi
    perfp=$!
    sleep 0.2; fp=$(pgrep -P $perfp)
    for w in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$fport/socket.io/?EIO=4&transport=polling" && break; sleep 0.1; done
    c0=$(awk '{print $14+$15}' /proc/$fp/stat)
    out=$($STICKYBENCH polling -q -url http://127.0.0.1:$fport/socket.io/ -c 64 -d $DUR -mix echo -pin-sources -size 16 -sources 16 2>/dev/null)
    c1=$(awk '{print $14+$15}' /proc/$fp/stat)
    kill $fp; wait $perfp 2>/dev/null
    req=$(echo "$out" | grep -o '"requests":[0-9]*' | cut -d: -f2)
    rate=$(echo "$out" | grep -o '"rate":[0-9.]*' | cut -d: -f2)
    errs=$(echo "$out" | grep -o '"errors":[0-9]*' | cut -d: -f2)
    maxms=$(echo "$out" | grep -o '"max_ms":[0-9.]*' | cut -d: -f2)
    tc=$(grep task-clock $TMP/perf | cut -d, -f1)
    sc=$(grep raw_syscalls $TMP/perf | cut -d, -f1)
    cs=$(grep context-switches $TMP/perf | cut -d, -f1)
    io=$(grep -E 'sys_enter_(read|recvfrom|write|sendto),' $TMP/perf | cut -d, -f1 | paste -sd+ | bc)
    line=$(awk -v n="$(name $t)" -v r=$req -v rate=$rate -v e=$errs -v tc=$tc -v pc=$((c1-c0)) -v sc=$sc -v cs=$cs -v io=$io -v rep=$rep -v mx=$maxms \
      'BEGIN{printf "rep %d %-16s req/s %6.0f errors %s  CPU %5.1f µs/req  syscalls %5.2f/req (I/O %4.2f, other %4.2f)  ctx-switches %5.2f/req  (max latency %s ms)\n", rep, n, rate, e, tc*1000/r, sc/r, io/r, (sc-io)/r, cs/r, mx}')
    echo "$line"; echo "$line" >> $RES
    sleep 1
  done
done
echo "medians over $REPS runs:"
med(){ sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col(){ awk -v n=$1 -v k=$2 '$3==n {v=$k; gsub(/[^0-9.]/,"",v); print v}' $RES | med; }
for t in "${TARGETS[@]}"; do
  n=$(name $t)
  printf "  %-16s req/s %6.0f  CPU %5.1f µs/req  syscalls %5.2f/req (I/O %4.2f)  ctx-switches %5.2f/req\n" $n \
    $(col $n 5) $(col $n 9) $(col $n 12) $(col $n 14) $(col $n 18)
done
