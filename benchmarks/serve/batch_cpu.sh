#!/usr/bin/env bash
# Issue #11, batched decode: the same load against `memfit serve` decoding every running request in ONE forward per
# step (--batch-decode, the default) and in one forward per request (--no-batch-decode). Default model on the CPU,
# 8 concurrent clients, 8 requests of 64-token prompts, 32 output tokens each (ignore_eos).
# Usage (from the repository root): bash benchmarks/serve/batch_cpu.sh
#   -> benchmarks/serve/cpu_batch/{batched,per_request}/{report.md,summary.jsonl,requests.jsonl,server.log}
set -euo pipefail
OUT=${OUT:-benchmarks/serve/cpu_batch}
PORT=${PORT:-8124}
METHOD=${METHOD:-snapkv}
BUDGET=${BUDGET:-0.5}
CONCURRENCY=${CONCURRENCY:-8}
REQUESTS=${REQUESTS:-8}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
MAX_TOKENS=${MAX_TOKENS:-32}
for mode in per_request batched; do
  flag=$([ "$mode" = batched ] && echo --batch-decode || echo --no-batch-decode)
  mkdir -p "$OUT/$mode"
  memfit serve --method "$METHOD" --budget "$BUDGET" --kv-memory 256MiB "$flag" --port "$PORT" \
    --log-level warning > "$OUT/$mode/server.log" 2>&1 &
  PID=$!
  trap 'kill $PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 240); do  # wait (at most 2 minutes) for the model to load
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
  done
  memfit loadtest --url "http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
    --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" --server-pid "$PID" --out "$OUT/$mode"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
