"""Decode step time of `memfit serve`'s scheduler on a GPU at a given number of running requests, with and without
stack blocks (memfit.core.stacks), and for the server's full-cache mode: no HTTP, no prefill in the timed part.

For each (method, rows, stack) case, `rows` requests with `--prompt-tokens`-token random prompts are submitted to
the product's `Scheduler` and prefilled; then `--steps` scheduler ticks are timed (every tick is then one decode
step of every request). Reports ms per step, output tokens/s, the KV bytes the requests hold, and how many
(request, layer) steps ran in a stack block's one call. `--profile`: the largest case's top CUDA kernels and CPU
operations over three ticks (torch.profiler), printed.

    python benchmarks/serve/stack_decode_gpu.py --model llama-3.1-8b --load-format dummy --prompt-tokens 8192 \
        --rows 1,16,64 --cases snapkv+kivi:0.25:stack,snapkv+kivi:0.25:eager,full::stack,full::nostack \
        --out benchmarks/serve/gpu/stack_decode_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from memfit.bench.provenance import ResultWriter
from memfit.core.budget import Budget
from memfit.models import load_model
from memfit.serve import parse_bytes
from memfit.serve.scheduler import Request, Scheduler


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(model, vocab, method, budget, params, rows, prompt, steps, mode, profile, kv_memory, host_profile=False):
    stack, graphs = mode != "nostack", mode == "stack"
    scheduler = Scheduler(model, kv_memory=kv_memory, max_batch=rows, prefill_chunk=8192, stack_decode=stack,
                          decode_graphs=graphs)
    gen = torch.Generator().manual_seed(0)
    # max_tokens: nobody finishes before the last prompt is read (a request decodes one token per tick, and a
    # prompt takes one tick per 8192-token chunk) and the timed ticks are over
    max_tokens = rows * -(-prompt // 8192) + steps + 16
    reqs = [Request(torch.randint(3, vocab, (prompt,), generator=gen).tolist(), max_tokens, method,
                    Budget.parse(budget), params, sink=lambda e: None) for _ in range(rows)]
    for req in reqs:
        scheduler.submit(req)
    with torch.inference_mode():
        t0 = time.perf_counter()
        while not all(r.prefilled or r.finished for r in reqs):
            scheduler.tick()
        prefill_s = time.perf_counter() - t0
        for _ in range(3):  # the first steps freeze the stores and join the blocks (then a graph's eager step, its record)
            scheduler.tick()
        _sync()
        stacked0 = scheduler.stats["decode_stacked_row_layers_total"]
        tokens0 = scheduler.stats["tokens_generated_total"]
        t0 = time.perf_counter()
        for _ in range(steps):
            scheduler.tick()
        _sync()
        seconds = time.perf_counter() - t0
        # counted now: the profiled ticks below are not timed
        tokens = scheduler.stats["tokens_generated_total"] - tokens0
        stacked = scheduler.stats["decode_stacked_row_layers_total"] - stacked0
        if host_profile:  # where the host's time goes per tick (Python functions, cumulative), cheap unlike below
            import cProfile
            import pstats

            hp = cProfile.Profile()
            hp.enable()
            for _ in range(3):
                scheduler.tick()
            _sync()
            hp.disable()
            pstats.Stats(hp).sort_stats("tottime").print_stats(25)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    scheduler.tick()
                _sync()
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    running = len(scheduler.running)  # requests admitted (all of them unless --kv-memory ran out)
    row = {"method": method, "budget": budget, "params": params, "rows": rows, "running": running,
           "prompt_tokens": prompt, "kv_memory": kv_memory,
           "stack_decode": stack, "decode_graphs": graphs, "steps": steps, "prefill_seconds": round(prefill_s, 2),
           "step_ms": round(1e3 * seconds / steps, 2), "tokens_per_second": round(tokens / seconds, 1),
           "stacked_row_layers_per_step": stacked / steps,
           "graph_captures": scheduler.stats["decode_graph_captures_total"],
           "graph_replays": scheduler.stats["decode_graph_replays_total"],
           "graph_error": scheduler.last_error,
           "kv_bytes_held": sum(r.cache.nbytes() for r in reqs if r.cache is not None),
           "stack_slack_bytes": scheduler.snapshot().get("kv_stack_slack_bytes", 0),
           "stack_blocks": 0 if scheduler.stacks is None else len(scheduler.stacks.all_blocks()),
           "stack_block_rows": [] if scheduler.stacks is None else [b.rows for b in scheduler.stacks.all_blocks()],
           "stack_block_used": [] if scheduler.stacks is None else [b.used for b in scheduler.stacks.all_blocks()],
           "stack_blocks_merged": scheduler.stats["stack_blocks_merged_total"],
           "peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    with torch.inference_mode():  # the stores' tensors are inference tensors (the scheduler thread's mode)
        for req in reqs:
            req.reset()
    del scheduler, reqs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="cuda", help="cuda (the figures), or cpu for a smoke run (MEMFIT_FAST_ON_CPU=1)")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--cases", default="snapkv+kivi:0.25:stack,snapkv+kivi:0.25:eager,snapkv+kivi:0.25:nostack,"
                    "full::stack,full::nostack",
                    help="method:budget:MODE, comma-separated (KIVI at 2 bits); MODE: stack (stack blocks and their "
                    "CUDA graph: the server's default), eager (stack blocks, no graph: --no-decode-graphs), nostack "
                    "(--no-stack-decode)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kv-memory", default="100GiB", help="the server's --kv-memory (stack blocks count against it)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 3 ticks of the largest case (slow)")
    ap.add_argument("--host-profile", action="store_true", help="cProfile over 3 ticks of the largest case")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, _ = load_model(args.model, device=args.device, load_format=args.load_format)
    vocab = model.config.vocab_size
    rows_list = [int(r) for r in args.rows.split(",")]
    cases = [c.split(":") for c in args.cases.split(",")]
    with ResultWriter(args.out) as out:
        for method, budget, stack in cases:
            params = {"kivi.bits": 2} if "kivi" in method else {}
            for rows in rows_list:
                last = rows == rows_list[-1]
                out.write(run_case(model, vocab, method, budget or None, params, rows, args.prompt_tokens,
                                   args.steps, stack, args.profile and last, parse_bytes(args.kv_memory),
                                   args.host_profile and last))


if __name__ == "__main__":
    main()
