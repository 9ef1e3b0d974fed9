"""CPU time of one decode step's attention over quantized stores (the portable path), without the model's layers.

Prefills the default model's 2048-token bench prompt into a quantized cache (`make_cache` + `prefill_prompt`), then
times `attend` of one new query token over every layer's store, `--rounds` times: each call dequantizes the
layer's held keys and values (what a decode step does per layer, before the weights' matmuls) and runs SDPA. The
store is not changed by `attend`, so every round does the same work. Rows: per method, the min / median / max of
the rounds (milliseconds for all layers). The minimum is what the code costs when nothing else takes the core;
on a loaded box compare minima, alternating the trees being compared (PYTHONPATH=<tree>, this same file).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/quantized_attend_speed.py --out benchmarks/results/x.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.bench.tasks import generate_samples
from memfit.engine import prefill_prompt
from memfit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="kivi,gear,vidkv", help="comma-separated quantizers (no budget)")
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds (one attend per layer each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)
    model, tok = load_model("default", progress=False)
    ids = torch.tensor([generate_samples("fidelity", tok, 2048, 1, seed=0)[0].prompt_ids])
    mask = torch.ones_like(ids)
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, 1, head_dim, generator=gen, dtype=model.dtype)
    with ResultWriter(args.out) as out:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            cache = make_cache(model, method, None)
            with torch.no_grad():
                prefill_prompt(model, ids, mask, cache)
                layers = cache.core.layers
                for layer in layers:  # warm-up (allocator, first-call paths)
                    layer.attend(query, head_dim**-0.5)
                wall, cpu = [], []
                for _ in range(args.rounds):
                    w, c = time.perf_counter(), time.process_time()
                    for layer in layers:
                        layer.attend(query, head_dim**-0.5)
                    wall.append(1e3 * (time.perf_counter() - w))
                    cpu.append(1e3 * (time.process_time() - c))
            out.write({"method": method, "prompt_tokens": int(ids.shape[1]), "layers": len(layers),
                       "threads": args.threads, "rounds": args.rounds, "kv_bytes": cache.core.nbytes(),
                       "wall_ms_min": min(wall), "wall_ms_median": statistics.median(wall), "wall_ms_max": max(wall),
                       "cpu_ms_min": min(cpu), "cpu_ms_median": statistics.median(cpu),
                       "cpu_share": sum(cpu) / sum(wall)})


if __name__ == "__main__":
    main()
