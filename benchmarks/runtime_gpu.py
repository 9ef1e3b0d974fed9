"""Decode speed, prefill time and peak memory of the product path (`memfit.run`, what `memfit run` calls) on a GPU,
fast and portable backends side by side, against transformers' own DynamicCache loop in the same process.

Drives the product only: the model comes from `memfit.models.load_model(..., load_format="dummy")` (random weights
with a real architecture's config), every memfit row is one `memfit.engine.run(...)` call with `context=N` (the same
call `memfit run --model llama-3.1-8b --load-format dummy --context N --json` makes). The transformers row is the
tool a user would pick instead: plain forwards with `DynamicCache`.

Roofline per decode step: (bytes a step reads + KV bytes held) / measured device-to-device copy bandwidth, where a
step reads every weight except the input embedding table (one row of it; a table tied to the lm_head is read in
full and counted). Rows before 2026-11-30 (result files without `read_bytes_per_step`) counted the whole table,
which overstated their roofline fraction by about 6 % for Llama-3.1-8B.

    python benchmarks/runtime_gpu.py --model llama-3.1-8b --context 32768 --new 128 \
        --methods full,snapkv,h2o,streaming,snapkv+kivi,kivi --budget 0.25 --backends fast,portable \
        --out benchmarks/results/runtime_h200.jsonl

KIVI on the fast backend (packed codes + ring in fixed buffers, memfit.core.static_quant_store), beside portable:

    python benchmarks/runtime_gpu.py --model llama-3.1-8b --context 32768 --new 256 --methods kivi,snapkv+kivi \
        --budget 0.25 --backends fast,portable --no-transformers --out benchmarks/results/runtime_kivi_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time

import torch

from memfit.backend import MIN_GRAPH_STEPS
from memfit.bench.provenance import ResultWriter
from memfit.engine import positions_from_mask, run, synthetic_prompt
from memfit.models import load_model


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted once each, i.e. 2 x nbytes moved)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * reps / (time.perf_counter() - t)


@torch.no_grad()
def transformers_baseline(model, tok, context: int, new: int) -> dict:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    resident = torch.cuda.memory_allocated(device)
    ids, mask = synthetic_prompt(tok, context)
    ids, mask = ids.to(device), mask.to(device)
    model.set_attn_implementation("sdpa")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    torch.cuda.synchronize(device)
    prefill = time.perf_counter() - t0
    pos = positions_from_mask(mask)[:, -1:]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        tok_ = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok_)], dim=1)
        pos = pos + 1
        logits = model(input_ids=tok_, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       logits_to_keep=1).logits[:, -1]
    torch.cuda.synchronize(device)
    decode = time.perf_counter() - t1
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"prefill_seconds": prefill, "decode_ms_per_token": 1000 * decode / (new - 1),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device), "kv_bytes_held": kv,
            "peak_above_resident_bytes": torch.cuda.max_memory_allocated(device) - resident}


def kvpress_row(model, tok, args, read_bytes: int, bandwidth: float) -> dict:
    """kvpress on the same config and prompt, in its own interpreter (it pins transformers < 5.3): see
    `kvpress_speed_row.py`. The roofline uses the bytes its cache holds after the press."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    ids, _ = synthetic_prompt(tok, args.context)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.to_json_file(Path(tmp) / "config.json")
        torch.save(ids.cpu(), Path(tmp) / "ids.pt")
        env = {**os.environ, "PYTHONPATH": args.kvpress_path}
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("kvpress_speed_row.py")),
                               "--config", str(Path(tmp) / "config.json"), "--ids", str(Path(tmp) / "ids.pt"),
                               "--new", str(args.new), "--press", args.kvpress_press,
                               "--ratio", str(args.kvpress_ratio)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"kind": "kvpress", "error": "\n".join(done.stderr.strip().splitlines()[-8:]) or f"exit {done.returncode}"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    roof = 1000 * (read_bytes + row["kv_bytes_held"]) / bandwidth
    return {**row, "roofline_ms": roof, "roofline_fraction": roof / row["decode_ms_per_token"]}


def step_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: every parameter (tied ones once) except the input embedding table, of
    which it reads one row per sequence (counted when the table is tied to the lm_head, which reads all of it)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return sum(seen.values()) - (0 if tied else embed.numel() * embed.element_size())


