"""`memfit bench` on a GPU through the Python API (for machines without the CLI's extra packages).

Equivalent to `memfit bench --device cuda --dtype bfloat16 ...`: the default model in bf16 on CUDA, every eviction
method at three budgets and the quantizers, on the bench's generated prompts at --context tokens. Rows go to
--out/results.jsonl (resumable); the report files need matplotlib and are skipped with a note when it is missing
(re-run `memfit bench` with the same flags on a machine that has it: finished rows are not recomputed).

    python benchmarks/gpu_default_bench.py --context 8192 --out benchmarks/bench_gpu_8k
"""

from __future__ import annotations

import argparse
import sys
import time

EVICTION = "streaming,snapkv,h2o,scissorhands,keyformer,gemfilter,windowkv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/bench_gpu_8k")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--budgets", default="0.125,0.25,0.5")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from memfit.bench.runner import run_bench
    from memfit.models import load_model

    pair = load_model("default", device=args.device, dtype=args.dtype, progress=False)
    runs = [  # (methods, budgets, params)
        (EVICTION.split(","), args.budgets.split(","), None),
        (["kivi", "gear", "vidkv"], ["none"], None),
        (["kivi"], ["none"], {"kivi": {"bits": 4}}),
        (["snapkv+kivi"], ["0.25"], None),
    ]
    for methods, budgets, params in runs:
        t0 = time.perf_counter()
        try:
            res = run_bench(pair, methods=methods, budgets=budgets, context=args.context, samples=args.samples,
                            out=args.out, params=params, model_name="SmolLM2-135M-Instruct", progress=False)
            print(f"{methods}: {len(res.new_rows)} new rows in {time.perf_counter() - t0:.0f} s", flush=True)
        except ImportError as exc:  # the report needs matplotlib; the rows are already in results.jsonl
            print(f"{methods}: rows written, report skipped ({exc})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
