"""The largest batch that fits at a long context, and its decode throughput, on the product path (issue #10's
max-batch target: at 32K, snapkv+kivi2@0.25 holds >= 15x the full cache's rows at >= 8x its tokens/s).

Prefilling hundreds of 32K prompts one by one would take most of an hour, so every row here asks a question about
the same 32K-token document: the document is compressed once (`memfit.contexts.compress_ids`, what `memfit compress`
runs), and `memfit.run(questions, kv=context)` (what `memfit run --kv` runs) gives each row its own copy of the
compressed cache (`CompressedContext.cache(batch=B)`: B real copies, nothing shared), prefills the questions on top
and decodes all rows together. Decode cost per step does not depend on what the rows hold, only on how much.

Rows per method: as many as the free GPU memory holds at `--memory-fraction`, from the per-row bytes (the compressed
document plus the question and the new tokens at full precision, an upper bound); a run that still runs out of
memory retries with 15 % fewer rows. tokens/s = rows x replayed decode steps per second.

    python benchmarks/max_batch_gpu.py --model llama-3.1-8b --context 32768 --new 128 --methods full,snapkv+kivi \
        --budget 0.25 --out benchmarks/results/max_batch_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc

import torch

from memfit.bench.provenance import ResultWriter
from memfit.contexts import compress_ids
from memfit.engine import run, synthetic_prompt
from memfit.models import load_model

QUESTION = "What is the main topic of the text above?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=32768)
    # at least MIN_GRAPH_STEPS + 2 new tokens, or the decode never records a CUDA graph (memfit.graphs) and runs eagerly
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--methods", default="full,snapkv+kivi")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--max-rows", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=None, help="a fixed batch instead of the largest that fits")
    ap.add_argument("--out", default="benchmarks/results/max_batch.jsonl")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tok = load_model(args.model, device=args.device, dtype="bfloat16" if device.type == "cuda" else "float32",
                            load_format="dummy", progress=False)
    ids = synthetic_prompt(tok, args.context)[0][0].tolist()
    with ResultWriter(args.out) as out:
        for method in args.methods.split(","):
            keeps_all = method in ("full", "kivi", "gear", "vidkv")
            budget = None if keeps_all else float(args.budget)
            ctx = compress_ids(model, tok, ids, method, budget)
            question_tokens = int(ctx.encode_questions([QUESTION])[0].shape[1])
            per_token_full = ctx.full_nbytes() / max(1, ctx.seen)
            per_row = ctx.nbytes() + per_token_full * (question_tokens + args.new)
            if args.rows is not None:
                rows = args.rows
            elif device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                rows = max(1, min(args.max_rows, int(free * args.memory_fraction / per_row)))
            else:
                rows = 4
            res, tries = None, 0
            while res is None:
                try:
                    res = run([QUESTION] * rows, kv=ctx, max_new_tokens=args.new, backend="auto")
                except torch.cuda.OutOfMemoryError:
                    tries += 1
                    if tries > 3 or rows == 1:
                        raise
                    rows = max(1, int(rows * 0.85))
                    gc.collect()
                    torch.cuda.empty_cache()
            rate = res.decode_steady_tokens_per_second or res.decode_tokens_per_second
            out.write({"method": method, "budget": budget, "context": args.context, "rows": rows,
                       "retries": tries, "backend": res.backend, "cuda_graphs": res.cuda_graphs,
                       "document_bytes_per_row": ctx.nbytes(), "document_bytes_full_per_row": ctx.full_nbytes(),
                       "row_bytes_estimate": per_row, "kv_bytes_held": res.kv_bytes_held,
                       "peak_memory_bytes": res.peak_memory_bytes, "new_tokens": args.new,
                       "decode_steps_per_second": rate, "tokens_per_second": rows * rate,
                       "decode_tokens_per_second_with_setup": rows * res.decode_tokens_per_second,
                       "decode_setup_seconds": res.decode_setup_seconds,
                       "graph_replays": res.decode_graph_replays})
            del ctx, res
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
