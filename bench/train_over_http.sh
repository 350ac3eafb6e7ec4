#!/usr/bin/env bash
# End-to-end timing of a training job over HTTP on the default model: starts a server on a
# fresh temporary store, runs examples/train_over_http.sh against it (upload the shared
# sentiment data, watch progress, generate with the new version), then stops the server.
#
#   bench/train_over_http.sh                 # 40 steps, 2 training threads
#   STEPS=100 SOFTPROMPT_TRAIN_THREADS=1 bench/train_over_http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
export SOFTPROMPT_TRAIN_THREADS=${SOFTPROMPT_TRAIN_THREADS:-2}
export SOFTPROMPT_STORE
SOFTPROMPT_STORE=$(mktemp -d)/store
PORT=${PORT:-8123}
.venv/bin/softprompt serve --port "$PORT" > "$SOFTPROMPT_STORE.server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/ready" > /dev/null && break; sleep 1; done
URL="http://127.0.0.1:$PORT" STEPS=${STEPS:-40} examples/train_over_http.sh
echo "server stats: $(curl -s "127.0.0.1:$PORT/stats")"
