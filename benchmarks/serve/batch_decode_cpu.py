"""Decode tokens/s of `memfit serve`'s scheduler: one forward per step for all running requests (batched) against
one forward per request per step (per_request), without HTTP and without prefill in the timed part.

For each method, `--rows` requests with prompts of different lengths are admitted and prefilled, then `--steps`
scheduler ticks are timed (every tick is then a pure decode step of every request). The two modes alternate
`--reps` times so that other jobs on a shared machine load both alike; each timed run is one JSONL row. The
greedy tokens of every run are compared with the first run's (`same_tokens_as_first_run`).

    python benchmarks/serve/batch_decode_cpu.py --out benchmarks/serve/cpu_batch/decode.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from memfit.core.budget import Budget
from memfit.engine import encode_prompts
from memfit.models import load_model
from memfit.serve.loadtest import make_prompts
from memfit.serve.scheduler import Request, Scheduler


def timed_run(model, prompts, method, budget, steps, batch_decode):
    scheduler = Scheduler(model, kv_memory=1 << 34, max_batch=len(prompts), prefill_chunk=4096,
                          batch_decode=batch_decode)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    reqs = []
    for i, ids in enumerate(prompts):
        # max_tokens: nobody finishes inside the timed ticks
        req = Request(ids, steps + len(prompts) + 2, method, Budget.parse(budget), {},
                      sink=lambda e, i=i: got[i].extend(e[1] if e[0] == "tokens" else []))
        scheduler.submit(req)
        reqs.append(req)
    with torch.inference_mode():
        while not all(r.prefilled for r in reqs):  # prefill (one request per tick) and the decode steps around it
            scheduler.tick()
        before = {i: len(t) for i, t in got.items()}
        t0 = time.perf_counter()
        for _ in range(steps):
            scheduler.tick()
        seconds = time.perf_counter() - t0
    tokens = sum(len(t) - before[i] for i, t in got.items())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "step_ms": 1e3 * seconds / steps, "forwards": int(scheduler.stats["decode_forwards_total"]),
            "decode_view_bytes": int(scheduler.snapshot().get("decode_view_bytes", 0)),
            "kv_bytes_held": sum(r.cache.nbytes() for r in reqs if r.cache is not None)}, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="snapkv:0.5,snapkv+kivi:0.25")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = load_model("default")
    texts = make_prompts(args.rows, args.prompt_tokens, tok)
    prompts = [encode_prompts(tok, [t], chat=False)[0][0].tolist() for t in texts]
    prompts = [p[: args.prompt_tokens - 7 * i] for i, p in enumerate(prompts)]  # different lengths
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.methods.split(","):
        method, _, budget = spec.partition(":")
        first: dict[int, list[int]] | None = None  # the tokens of this method's first run
        for rep in range(args.reps):
            for mode in ("per_request", "batched"):
                row, got = timed_run(model, prompts, method, budget or None, args.steps, mode == "batched")
                first = got if first is None else first
                row = {"method": method, "budget": budget, "mode": mode, "rep": rep, "rows": args.rows,
                       "prompt_lengths": [len(p) for p in prompts], "steps": args.steps, **row,
                       "same_tokens_as_first_run": got == first, "load_average_1m": os.getloadavg()[0],
                       "torch_threads": torch.get_num_threads(), "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                       "commit": commit, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
