"""KV bytes held by each quantizer configuration with the default model in bfloat16 and in float32.

The bench runs the default model in fp32 on CPU, so its compression ratios are against an fp32 cache. A quantizer's
packed codes do not shrink with the model's dtype, but its full-precision residual window and its scales do, so
against a bf16 cache (what a GPU user holds) the ratios are lower. This script measures both on one 2K-token
needle prompt of the bench (seed 0) and prints one JSON line per (dtype, configuration).

    python benchmarks/kv_bytes_by_dtype.py > benchmarks/results/kv_bytes_by_dtype.jsonl
"""

from __future__ import annotations

import json

import torch

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
    torch.set_num_threads(1)
    for dtype in ("bfloat16", "float32"):
        model, tok = load_model("default", dtype=dtype, progress=False)
        sample = generate_samples("niah_single_number", tok, 2048, 1, seed=0)[0]
        for method, budget, params in CONFIGS:
            r = run(sample.prompt, model=(model, tok), method=method, budget=budget, params=dict(params),
                    max_new_tokens=16, chat=False)
            print(json.dumps({"dtype": dtype, "method": method, "budget": budget, "params": params,
                              "prompt_tokens": r.prompt_tokens, "kv_bytes_full": r.kv_bytes_full,
                              "kv_bytes_held": r.kv_bytes_held, "compression_ratio": round(r.compression_ratio, 2),
                              "answer": r.text[:16]}), flush=True)


if __name__ == "__main__":
    main()
