#!/usr/bin/env bash
# Issue #11's TTFT target: "time to first token p50 within 1.3x of a single-request prefill when the server is at
# 80 % of its peak throughput". One `memfit serve` (Llama-3.1-8B config, random bf16 weights), then
#   1. one request at a time (the single-request TTFT),
#   2. a closed loop of CLIENTS clients (the peak: its requests/s),
#   3. an open loop at FRACTION x that peak (`memfit loadtest --request-rate`, Poisson arrivals),
# and a last line comparing (3)'s TTFT p50 with (1)'s.
# Usage (repository root, one GPU): bash benchmarks/serve/ttft_gpu.sh -> $OUT/{single,peak,rate}/report.md
set -uo pipefail
OUT=${OUT:-benchmarks/serve/gpu/ttft}
PORT=${PORT:-8124}
PROMPT=${PROMPT:-8192}
NEW=${NEW:-128}
KV_MEMORY=${KV_MEMORY:-16GiB}
CLIENTS=${CLIENTS:-64}
REQUESTS=${REQUESTS:-128}
FRACTION=${FRACTION:-0.8}
LIMIT=${LIMIT:-200}  # seconds per load test
METHOD=${METHOD:-"--method snapkv+kivi --budget 0.25 --param kivi.bits=2"}
MODEL=${MODEL-"--model llama-3.1-8b --load-format dummy --device cuda"}  # MODEL= TOKENIZER=default: a CPU smoke run
TOKENIZER=${TOKENIZER:-bytes}
mkdir -p "$OUT"

# shellcheck disable=SC2086  # MODEL and METHOD are lists of flags
memfit serve $MODEL $METHOD --kv-memory "$KV_MEMORY" \
  --max-batch 512 --prefill-chunk 4096 --port "$PORT" --log-level warning > "$OUT/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.5
done
load() {  # name, then extra loadtest flags
  local name=$1; shift
  timeout "$LIMIT" memfit loadtest --url "http://127.0.0.1:$PORT" --tokenizer "$TOKENIZER" --prompt-tokens "$PROMPT" \
    --max-tokens "$NEW" --server-pid "$pid" --out "$OUT/$name" "$@" > /dev/null || echo "loadtest $name: exit $?"
}
field() {  # summary file, field
  python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])[sys.argv[2]])" "$1" "$2"
}
load warmup --concurrency 1 --requests 1  # the first request records graphs and compiles kernels
load single --concurrency 1 --requests 4
load peak --concurrency "$CLIENTS" --requests "$REQUESTS"
rate=$(python3 -c "print(round($FRACTION * $(field "$OUT/peak/summary.jsonl" requests_per_second), 4))")
load rate --concurrency 512 --requests "$REQUESTS" --request-rate "$rate"
curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics.txt" || true
kill "$pid"; wait "$pid" 2>/dev/null
single=$(field "$OUT/single/summary.jsonl" ttft_p50_seconds)
loaded=$(field "$OUT/rate/summary.jsonl" ttft_p50_seconds)
python3 -c "print(f'TTFT p50 at {$FRACTION} x peak ({$rate} req/s): {$loaded:.3f} s against {$single:.3f} s alone: ' \
f'{$loaded / $single:.2f}x (target <= 1.3x)')" | tee "$OUT/verdict.txt"
