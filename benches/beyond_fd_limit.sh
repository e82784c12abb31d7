#!/usr/bin/env bash
# One server process holds more subscribers than its open-file limit, all
# receiving one published event (issue 3, "beyond the fd limit").
#
# With --backend uring, accepted connections are direct descriptors in each
# shard ring's registered file table and never enter the process fd table;
# each table may hold up to RLIMIT_NOFILE entries, so 4 shards hold 4 tables.
# The client spreads over 3 processes (at most 18,000 fds each) and 8 source
# addresses (bound with IP_BIND_ADDRESS_NO_PORT, so the ephemeral ports of
# one address do not run out).
#
# Usage: benches/beyond_fd_limit.sh SERVER_BIN LOAD_BIN
#   SERVER_BIN: a release `plenum` of this branch; LOAD_BIN: a `plenum` with
#   the `load` subcommand. Environment: SUBS (40000), NOFILE (20000).
set -euo pipefail
SERVER=${1:?server binary}
LOAD=${2:?load binary}
SUBS=${SUBS:-40000}
NOFILE=${NOFILE:-20000}
OUT=${OUT:-/tmp/plenum-beyond}
mkdir -p "$OUT"

metric() {
  curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

ulimit -n "$NOFILE"
echo "RLIMIT_NOFILE: soft $(ulimit -Sn), hard $(ulimit -Hn)"
"$SERVER" serve --listen 127.0.0.1:0 --backend uring --shards 4 --connections-max 42000 \
  --heartbeat-interval 0 --log-level info >"$OUT/server.out" 2>"$OUT/server.err" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; true' EXIT
for _ in $(seq 600); do grep -q listening "$OUT/server.out" && break; sleep 0.05; done
ADDR=$(awk '/listening/ { print $2 }' "$OUT/server.out")
grep -o 'serving: .*' "$OUT/server.err"
grep "Max open files" "/proc/$SERVER_PID/limits"

"$LOAD" load subscribe --url "http://$ADDR/events?topic=wide" --connections "$SUBS" \
  --processes 3 --source-ips 127.0.0.2-127.0.0.9 --connect-rate 5000 \
  --duration 180s --expect-events 1 --progress-interval 0 >"$OUT/subscribe.txt" 2>&1 &
LOAD_PID=$!
for _ in $(seq 1200); do
  [ "$(metric "$ADDR" plenum_subscribers_open)" = "$SUBS" ] && break
  sleep 0.1
done
echo "subscribers open: $(metric "$ADDR" plenum_subscribers_open)"
echo "server fds in /proc/$SERVER_PID/fd: $(ls "/proc/$SERVER_PID/fd" | wc -l)"
echo "server RSS: $(awk '/^VmRSS/ { print $2, $3 }' "/proc/$SERVER_PID/status")"
echo "publish: id $(curl -s -X POST --data 'one event for everyone' "http://$ADDR/publish?topic=wide")"
wait "$LOAD_PID" || true
cat "$OUT/subscribe.txt" | grep -vE '^\s*$'
for m in plenum_frames_delivered_total plenum_uring_accept_table_full_total \
  plenum_uring_accept_rearms_total plenum_uring_cq_overflows_total; do
  echo "$m $(metric "$ADDR" "$m")"
done
