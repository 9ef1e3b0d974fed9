"""CPU decode speed of compressed caches on the default model (batch 1, one 2048-token bench prompt, 32 new tokens).

Shows the cost of a quantized cache on CPU, where attention dequantizes every quantized token each step (the
Triton kernels are CUDA-only). Writes one JSON line per method (prefill seconds, decode tokens/s, with the run's
provenance); compare within one run.

    python benchmarks/cpu_decode_speed.py --threads 2 --out benchmarks/results/cpu_decode_speed.jsonl
"""

from __future__ import annotations

import argparse

import torch

from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.bench.tasks import generate_samples
from memfit.engine import generate
from memfit.models import load_model

CONFIGS = (("full", None), ("kivi", None), ("snapkv", 0.25), ("snapkv+kivi", 0.25), ("gear", None), ("vidkv", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("default", progress=False)
    ids = torch.tensor([generate_samples("fidelity", tok, 2048, 1, seed=0)[0].prompt_ids])
    mask = torch.ones_like(ids)
    with ResultWriter(args.out) as out:
        for method, budget in CONFIGS:
            gen = generate(model, ids, mask, make_cache(model, method, budget), 32, [])
            out.write({"method": method, "budget": budget, "prompt_tokens": int(ids.shape[1]), "new_tokens": 32,
                       "threads": args.threads, "prefill_seconds": gen.prefill_seconds,
                       "decode_tokens_per_second": gen.decode_tokens_per_second})


if __name__ == "__main__":
    main()
