#!/usr/bin/env bash
# relaygraph scaled out on one machine: a 3-node Redis Cluster on loopback and N
# `relaygraph serve` replicas sharing it (and, when the serve config points its agents at a
# model server — e.g. vLLM with prefix caching — sharing that too).
#
#   examples/scaleout/start-local.sh start [REPLICAS]   # default 2 replicas
#   examples/scaleout/start-local.sh status
#   examples/scaleout/start-local.sh stop
#
# Environment: SERVE_CONFIG (a serve config; default: relaygraph serve's default relays),
# RELAYGRAPH_API_KEY (required by every replica when set), RUN_DIR (/tmp/relaygraph-scaleout),
# REDIS_PORT (7001: the cluster uses 7001-7003), SERVE_PORT (8101: replicas on 8101, 8102, ...).
# Needs redis-server and redis-cli (Debian: apt-get install redis-server) and relaygraph.
set -euo pipefail

RUN_DIR=${RUN_DIR:-/tmp/relaygraph-scaleout}
REDIS_PORT=${REDIS_PORT:-7001}
SERVE_PORT=${SERVE_PORT:-8101}
NODES=(${REDIS_PORT} $((REDIS_PORT + 1)) $((REDIS_PORT + 2)))

start() {
  local replicas=${1:-2}
  mkdir -p "$RUN_DIR"
  for port in "${NODES[@]}"; do
    mkdir -p "$RUN_DIR/redis-$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file nodes.conf --dir "$RUN_DIR/redis-$port" --appendonly yes \
      --appendfsync everysec --daemonize yes --pidfile "$RUN_DIR/redis-$port.pid" \
      --logfile "$RUN_DIR/redis-$port.log"
  done
  for port in "${NODES[@]}"; do
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
  done
  if ! redis-cli -p "${NODES[0]}" cluster info | grep -q cluster_state:ok; then
    redis-cli --cluster create "${NODES[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
    until redis-cli -p "${NODES[0]}" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
  fi
  echo "redis cluster: redis+cluster://127.0.0.1:${NODES[0]},127.0.0.1:${NODES[1]},127.0.0.1:${NODES[2]}"
  for ((i = 0; i < replicas; i++)); do
    local port=$((SERVE_PORT + i)) node=${NODES[$((i % 3))]}
    # each replica may name any node: the cluster is detected from a plain redis:// URL
    nohup relaygraph serve ${SERVE_CONFIG:+--config "$SERVE_CONFIG"} --port "$port" \
      --redis "redis://127.0.0.1:$node" >"$RUN_DIR/serve-$port.log" 2>&1 &
    echo $! >"$RUN_DIR/serve-$port.pid"
  done
  for ((i = 0; i < replicas; i++)); do
    local port=$((SERVE_PORT + i))
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
      if ! kill -0 "$(cat "$RUN_DIR/serve-$port.pid")" 2>/dev/null; then
        echo "replica on $port exited; see $RUN_DIR/serve-$port.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    echo "replica: http://127.0.0.1:$port/v1"
  done
}

status() {
  for port in "${NODES[@]}"; do
    printf 'redis %s: %s\n' "$port" "$(redis-cli -p "$port" ping 2>/dev/null || echo down)"
  done
  for pidfile in "$RUN_DIR"/serve-*.pid; do
    [ -e "$pidfile" ] || continue
    local port=${pidfile##*/serve-}
    port=${port%.pid}
    printf 'replica %s: %s\n' "$port" "$(curl -sf "http://127.0.0.1:$port/health" || echo down)"
  done
}

stop() {
  for pidfile in "$RUN_DIR"/serve-*.pid; do
    [ -e "$pidfile" ] || continue
    kill -INT "$(cat "$pidfile")" 2>/dev/null || true  # graceful: running requests finish
    rm -f "$pidfile"
  done
  for port in "${NODES[@]}"; do
    redis-cli -p "$port" shutdown >/dev/null 2>&1 || true  # saves the append-only file
  done
  echo "stopped (data stays in $RUN_DIR)"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start [REPLICAS] | status | stop" >&2; exit 2 ;;
esac