def _release() -> None:
    """Free what the previous row left (its cache, a captured graph's pool) so each row's peak is its own."""
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--methods", default="full,snapkv,h2o,streaming,snapkv+kivi,kivi")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--backends", default="fast,portable")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (memfit rows; transformers: 1)")
    ap.add_argument("--kvpress-path", default=None,
                    help="a folder holding kvpress and its pinned transformers: adds a kvpress row (own process)")
    ap.add_argument("--kvpress-press", default="SnapKVPress")
    ap.add_argument("--kvpress-ratio", type=float, default=0.75, help="kvpress compression_ratio (fraction removed)")
    ap.add_argument("--repeats", type=int, default=1, help="run each memfit row this many times in the process (a "
                    "second run's set-up shows what is left once its kernels are compiled for this shape)")
    ap.add_argument("--out", default="benchmarks/results/runtime_gpu.jsonl")
    args = ap.parse_args()

    device = torch.device("cuda")
    model, tok = load_model(args.model, device="cuda", dtype="bfloat16", load_format="dummy", progress=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_bytes = step_weight_bytes(model)
    bw = copy_bandwidth(device)
    with ResultWriter(args.out) as out:
        out.write({"kind": "machine", "model": args.model, "weight_bytes": weight_bytes,
                   "read_bytes_per_step": read_bytes,
                   "copy_bandwidth_bytes_per_s": bw, "device": torch.cuda.get_device_name(device)})
        # Warm-up: Triton compiles each method's kernels, the graph pools get their first blocks. Enough new
        # tokens that the decode is recorded in a CUDA graph as in the measured rows (with fewer the stores take
        # their eager attention and the graph's kernels would compile inside the first measured row's set-up).
        for backend in args.backends.split(","):
            for method in dict.fromkeys(["snapkv", *args.methods.split(",")]):
                warm_budget = None if method in ("full", "kivi", "gear", "vidkv") else 0.25
                run([""] * args.batch, model=(model, tok), method=method, budget=warm_budget, backend=backend,
                    context=1024, max_new_tokens=MIN_GRAPH_STEPS + 4, prefill_chunk=args.prefill_chunk)
        if not args.no_transformers:
            row = transformers_baseline(model, tok, args.context, args.new)
            roof = 1000 * (read_bytes + row["kv_bytes_held"]) / bw
            out.write({"kind": "transformers", "method": "full (DynamicCache)", "context": args.context,
                       "new_tokens": args.new, **row, "roofline_ms": roof,
                       "roofline_fraction": roof / row["decode_ms_per_token"]})
            _release()
        if args.kvpress_path:
            out.write(kvpress_row(model, tok, args, read_bytes, bw))
            _release()
        for method in args.methods.split(","):
            keeps_all = method in ("full", "kivi", "gear", "vidkv")
            budget = None if keeps_all else args.budget
            for backend, repeat in itertools.product(args.backends.split(","), range(args.repeats)):
                resident = torch.cuda.memory_allocated(device)  # weights (+ nothing left from earlier rows)
                res = run([""] * args.batch, model=(model, tok), method=method, budget=budget, backend=backend,
                          context=args.context, max_new_tokens=args.new, prefill_chunk=args.prefill_chunk)
                ms = 1000 / res.decode_tokens_per_second if res.decode_tokens_per_second else float("nan")
                # after the first eager step and the graph's recording (None without a graph)
                rate = res.decode_steady_tokens_per_second
                steady = 1000 / rate if rate else None
                roof = 1000 * (read_bytes + res.kv_bytes_held) / bw
                out.write({"kind": "memfit", "method": method, "budget": res.budget, "backend_requested": backend,
                           "repeat": repeat,
                           "backend": res.backend, "backend_reason": res.backend_reason,
                           "cuda_graphs": res.cuda_graphs, "decode_graph_replays": res.decode_graph_replays,
                           "context": res.prompt_tokens, "new_tokens": args.new, "batch": args.batch,
                           "prefill_seconds": res.prefill_seconds, "decode_ms_per_token": ms,
                           "kv_bytes_full": res.kv_bytes_full, "kv_bytes_held": res.kv_bytes_held,
                           "peak_memory_bytes": res.peak_memory_bytes, "resident_bytes_before": resident,
                           "peak_above_resident_bytes": res.peak_memory_bytes - resident,
                           "prefill_chunk": args.prefill_chunk, "roofline_ms": roof, "roofline_fraction": roof / ms,
                           "fused_ops": res.fused_ops, "decode_setup_seconds": res.decode_setup_seconds,
                           "decode_capture_seconds": res.decode_capture_seconds,
                           "steady_ms_per_token": steady, "steady_roofline_fraction": steady and roof / steady})
                _release()


if __name__ == "__main__":
    main()
