#!/usr/bin/env bash
# Memory per idle subscriber: RSS of a fresh server before any connection and
# with N idle event streams open, held by two Python processes (N/2 each,
# from 127.0.0.2 and 127.0.0.3, so each stays under the 20,000-file limit).
#
# Usage: benches/idle_memory.sh PLENUM_BIN N [server flags...]
#   e.g. benches/idle_memory.sh target/release/plenum 15000 --shards 2 --backend epoll
# Prints: N, RSS before and after, (after - before) / N and after / N.
# With FANOUT=K in the environment it then publishes K events of 200 bytes to
# all N, one at a time (each once delivered to all), and prints the RSS after
# them: what fan-out leaves behind (allocator pages kept, per-send state).
set -euo pipefail
BIN=$1; N=$2; shift 2
OUT=$(mktemp -d)
trap 'kill $PID 2>/dev/null; kill $(jobs -p) 2>/dev/null; rm -rf "$OUT"; true' EXIT
cat >"$OUT/hold.py" <<'PY'
import socket, sys, time
port, n, source, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
held = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /events?topic=idle HTTP/1.1\r\nHost: x\r\n\r\n")
    held.append(s)
print("connected", n, flush=True)
time.sleep(hold)
PY
"$BIN" serve --listen 127.0.0.1:0 --log-level warn "$@" >"$OUT/server.out" 2>"$OUT/server.err" &
PID=$!
for _ in $(seq 100); do grep -q listening "$OUT/server.out" && break; sleep 0.05; done
ADDR=$(awk '/listening/ { print $2; exit }' "$OUT/server.out")
sleep 0.5
RSS0=$(awk '/^VmRSS/ { print $2 }' /proc/$PID/status)
for source in 127.0.0.2 127.0.0.3; do
  python3 "$OUT/hold.py" "${ADDR##*:}" $((N / 2)) $source 30 >>"$OUT/hold.log" &
done
for _ in $(seq 600); do [ "$(grep -c connected "$OUT/hold.log" 2>/dev/null)" -ge 2 ] && break; sleep 0.1; done
for _ in $(seq 100); do
  OPEN=$(curl -s "http://$ADDR/metrics" | awk '/^plenum_subscribers_open/ { s += $2 } END { print s + 0 }')
  [ "$OPEN" -ge $((N / 2 * 2)) ] && break; sleep 0.1
done
sleep 1
RSS1=$(awk '/^VmRSS/ { print $2 }' /proc/$PID/status)
BACKEND=$(curl -s "http://$ADDR/metrics" | sed -n 's/^plenum_info{backend="\([a-z]*\)".*/\1/p')
awk -v n="$N" -v a="$RSS0" -v b="$RSS1" -v backend="$BACKEND" -v open="$OPEN" 'BEGIN {
  printf "backend=%s N=%d open=%d rss_before=%dKiB rss_after=%dKiB per_subscriber_delta=%.0fB per_subscriber_total=%.0fB\n",
    backend, n, open, a, b, (b - a) * 1024 / n, b * 1024 / n }'
if [ "${FANOUT:-0}" -gt 0 ]; then
  DATA=$(head -c 200 /dev/zero | tr '\0' x)
  for k in $(seq "$FANOUT"); do
    curl -s -o /dev/null -X POST --data "$DATA" "http://$ADDR/publish?topic=idle"
    for _ in $(seq 600); do
      SENT=$(curl -s "http://$ADDR/metrics" | awk '/^plenum_frames_delivered_total/ { s += $2 } END { print s + 0 }')
      [ "$SENT" -ge $((k * OPEN)) ] && break; sleep 0.05
    done
  done
  RSS2=$(awk '/^VmRSS/ { print $2 }' /proc/$PID/status)
  HWM=$(awk '/^VmHWM/ { print $2 }' /proc/$PID/status)
  awk -v n="$N" -v a="$RSS1" -v b="$RSS2" -v h="$HWM" -v k="$FANOUT" -v sent="$SENT" 'BEGIN {
    printf "after %d fan-outs (%d frames delivered): rss=%dKiB (+%.0fB per subscriber) peak=%dKiB\n",
      k, sent, b, (b - a) * 1024 / n, h }'
fi
