#!/usr/bin/env bash
# epoll vs io_uring on this machine, same flags, one after the other in one run:
#   (memory first, on the fresh process, then CPU, then FIN)
#   1. server CPU time per delivered event: SUBS subscribers, RATE events/s of
#      PAYLOAD bytes for PUBLISH_SECONDS; (utime+stime of the server from /proc/PID/stat)
#      / (frames delivered, from /metrics), over the publishing window only;
#   2. memory per idle subscriber: (RSS with IDLE idle subscribers - RSS before)
#      / IDLE;
#   3. FIN-to-reclaim: `plenum load misbehave --mode half-close` (client-side
#      time from shutdown(SHUT_WR) to the server's close).
#
# Usage: benches/uring_vs_epoll.sh SERVER_BIN LOAD_BIN
#   SERVER_BIN: a release `plenum` of this branch; LOAD_BIN: a `plenum` with
#   the `load` subcommand (branch `load`). Environment: SUBS (3000), RATE (20),
#   PAYLOAD (200), PUBLISH_SECONDS (25), IDLE (10000), SHARDS (2), FINS (1000),
#   ROUNDS (1), IDLE_CONNECT_RATE (2000 connections/s).
set -euo pipefail
SERVER=${1:?server binary}
LOAD=${2:?load binary}
SUBS=${SUBS:-3000}
RATE=${RATE:-20}
PAYLOAD=${PAYLOAD:-200}
SECONDS_=${PUBLISH_SECONDS:-25}
IDLE=${IDLE:-10000}
SHARDS=${SHARDS:-2}
FINS=${FINS:-1000}
OUT=${OUT:-/tmp/plenum-bench}
mkdir -p "$OUT"
TICKS=$(getconf CLK_TCK)

cpu_seconds() { # utime + stime of PID, in seconds
  awk -v t="$TICKS" '{ sub(/^.*\) /, ""); print ($12 + $13) / t }' "/proc/$1/stat"
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
metric() { # sum of samples of metric $2 from server $1
  curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
wait_metric() { # until metric $2 of server $1 equals $3 (60 s at most)
  for _ in $(seq 600); do
    [ "$(metric "$1" "$2")" = "$3" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $2 = $3 (now $(metric "$1" "$2"))" >&2
  return 1
}

run_backend() {
  local backend=$1
  "$SERVER" serve --listen 127.0.0.1:0 --backend "$backend" --shards "$SHARDS" \
    --log-level warn --heartbeat-interval 0 >"$OUT/$backend.out" 2>"$OUT/$backend.err" &
  local pid=$!
  SERVER_PID=$pid
  for _ in $(seq 600); do grep -q listening "$OUT/$backend.out" && break; sleep 0.05; done
  local addr
  addr=$(awk '/listening/ { print $2 }' "$OUT/$backend.out")
  sleep 1

  # 1. Memory per idle subscriber, first, on the fresh process.
  local rss0 rss1
  rss0=$(rss_kib "$pid")
  # Connected at a moderate rate: each connection holds a request buffer
  # until its head is parsed, and a burst of them leaves allocator pages
  # behind that are not per-subscriber cost.
  "$LOAD" load subscribe --url "http://$addr/events?topic=idle" --connections "$IDLE" \
    --connect-rate "${IDLE_CONNECT_RATE:-2000}" --duration 120s --progress-interval 0 >"$OUT/$backend.idle.txt" 2>&1 &
  local subscribers=$!
  wait_metric "$addr" plenum_subscribers_open "$IDLE"
  # The allocator returns the handshakes' request buffers to the system
  # some time after they are freed: let it settle.
  sleep 5
  rss1=$(rss_kib "$pid")
  kill -INT "$subscribers"; wait "$subscribers" || true
  wait_metric "$addr" plenum_subscribers_open 0

  # 2. CPU per delivered event.
  "$LOAD" load subscribe --url "http://$addr/events?topic=bench" --connections "$SUBS" \
    --duration $((SECONDS_ + 60))s --progress-interval 0 >"$OUT/$backend.subscribe.txt" 2>&1 &
  subscribers=$!
  wait_metric "$addr" plenum_subscribers_open "$SUBS"
  local cpu0 frames0 cpu1 frames1
  cpu0=$(cpu_seconds "$pid"); frames0=$(metric "$addr" plenum_frames_delivered_total)
  "$LOAD" load publish --url "http://$addr/publish?topic=bench" --rate "$RATE" \
    --payload-bytes "$PAYLOAD" --duration "${SECONDS_}s" >"$OUT/$backend.publish.txt" 2>&1 || true
  sleep 0.5
  cpu1=$(cpu_seconds "$pid"); frames1=$(metric "$addr" plenum_frames_delivered_total)
  kill -INT "$subscribers"; wait "$subscribers" || true
  wait_metric "$addr" plenum_subscribers_open 0

  # 3. FIN-to-reclaim.
  "$LOAD" load misbehave --url "http://$addr/events?topic=fin" --mode half-close \
    --connections "$FINS" --duration 30s >"$OUT/$backend.fin.txt" 2>&1 || true

  kill "$pid"; wait "$pid" || true
  awk -v b="$backend" -v c0="$cpu0" -v c1="$cpu1" -v f0="$frames0" -v f1="$frames1" \
      -v r0="$rss0" -v r1="$rss1" -v n="$IDLE" -v s="$SUBS" 'BEGIN {
    printf "%-6s cpu %.2f s for %d frames = %.3f us/frame (%d subscribers); ", b, c1 - c0, f1 - f0, (c1 - c0) * 1e6 / (f1 - f0), s
    printf "rss %d KiB -> %d KiB = %.0f B per idle subscriber (%d)\n", r0, r1, (r1 - r0) * 1024 / n, n
  }' | tee -a "$OUT/summary.txt"
  grep -E "^sent" "$OUT/$backend.publish.txt" | sed "s/^/$backend publish: /" | tee -a "$OUT/summary.txt"
  grep -E "^(server|closed after)" "$OUT/$backend.fin.txt" | head -5 | sed "s/^/$backend fin: /" | tee -a "$OUT/summary.txt"
}

SERVER_PID=
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; true' EXIT
: >"$OUT/summary.txt"
# Alternate the backends so that noise from other work on the machine
# falls on both alike.
for round in $(seq "${ROUNDS:-1}"); do
  echo "round $round, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/summary.txt"
  run_backend epoll
  run_backend uring
done
