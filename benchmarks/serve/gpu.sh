#!/usr/bin/env bash
# Issue #11, GPU target at a quarter of the size (8K-token prompts; README "GPU target" says why): Llama-3.1-8B's
# config with random bf16 weights behind `memfit serve`, the same --kv-memory for the compressed mode and the
# server's own full-cache mode, then one client at a time for the single-request TTFT reference.
# Usage (repository root, one GPU): bash benchmarks/serve/gpu.sh -> benchmarks/serve/gpu/<mode>/{report.md,*.jsonl}
set -uo pipefail
OUT=${OUT:-benchmarks/serve/gpu}
PORT=${PORT:-8123}
PROMPT=${PROMPT:-8192}
NEW=${NEW:-128}
KV_MEMORY=${KV_MEMORY:-16GiB}
CLIENTS=${CLIENTS:-128}
LIMIT=${LIMIT:-300}  # seconds per load test: a run that cannot finish says so instead of eating the session
mkdir -p "$OUT"

serve_and_load() {  # name, then the server's method flags
  local name=$1; shift
  memfit serve --model llama-3.1-8b --load-format dummy --device cuda "$@" --kv-memory "$KV_MEMORY" \
    --max-batch 512 --prefill-chunk 4096 --port "$PORT" --log-level warning > "$OUT/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
  done
  timeout "$LIMIT" memfit loadtest --url "http://127.0.0.1:$PORT" --tokenizer bytes --prompt-tokens "$PROMPT" \
    --max-tokens "$NEW" --concurrency "$CLIENTS" --requests "$CLIENTS" --server-pid "$pid" --out "$OUT/$name" \
    || echo "loadtest $name: exit $? (timeout $LIMIT s?)"
  if [ "$name" = snapkv_kivi2_0.25 ]; then  # the single-request reference for TTFT, same server
    timeout "$LIMIT" memfit loadtest --url "http://127.0.0.1:$PORT" --tokenizer bytes --prompt-tokens "$PROMPT" \
      --max-tokens "$NEW" --concurrency 1 --requests 4 --server-pid "$pid" --out "$OUT/single" \
      || echo "loadtest single: exit $?"
  fi
  curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/$name.metrics.txt" || true
  kill "$pid"; wait "$pid" 2>/dev/null
}

MODES=${MODES:-"snapkv_kivi2_0.25 full"}  # e.g. MODES=full: only the server's full-cache mode
for mode in $MODES; do
  case $mode in
    snapkv_kivi2_0.25) serve_and_load snapkv_kivi2_0.25 --method snapkv+kivi --budget 0.25 --param kivi.bits=2 ;;
    snapkv_kivi2_0.25_nostack)  # A/B: every frozen KIVI store decodes in calls of its own (no stack blocks)
      serve_and_load snapkv_kivi2_0.25_nostack --method snapkv+kivi --budget 0.25 --param kivi.bits=2 \
        --no-stack-decode ;;
    full) serve_and_load full --method full ;;
    *) echo "unknown mode $mode (snapkv_kivi2_0.25 | snapkv_kivi2_0.25_nostack | full)" ;;
  esac
done
