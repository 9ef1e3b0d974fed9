"""Where one decode step's time goes on the fast backend (GPU): kernels per step, device time per kernel family,
and the graph replay alone (the product's whole loop, host work included, is measured by `runtime_gpu.py`:
`decode_steady_tokens_per_second`).

Drives the product's own pieces — `memfit.models.load_model` (dummy weights), `memfit.weights.quantize_model`,
`memfit.api.make_cache`, `memfit.engine.prefill_prompt` and `memfit.graphs.DecodeSteps` — the calls `memfit run`
makes, in the same order; it builds no model, store or kernel of its own. Per configuration it writes:
- `replay_ms`: graph replays back to back, one sync at the end (the GPU's time for a step);
- `kernels_per_step` and the top kernel families by device time, from torch.profiler over a few replays.
`MEMFIT_FUSED_OPS=0` in the environment turns the fused norms/rotary/activation off (`fused_ops` in each row).

    python benchmarks/decode_step_profile.py --model llama-3.1-8b --weights none,rtn:4 --context 2048 \
        --out benchmarks/results/decode_step_profile_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from collections import defaultdict

import torch

from memfit.bench.provenance import ResultWriter
from memfit.engine import positions_from_mask, prefill_prompt, synthetic_prompt
from memfit.graphs import DecodeSteps
from memfit.models import load_model


def family(name: str) -> str:
    """A kernel's family: its name without template arguments and launch suffixes."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[:80]


@torch.no_grad()
def profile(model, tok, method: str, budget, context: int, steps: int, profiled: int) -> dict:
    from memfit.api import make_cache

    device = torch.device("cuda")
    cache = make_cache(model, method, budget, backend="fast", reserve=steps + profiled + 8)
    ids, mask = synthetic_prompt(tok, context)
    ids, mask = ids.to(device), mask.to(device)
    logits, mask = prefill_prompt(model, ids, mask, cache)
    pos = positions_from_mask(mask)[:, -1:]
    step = DecodeSteps(model, cache, steps=steps + profiled + 4)
    tokens = logits.argmax(-1)
    # the first (eager) step and the capture
    for _ in range(2):
        pos = pos + 1
        logits = step(tokens, mask, pos)
    torch.cuda.synchronize()
    if step.graph is None:
        return {"error": f"no CUDA graph: {step.reason}"}
    t = time.perf_counter()
    for _ in range(steps):
        pos = pos + 1
        logits = step(tokens, mask, pos)
    torch.cuda.synchronize()
    replay_ms = 1000 * (time.perf_counter() - t) / steps
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            pos = pos + 1
            logits = step(tokens, mask, pos)
        torch.cuda.synchronize()
    fam_us: dict[str, float] = defaultdict(float)
    fam_n: dict[str, int] = defaultdict(int)
    total_us, count = 0.0, 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.name not in ("Memcpy HtoD", "Memcpy DtoD"):
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            fam_us[family(ev.name)] += us
            fam_n[family(ev.name)] += 1
            total_us += us
            count += 1
    top = sorted(fam_us, key=fam_us.get, reverse=True)[:15]
    return {"fused_ops": cache.backend.fused_ops, "replay_ms": replay_ms, "kernels_per_step": count / profiled,
            "kernel_ms_per_step": total_us / 1000 / profiled, "graph": step.graph is not None,
            "top": [{"kernel": k, "per_step": fam_n[k] / profiled, "us_per_step": fam_us[k] / profiled}
                    for k in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--weights", default="none,rtn:4")
    ap.add_argument("--methods", default="full")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profiled", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/decode_step_profile.jsonl")
    args = ap.parse_args()
    with ResultWriter(args.out) as out:
        for weights in args.weights.split(","):
            model, tok = load_model(args.model, device="cuda", dtype="bfloat16", load_format="dummy", progress=False)
            if weights != "none":
                from memfit.weights import quantize_model

                quantize_model(model, weights, tokenizer=tok)
            for method in args.methods.split(","):
                budget = None if method in ("full", "kivi") else float(args.budget)
                row = profile(model, tok, method, budget, args.context, args.steps, args.profiled)
                out.write({"model": args.model, "weights": weights, "method": method, "budget": budget,
                           "context": args.context, **row})
                gc.collect()
                torch.cuda.empty_cache()
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
