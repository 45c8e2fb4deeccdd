#!/usr/bin/env bash
# Run a command with REDIS_URL pointing at a Redis server the command may flush.
#  - REDIS_URL already set: used as it is.
#  - redis-server installed: a throwaway server on a free loopback port, stopped afterwards.
#  - otherwise: the server on 127.0.0.1:6379, database 15.
set -euo pipefail
if [ -n "${REDIS_URL:-}" ]; then exec "$@"; fi

if command -v redis-server >/dev/null; then
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  stop_redis() {
    local status=$? pid
    pid=$(cat "$dir/redis.pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      # Wait for it to exit (it writes its last log lines and removes its pid file), so the
      # folder is not removed under it; bounded, polled.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -rf "$dir" || true
    exit "$status"
  }
  trap stop_redis EXIT
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  export REDIS_URL="redis://127.0.0.1:$port/0"
elif (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  export REDIS_URL="redis://127.0.0.1:6379/15"
else
  echo "No Redis server: install redis-server (apt-get install redis-server) or set REDIS_URL" >&2
  exit 2
fi
echo "Redis for this run: $REDIS_URL" >&2
"$@"
