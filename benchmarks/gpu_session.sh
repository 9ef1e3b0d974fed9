#!/usr/bin/env bash
# The fast runtime's GPU checks and issue #10/#15 measurements in one device call (machine start-ups cost ~70 s
# each, so a session's device time goes to measuring):
#   1. the GPU tests of the fast path (fused decode ops, column sums, backends, kernels, static stores, int4 kernel);
#   2. the product path at 32K beside transformers (and kvpress when KVPRESS_PATH names a folder holding kvpress
#      and its pinned transformers), full / snapkv / h2o / snapkv+kivi;
#   3. the largest batch at 32K and its tokens/s (full vs snapkv+kivi), through `memfit run --kv`, and the KIVI
#      rows again with the canonical code layout (MEMFIT_KIVI_LAYOUT=canonical: the A/B of plane order);
#   4. 4-bit weights against bf16 through `memfit run` (the pair-order int4 kernel; with and without a 4-bit head);
#   5. where one decode step's time goes (kernels per step, replay), bf16 and 4-bit weights, 2K prompt.
# Everything lands in $OUT (default benchmarks/results/gpu_session); each script records its command and versions.
#   OUT=/some/dir [KVPRESS_PATH=/tmp/kvp] bash benchmarks/gpu_session.sh          (about 9 minutes on one H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_fused_ops.py tests/test_column_sums.py \
    tests/test_backends.py tests/test_gpu_paths.py tests/test_weight_kernels.py tests/test_static_quant.py \
    tests/test_kernels.py tests/test_tinygemm.py tests/test_int4_pairs.py tests/test_weight_head.py \
    > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu: $(tail -1 "$OUT/pytest_gpu.log")"
python benchmarks/runtime_gpu.py --model llama-3.1-8b --context 32768 --new 256 \
    --methods full,snapkv,h2o,snapkv+kivi --budget 0.25 --backends fast --repeats 2 ${KVPRESS_PATH:+--kvpress-path "$KVPRESS_PATH"} \
    --out "$OUT/runtime.jsonl" > "$OUT/runtime.log" 2>&1 || echo "runtime_gpu failed"
python benchmarks/max_batch_gpu.py --model llama-3.1-8b --context 32768 --new 128 --methods full,snapkv+kivi \
    --budget 0.25 --out "$OUT/max_batch.jsonl" > "$OUT/max_batch.log" 2>&1 || echo "max_batch_gpu failed"
MEMFIT_KIVI_LAYOUT=canonical python benchmarks/max_batch_gpu.py --model llama-3.1-8b --context 32768 --new 128 \
    --methods snapkv+kivi --budget 0.25 --out "$OUT/max_batch_canonical.jsonl" > "$OUT/max_batch_canonical.log" 2>&1 \
    || echo "max_batch_gpu (canonical layout) failed"
python benchmarks/weights/gpu_decode_speed.py --weights none,rtn:4,rtn:4:head=true --context 2048 --new 256 \
    --out "$OUT/weights_decode.jsonl" > "$OUT/weights_decode.log" 2>&1 || echo "gpu_decode_speed failed"
python benchmarks/decode_step_profile.py --weights none,rtn:4 --methods full --context 2048 \
    --out "$OUT/decode_step_profile.jsonl" > "$OUT/decode_step_profile.log" 2>&1 || echo "decode_step_profile failed"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keep = ("kind", "method", "weights", "rows", "decode_ms_per_token", "steady_ms_per_token", "roofline_fraction",
        "prefill_seconds", "decode_setup_seconds", "decode_capture_seconds", "tokens_per_second", "replay_ms",
        "kernels_per_step", "steady_speedup_vs_bf16")
for name in ("runtime.jsonl", "max_batch.jsonl", "max_batch_canonical.jsonl", "weights_decode.jsonl",
             "decode_step_profile.jsonl"):
    path = out / name
    for line in (path.read_text().splitlines() if path.exists() else []):
        r = json.loads(line)
        print(name, {k: r[k] for k in keep if k in r})
PY
