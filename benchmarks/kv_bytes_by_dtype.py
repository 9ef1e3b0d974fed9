"""KV bytes held by each quantizer configuration with the default model in bfloat16 and in float32.

The bench runs the default model in fp32 on CPU, so its compression ratios are against an fp32 cache. A quantizer's
packed codes do not shrink with the model's dtype, but its full-precision residual window and its scales do, so
against a bf16 cache (what a GPU user holds) the ratios are lower. This script measures both on one 2K-token
needle prompt of the bench (seed 0) and writes one JSON line per (dtype, configuration), with its provenance
(machine, versions, commit, command), to ``--out`` (and stdout):

    python benchmarks/kv_bytes_by_dtype.py --dtypes bfloat16 --out benchmarks/results/kv_bytes_bf16.jsonl
    python benchmarks/kv_bytes_by_dtype.py --dtypes float32 --out benchmarks/results/kv_bytes_fp32.jsonl

(one dtype per command, so the two can run side by side: bf16 matmuls are slow on CPUs without bf16 units).
"""

from __future__ import annotations

import argparse

import torch

from memfit.bench.provenance import ResultWriter
from memfit.bench.tasks import generate_samples
from memfit.engine import run
from memfit.models import load_model

CONFIGS: list[tuple[str, float | None, dict[str, object]]] = [
    ("kivi", None, {}),
    ("kivi", None, {"bits": 4}),
    ("gear", None, {}),
    ("gear", None, {"bits": 4, "base": "kcvt"}),
    ("vidkv", None, {}),
    ("snapkv+kivi", 0.25, {}),
    ("scissorhands+kivi", 0.25, {"kivi.bits": 4}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated model dtypes to measure")
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with ResultWriter(args.out) as out:
        for dtype in (d.strip() for d in args.dtypes.split(",") if d.strip()):
            measure(dtype, out)


def measure(dtype: str, out: ResultWriter) -> None:
    """One JSON line per configuration with the default model loaded in ``dtype``."""
    model, tok = load_model("default", dtype=dtype, progress=False)
    sample = generate_samples("niah_single_number", tok, 2048, 1, seed=0)[0]
    for method, budget, params in CONFIGS:
        r = run(sample.prompt, model=(model, tok), method=method, budget=budget, params=dict(params),
                max_new_tokens=16, chat=False)
        out.write({"dtype": dtype, "method": method, "budget": budget, "params": params,
                   "prompt_tokens": r.prompt_tokens, "kv_bytes_full": r.kv_bytes_full,
                   "kv_bytes_held": r.kv_bytes_held, "compression_ratio": r.compression_ratio,
                   "answer": r.text[:16]})


if __name__ == "__main__":
    main()
