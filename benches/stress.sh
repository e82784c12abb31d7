#!/usr/bin/env bash
# The stress run: N subscribers (default 100,000) on one Plenum process,
# 1 event per second of 200-byte data to all of them for 60 s.
#
# This machine caps open files at 20,000 per process, so:
#   - the server uses the io_uring backend, whose connections are direct
#     descriptors in each ring's registered file table (up to the open-file
#     limit per ring), with enough shards to hold N (6 here);
#   - the load generator spreads N over processes (18,000 each at most) and
#     source addresses 127.0.0.2-127.0.0.20 (60,000+ connections to one port).
#
# Usage: benches/stress.sh [PLENUM_BIN]
# Environment: N (100000), SHARDS (6), BACKEND (uring), RATE (1), PAYLOAD (200),
#   PUBLISH_S (60), CONNECT_RATE (5000), OUT (target/stress).
# Writes OUT/report.json, OUT/report.svg, OUT/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/plenum}
N=${N:-100000}
SHARDS=${SHARDS:-6}
BACKEND=${BACKEND:-uring}
RATE=${RATE:-1}
PAYLOAD=${PAYLOAD:-200}
PUBLISH_S=${PUBLISH_S:-60}
CONNECT_RATE=${CONNECT_RATE:-5000}
OUT=${OUT:-target/stress}
mkdir -p "$OUT"
EVENTS=$((RATE * PUBLISH_S))
TICKS=$(getconf CLK_TCK)

metric() { curl -s "http://$ADDR/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'; }
cpu_s() { awk -v t="$TICKS" '{ sub(/^.*\) /, ""); print ($12 + $13) / t }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

"$BIN" serve --listen 127.0.0.1:0 --backend "$BACKEND" --shards "$SHARDS" \
  --connections-max $((N + 1000)) --log-level warn >"$OUT/server.out" 2>"$OUT/server.err" &
PID=$!
trap 'kill $PID 2>/dev/null; kill $(jobs -p) 2>/dev/null; true' EXIT
for _ in $(seq 200); do grep -q listening "$OUT/server.out" && break; sleep 0.05; done
ADDR=$(awk '/listening/ { print $2; exit }' "$OUT/server.out")
[ -n "$ADDR" ] || { echo "server did not start:"; cat "$OUT/server.err"; exit 1; }
sleep 0.5
RSS_IDLE=$(rss_kib $PID)
echo "server pid $PID at $ADDR, backend $BACKEND, $SHARDS shards, rss ${RSS_IDLE} KiB"

# The subscribers stop by themselves once each has received every event.
CONNECT_S=$(( N / CONNECT_RATE + 1 ))
"$BIN" load subscribe --url "http://$ADDR/events?topic=stress" --connections "$N" \
  --source-ips 127.0.0.2-127.0.0.20 --connect-rate "$CONNECT_RATE" \
  --expect-events "$EVENTS" --duration $((CONNECT_S + PUBLISH_S + 60))s \
  --server-pid $PID --json "$OUT/report.json" --svg "$OUT/report.svg" \
  --progress-interval 10s >"$OUT/subscribe.txt" 2>"$OUT/subscribe.err" &
SUBSCRIBE=$!

for _ in $(seq $(( (CONNECT_S + 60) * 10 ))); do
  [ "$(metric plenum_subscribers_open)" -ge "$N" ] && break
  kill -0 $SUBSCRIBE 2>/dev/null || break
  sleep 0.1
done
OPEN=$(metric plenum_subscribers_open)
RSS_CONNECTED=$(rss_kib $PID)
echo "subscribers open: $OPEN of $N; server rss ${RSS_CONNECTED} KiB"
CPU0=$(cpu_s $PID); FRAMES0=$(metric plenum_frames_delivered_total)
"$BIN" load publish --url "http://$ADDR/publish?topic=stress" --rate "$RATE" \
  --payload-bytes "$PAYLOAD" --count "$EVENTS" --duration $((PUBLISH_S + 10))s >"$OUT/publish.txt" 2>&1
wait $SUBSCRIBE || true
CPU1=$(cpu_s $PID); FRAMES1=$(metric plenum_frames_delivered_total)
RSS_END=$(rss_kib $PID)
curl -s "http://$ADDR/metrics" >"$OUT/metrics.txt"

{
  echo "# stress run $(date -u +%FT%TZ): N=$N backend=$BACKEND shards=$SHARDS rate=${RATE}/s payload=${PAYLOAD}B events=$EVENTS"
  echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r), open files $(ulimit -Hn)"
  echo "subscribers open at peak: $OPEN"
  echo "server rss: idle ${RSS_IDLE} KiB, connected ${RSS_CONNECTED} KiB, end ${RSS_END} KiB;" \
       "per connection $(( (RSS_CONNECTED - RSS_IDLE) * 1024 / N )) B (delta), $(( RSS_CONNECTED * 1024 / N )) B (total)"
  awk -v c0="$CPU0" -v c1="$CPU1" -v f0="$FRAMES0" -v f1="$FRAMES1" 'BEGIN {
    printf "server cpu during publishing: %.2f s for %d frames = %.2f us per delivered event\n", c1 - c0, f1 - f0, (c1 - c0) * 1e6 / ((f1 - f0) > 0 ? (f1 - f0) : 1) }'
  grep -E '^sent' "$OUT/publish.txt"
  sed -n '/^connections/,/^checks/p' "$OUT/subscribe.txt"
} | tee "$OUT/summary.txt"
