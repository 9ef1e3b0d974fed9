#!/usr/bin/env bash
# Issue #11, CPU target: the default model behind `memfit serve`, 16 concurrent clients, 1K-token prompts; every
# request must complete, and the server's peak RSS must stay within --kv-memory + weights + 300 MiB.
# Usage (from the repository root): bash benchmarks/serve/cpu.sh   -> benchmarks/serve/cpu/{report.md,*.jsonl}
set -euo pipefail
OUT=${OUT:-benchmarks/serve/cpu}
PORT=${PORT:-8123}
METHOD=${METHOD:-snapkv+kivi}
BUDGET=${BUDGET:-0.25}
KV_MEMORY=${KV_MEMORY:-512MiB}
mkdir -p "$OUT"
memfit serve --method "$METHOD" --budget "$BUDGET" --kv-memory "$KV_MEMORY" --port "$PORT" --log-level warning \
  > "$OUT/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do  # wait (at most 2 minutes) for the model to load
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.5
done
memfit loadtest --url "http://127.0.0.1:$PORT" --concurrency 16 --requests 16 --prompt-tokens 1024 --max-tokens 32 \
  --server-pid "$PID" --out "$OUT"
