"""Where a prompt's prefill time goes on the fast backend (GPU), per method: wall time and device time per kernel
family, so that a method's extra prefill cost over the full cache (issue #10: H2O's prefill <= 1.5x the full
cache's at 32K) can be read kernel by kernel.

Drives the product's own pieces — `memfit.models.load_model` (dummy weights), `memfit.api.make_cache` and
`memfit.engine.prefill_prompt`, the calls `memfit run` makes — and builds no model, store or kernel of its own.
Per method: one warm-up prefill (kernel compilation), `--repeats` timed prefills, then one prefill under
torch.profiler; each row has `prefill_seconds` (median) and `kernels`: the top kernel families by device time.

    python benchmarks/prefill_profile.py --model llama-3.1-8b --context 32768 --methods full,h2o \
        --out benchmarks/results/prefill_profile_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import defaultdict

import torch
from decode_step_profile import family  # a kernel's family name, as the decode profile groups them

from memfit.bench.provenance import ResultWriter
from memfit.engine import prefill_prompt, synthetic_prompt
from memfit.models import load_model


@torch.no_grad()
def measure(model, tok, method: str, budget, context: int, repeats: int, top: int) -> dict:
    from memfit.api import make_cache

    device = torch.device("cuda")
    ids, mask = synthetic_prompt(tok, context)
    ids, mask = ids.to(device), mask.to(device)

    def once() -> float:
        cache = make_cache(model, method, budget, backend="fast", reserve=8)
        torch.cuda.synchronize()
        t = time.perf_counter()
        prefill_prompt(model, ids, mask, cache)
        torch.cuda.synchronize()
        took = time.perf_counter() - t
        del cache
        gc.collect()
        torch.cuda.empty_cache()
        return took

    warm = once()
    times = [once() for _ in range(repeats)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        once()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and dev_us:
            f = per[family(ev.key)]
            f[0] += dev_us
            f[1] += ev.count
    total = sum(v[0] for v in per.values())
    kernels = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "method": method, "budget": budget, "context": context, "warmup_seconds": warm,
        "prefill_seconds": statistics.median(times), "prefill_seconds_all": times,
        "device_ms_total": total / 1e3,
        "kernels": [{"family": k, "device_ms": v[0] / 1e3, "calls": v[1]} for k, v in kernels],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", default="full,h2o")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="benchmarks/results/prefill_profile.jsonl")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: prefill_profile.py needs a CUDA device")
    model, tok = load_model(a.model, device="cuda", dtype="bfloat16", load_format="dummy")
    with ResultWriter(a.out) as w:
        for method in a.methods.split(","):
            budget = None if method == "full" else a.budget
            row = measure(model, tok, method, budget, a.context, a.repeats, a.top)
            w.write(row)


if __name__ == "__main__":
    main()
