"""CPU decode speed of compressed caches on the default model (batch 1, one 2048-token bench prompt, 32 new tokens).

Shows the cost of a quantized cache on CPU, where attention dequantizes every quantized token each step (the
Triton kernels are CUDA-only). Writes one JSON line per method (prefill seconds, decode tokens/s, with the run's
provenance); compare within one run.

    python benchmarks/cpu_decode_speed.py --threads 2 --out benchmarks/results/cpu_decode_speed.jsonl

A/B of two commits on a shared, loaded box: run this same file against each tree (a `git worktree` of the other
commit, PYTHONPATH pointing at it), alternating, with `--methods` to time only what is compared, `--repeats` runs
per method in one process and `--threads 1` (with OMP_NUM_THREADS=1). Each row also has `cpu_seconds` (this
process's CPU time over prefill + decode) next to `wall_seconds`: a ratio well below the thread count means other
processes took the cores during that run, so its tokens/s says more about the load than about the code.
"""

from __future__ import annotations

import argparse
import time

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
    ap.add_argument("--methods", default=",".join(m for m, _ in CONFIGS),
                    help="comma-separated subset of the configurations, in this order (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method in this process (rows: repeat)")
    args = ap.parse_args()
    known = dict(CONFIGS)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen or args.repeats < 1:
        ap.error(f"--methods takes a comma-separated subset of {', '.join(known)} (got {args.methods!r}); "
                 f"--repeats >= 1")
    torch.set_num_threads(args.threads)
    model, tok = load_model("default", progress=False)
    ids = torch.tensor([generate_samples("fidelity", tok, 2048, 1, seed=0)[0].prompt_ids])
    mask = torch.ones_like(ids)
    with ResultWriter(args.out) as out:
        for repeat in range(args.repeats):
            for method in chosen:
                budget = known[method]
                wall, cpu = time.perf_counter(), time.process_time()
                gen = generate(model, ids, mask, make_cache(model, method, budget), 32, [])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                out.write({"method": method, "budget": budget, "prompt_tokens": int(ids.shape[1]), "new_tokens": 32,
                           "threads": args.threads, "repeat": repeat, "prefill_seconds": gen.prefill_seconds,
                           "decode_tokens_per_second": gen.decode_tokens_per_second, "wall_seconds": wall,
                           "cpu_seconds": cpu})


if __name__ == "__main__":
    main()
