"""Which torch operators a few decode steps run (CPU, default model, 2K prompt): a load-independent A/B of two trees.

Wall-clock tokens/s on a shared box moves by +-15 % between runs of the same code; the operators a step runs do
not. This prefills the 2048-token bench prompt into `make_cache(model, method, budget)`, then records `--steps`
greedy decode steps with torch.profiler (CPU) and writes one row per method: the number of operator calls, the
number of distinct (operator, input shapes) pairs, a hash of the sorted {(operator, shapes): calls} table (equal
hashes = the same work, call for call), the recorded self CPU time (load-dependent, for orientation only) and the
heaviest pairs. Run the same file against each tree (PYTHONPATH=<tree>) and compare `ops_sha`.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/decode_op_counts.py --methods gear --out benchmarks/results/x.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
from torch.profiler import ProfilerActivity, profile

from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.bench.tasks import generate_samples
from memfit.engine import positions_from_mask, prefill_prompt
from memfit.graphs import DecodeSteps
from memfit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,gear", help="comma-separated methods (no budget)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps recorded")
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(1)
    model, tok = load_model("default", progress=False)
    ids = torch.tensor([generate_samples("fidelity", tok, 2048, 1, seed=0)[0].prompt_ids])
    with ResultWriter(args.out) as out:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            cache = make_cache(model, method, None)
            with torch.no_grad():
                logits, mask = prefill_prompt(model, ids, torch.ones_like(ids), cache)
                pos = positions_from_mask(mask)[:, -1:]
                step = DecodeSteps(model, cache, steps=args.steps)
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(args.steps):  # what memfit.engine.generate does per step (batch 1)
                        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                        pos = pos + 1
                        logits = step(logits.argmax(-1), mask, pos)
            table = {f"{e.key} {e.input_shapes}": (e.count, e.self_cpu_time_total)
                     for e in prof.key_averages(group_by_input_shape=True)}
            counts = {k: c for k, (c, _) in sorted(table.items())}
            top = sorted(table.items(), key=lambda kv: -kv[1][1])[:8]
            out.write({"method": method, "prompt_tokens": int(ids.shape[1]), "steps": args.steps,
                       "op_calls": sum(counts.values()), "op_shape_pairs": len(counts),
                       "ops_sha": hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16],
                       "self_cpu_ms": sum(t for _, t in table.values()) / 1e3,
                       "top_self_cpu": [{"op": k, "calls": c, "ms": t / 1e3} for k, (c, t) in top]})


if __name__ == "__main__":
    main()
