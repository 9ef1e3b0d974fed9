#!/usr/bin/env bash
# The fast runtime's GPU checks in one device call (issues #10 and #15), so a session's device time goes to
# measuring rather than to machine start-ups (~70 s each):
#   1. the GPU tests of the fast path (fused decode ops, H2O column sums, backends, kernels, static stores);
#   2. the product path with the fused decode operations off and on (MEMFIT_FUSED_OPS=0/1), two processes, 32K prompt;
#   3. where one decode step's time goes (kernels per step, replay vs loop), bf16 and 4-bit weights, 2K prompt.
# Everything lands in $OUT (default benchmarks/results/gpu_session); each script records its command and versions.
#   OUT=/some/dir bash benchmarks/gpu_session.sh          (about 6 minutes on one H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_fused_ops.py tests/test_column_sums.py \
    tests/test_backends.py tests/test_gpu_paths.py tests/test_weight_kernels.py tests/test_static_quant.py \
    tests/test_kernels.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu: $(tail -1 "$OUT/pytest_gpu.log")"
for fused in 0 1; do
    MEMFIT_FUSED_OPS=$fused python benchmarks/runtime_gpu.py --model llama-3.1-8b --context 32768 --new 256 \
        --methods full,snapkv,h2o,snapkv+kivi --budget 0.25 --backends fast --no-transformers \
        --out "$OUT/runtime_fused$fused.jsonl" > "$OUT/runtime_fused$fused.log" 2>&1 || echo "runtime_gpu (fused=$fused) failed"
done
python benchmarks/decode_step_profile.py --weights none,rtn:4 --methods full --context 2048 \
    --out "$OUT/decode_step_profile.jsonl" > "$OUT/decode_step_profile.log" 2>&1 || echo "decode_step_profile failed"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("runtime_fused0.jsonl", "runtime_fused1.jsonl", "decode_step_profile.jsonl"):
    path = out / name
    for line in (path.read_text().splitlines() if path.exists() else []):
        r = json.loads(line)
        keep = ("method", "weights", "decode_ms_per_token", "steady_ms_per_token", "roofline_fraction",
                "prefill_seconds", "decode_setup_seconds", "replay_ms", "kernels_per_step", "fused_ops")
        print(name, {k: r[k] for k in keep if k in r})
PY
