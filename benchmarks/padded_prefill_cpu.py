"""CPU time of a left-padded batched prefill on the default model: one masked SDPA (before) vs row-by-row causal
attention (memfit now), and the same four prompts one by one. snapkv@0.25, prompts of 2048/2000/1950/1900 tokens.

    python benchmarks/padded_prefill_cpu.py --threads 2 --out benchmarks/results/padded_prefill_cpu.jsonl

One JSON line per variant, with the run's provenance.
"""

from __future__ import annotations

import argparse
import time

import torch
from padded_prefill_peak import masked_attention  # the previous dense_attention, kept there for the GPU A/B

import memfit.core.store as core_cache  # the module whose KVLayer.attend looks up dense_attention
from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.engine import generate, pad_left
from memfit.models import load_model


def prefill_seconds(model, ids, mask) -> float:
    t0 = time.perf_counter()
    generate(model, ids, mask, make_cache(model, "snapkv", 0.25), 1, [])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("default", progress=False)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 40000, (n,), generator=g).tolist() for n in (2048, 2000, 1950, 1900)]
    ids, mask = pad_left(rows)
    common = {"lengths": [len(r) for r in rows], "method": "snapkv@0.25", "threads": args.threads}
    with ResultWriter(args.out) as out:
        current = core_cache.dense_attention
        core_cache.dense_attention = masked_attention
        out.write({"variant": "padded batch, one masked SDPA", **common,
                   "prefill_seconds": prefill_seconds(model, ids, mask)})
        core_cache.dense_attention = current
        out.write({"variant": "padded batch, row by row", **common, "prefill_seconds": prefill_seconds(model, ids, mask)})
        alone = sum(prefill_seconds(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows)
        out.write({"variant": "rows one by one", **common, "prefill_seconds": alone})


if __name__ == "__main__":
    main()
