#!/usr/bin/env bash
# 1,000 stalled readers next to 100 healthy subscribers, under 1,000 events/s
# of 1 KiB data, with default server flags (issue 2's stalled-reader figure).
#
# Reports: server RSS before the load and its peak during it (growth = peak -
# before), how the stalled readers were closed (by reason), and what the
# healthy subscribers received (gaps, duplicates, latency).
#
# Usage: benches/stalled_readers.sh [PLENUM_BIN]
# Environment: STALLED (1000), HEALTHY (100), RATE (1000), PAYLOAD (1024),
#   DURATION_S (60), BACKEND (epoll), SHARDS (2), OUT (/tmp/plenum-stalled),
#   EXTRA (more server flags, e.g. "--write-stall-timeout 10s").
set -euo pipefail
BIN=${1:-target/release/plenum}
STALLED=${STALLED:-1000}
HEALTHY=${HEALTHY:-100}
RATE=${RATE:-1000}
PAYLOAD=${PAYLOAD:-1024}
SECONDS_=${DURATION_S:-60}
BACKEND=${BACKEND:-epoll}
SHARDS=${SHARDS:-2}
OUT=${OUT:-/tmp/plenum-stalled}
mkdir -p "$OUT"

metric() { # sum of the samples of metric $1
  curl -s "http://$ADDR/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
wait_metric_at_least() { # metric $1 >= $2, 60 s at most
  for _ in $(seq 600); do
    [ "$(metric "$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1 >= $2" >&2; return 1
}

# shellcheck disable=SC2086
"$BIN" serve --listen 127.0.0.1:0 --backend "$BACKEND" --shards "$SHARDS" --log-level warn ${EXTRA:-} \
  >"$OUT/server.out" 2>"$OUT/server.err" &
PID=$!
trap 'kill $PID 2>/dev/null; kill $(jobs -p) 2>/dev/null; true' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/server.out" && break; sleep 0.05; done
ADDR=$(awk '/listening/ { print $2 }' "$OUT/server.out")
RSS_BEFORE=$(awk '/^VmRSS/ { print $2 }' /proc/$PID/status)

"$BIN" load watch --pid $PID --interval 250ms --duration $((SECONDS_ + 30))s --json "$OUT/watch.json" \
  >"$OUT/watch.txt" 2>&1 &
WATCH=$!
"$BIN" load subscribe --url "http://$ADDR/events?topic=flood" --connections "$HEALTHY" \
  --duration $((SECONDS_ + 20))s --progress-interval 0 --json "$OUT/healthy.json" >"$OUT/healthy.txt" 2>&1 &
HEALTHY_PID=$!
"$BIN" load misbehave --url "http://$ADDR/events?topic=flood" --mode stall --connections "$STALLED" \
  --duration $((SECONDS_ + 20))s --json "$OUT/stalled.json" >"$OUT/stalled.txt" 2>&1 &
STALLED_PID=$!
wait_metric_at_least plenum_subscribers_open $((HEALTHY + STALLED))

"$BIN" load publish --url "http://$ADDR/publish?topic=flood" --rate "$RATE" --payload-bytes "$PAYLOAD" \
  --duration "${SECONDS_}s" >"$OUT/publish.txt" 2>&1
sleep 2
kill -INT $HEALTHY_PID $STALLED_PID 2>/dev/null || true
wait $HEALTHY_PID $STALLED_PID 2>/dev/null || true
curl -s "http://$ADDR/metrics" >"$OUT/metrics.txt"
kill $WATCH 2>/dev/null || true

PEAK=$(python3 -c "import json,sys; d=json.load(open('$OUT/watch.json')); s=d.get('samples', d); print(max(x['rss_bytes'] for x in s)//1024)")
{
  echo "stalled=$STALLED healthy=$HEALTHY rate=$RATE/s payload=${PAYLOAD}B seconds=$SECONDS_ backend=$BACKEND extra='${EXTRA:-}'"
  echo "server rss before ${RSS_BEFORE} KiB, peak ${PEAK} KiB, growth $(( (PEAK - RSS_BEFORE) / 1024 )) MiB"
  grep -E '^plenum_connections_closed_total' "$OUT/metrics.txt" | grep -v ' 0$'
  grep -E '^(sent|published|rate)' "$OUT/publish.txt" | head -3
  sed -n '1,40p' "$OUT/healthy.txt" | grep -Ei 'connected|events|gaps|duplicates|latency|p50|p99' | head -12
} | tee "$OUT/summary.txt"
