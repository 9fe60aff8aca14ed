#!/usr/bin/env bash
# Memory per idle proxied connection, side by side between ztunnel binaries,
# on a lab from `cargo xtask lab up --prefix PREFIX` (its ztunnels running).
#
#   scripts/idle-memory.sh PREFIX [N] BIN_A BIN_B [BIN_A BIN_B ...]
#
# For each binary in turn: restarts both nodes' ztunnels with it (same
# arguments), starts a fresh hold server in the server pod on a port not
# used before (so no TIME_WAIT or CLOSE_WAIT of an earlier round is in the
# way), opens N (default 10,000) connections from the client pod through
# both ztunnels, waits until the server holds them (or their count stops
# growing), and prints each node's RSS growth per connection. Unlike the
# bench, nothing runs first, so the heap starts as a fresh process's: the
# figures are higher than the bench's (which follow its bulk phases) and
# move less between rounds.
set -euo pipefail
P=$1; shift
N=10000
if [[ ${1:-} =~ ^[0-9]+$ ]]; then N=$1; shift; fi
[ $# -ge 1 ] || { echo "usage: $0 PREFIX [N] BIN..." >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ST=/tmp/ztlab-state
SERVER_IP=198.18.2.10
PORT=7400
(cd "$ROOT" && cargo build -q -p xtask)
declare -A ARGS
for n in node1 node2; do
  pid=$(cat "$ST/$P-$n.pid")
  ARGS[$n]=$(tr '\0' '\n' < "/proc/$pid/cmdline" | tail -n +2)
done
rss() { awk '/VmRSS/{print $2}' "/proc/$(cat "$ST/$P-$1.pid")/status"; }
restart() {
  for n in node1 node2; do
    pid=$(cat "$ST/$P-$n.pid")
    kill "$pid" 2>/dev/null || true
    while [ -e "/proc/$pid" ]; do sleep 0.1; done
  done
  for n in node1 node2; do
    mapfile -t a <<< "${ARGS[$n]}"
    RUST_LOG=info setsid nsenter --net="/run/netns/$P-$n" "$1" "${a[@]}" > "$ST/$P-$n.log" 2>&1 < /dev/null &
    echo $! > "$ST/$P-$n.pid"
  done
  for n in node1 node2; do
    for _ in $(seq 300); do grep -q ready "$ST/$P-$n.log" && break; sleep 0.1; done
  done
  sleep 1
}
for ns in client server node1 node2; do ip netns exec "$P-$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1; done
trap 'pkill -f "xtask hold-server $SERVER_IP" || true; touch /tmp/$P-idle-done' EXIT
for bin in "$@"; do
  PORT=$((PORT + 1))
  pkill -f "xtask hold-server $SERVER_IP" || true
  ip netns exec "$P-server" "$ROOT/target/debug/xtask" hold-server "$SERVER_IP:$PORT" > /dev/null 2>&1 &
  restart "$bin"
  before1=$(rss node1); before2=$(rss node2)
  rm -f "/tmp/$P-idle-done"
  ip netns exec "$P-client" python3 -c "
import os, resource, socket, time
resource.setrlimit(resource.RLIMIT_NOFILE, (N := $N + 1000, N))
held = [socket.create_connection(('$SERVER_IP', $PORT)) for _ in range($N)]
while not os.path.exists('/tmp/$P-idle-done'):
    time.sleep(0.1)" &
  client=$!
  # Until the server holds all of them, or the count has not moved for 10 s
  # (a few SYNs that overflowed the hold server's backlog retry for a minute).
  held=0; last=-1; still=0
  while [ "$held" -lt "$N" ] && [ "$still" -lt 50 ]; do
    sleep 0.2
    held=$(ip netns exec "$P-server" ss -Htn state established "( sport = :$PORT )" | wc -l)
    if [ "$held" -eq "$last" ]; then still=$((still + 1)); else still=0; last=$held; fi
  done
  sleep 1
  after1=$(rss node1); after2=$(rss node2)
  touch "/tmp/$P-idle-done"; wait "$client" || true
  awk -v b="$(basename "$bin")" -v h="$held" -v n="$N" -v b1="$before1" -v a1="$after1" -v b2="$before2" -v a2="$after2" \
    'BEGIN { printf "%s: %d held; KiB per connection node1 %.2f, node2 %.2f (idle RSS %d / %d KiB)\n", b, h, (a1-b1)/n, (a2-b2)/n, b1, b2 }'
done
