"""Issue #11: what live tensors does `memfit serve`'s scheduler hold beyond its stores and the weights?

Drives `memfit.serve.scheduler.Scheduler` directly (no HTTP) on a small random Llama (8 KV heads, 32 query heads,
hidden 512, 4 layers; `--load-format dummy` from a config.json), submits `--requests` prompts of 1-2K tokens at
once, and after every tick counts the bytes of every live torch tensor the interpreter still tracks
(gc.get_objects(), deduplicated by storage) -- garbage that only the cyclic collector would free counts, as it does
on the GPU until a full collection happens to run. Writes one JSONL row per tick: live bytes, the stores'
nbytes(), the weights, and the rest ("other").

  OMP_NUM_THREADS=1 python benchmarks/serve/live_bytes.py --label after --out benchmarks/results/serve_live_bytes_after.jsonl
  # the code before the fix, from a commit's tree: git archive a3a198b memfit | tar -x -C /tmp/orig
  PYTHONPATH=/tmp/orig OMP_NUM_THREADS=1 python benchmarks/serve/live_bytes.py --label before:a3a198b \
      --out benchmarks/results/serve_live_bytes_before.jsonl
  # on a GPU (bf16, the fast backend's stores; rows add torch.cuda.memory_allocated/reserved):
  python benchmarks/serve/live_bytes.py --device cuda --dtype bfloat16 --requests 64 --rounds 3 --max-tokens 64 \
      --label after --out benchmarks/results/serve_live_bytes_after_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from memfit.core.budget import Budget
from memfit.models import load_model
from memfit.serve.scheduler import Request, Scheduler

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 1024,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
}


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a tensor the gc tracks (reachable or uncollected garbage)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--method", default="full")
    p.add_argument("--rounds", type=int, default=2, help="submit --requests this many times, one round after another")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA each row adds torch.cuda.memory_allocated)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-min", type=int, default=1024)
    p.add_argument("--prompt-max", type=int, default=2048)
    p.add_argument("--label", default="", help="what code ran (e.g. a commit), copied into the summary row")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(CONFIG))
        model, _ = load_model(str(cfg), load_format="dummy", dtype=args.dtype, device=args.device)
    sched = Scheduler(model, kv_memory=1 << 40, max_batch=512, prefill_chunk=args.prefill_chunk)
    rng = random.Random(0)
    rows, tick = [], 0
    cuda = torch.device(args.device).type == "cuda"
    t0 = time.time()
    with torch.inference_mode():
        base = live_tensor_bytes()
        for rnd in range(args.rounds):
            done: list[str] = []
            for _ in range(args.requests):
                n = rng.randint(args.prompt_min, args.prompt_max)
                sched.submit(Request(prompt_ids=[rng.randrange(CONFIG["vocab_size"]) for _ in range(n)],
                                     max_tokens=args.max_tokens, method=args.method, budget=Budget.parse(None),
                                     params={}, sink=lambda ev, d=done: d.append(ev[0]) if ev[0] != "tokens" else None))
            while sched.running or sched.waiting or sched._inbox:
                sched.tick()
                tick += 1
                stores = sum(r.cache.nbytes() for r in sched.running if r.cache is not None)
                live = live_tensor_bytes()
                row = {"round": rnd, "tick": tick, "running": len(sched.running), "finished": len(done),
                       "live_bytes": live, "weights_and_buffers_at_start": base, "store_bytes": stores,
                       "other_bytes": live - base - stores, "gc_counts": list(gc.get_count())}
                if cuda:  # what the device holds: the same question asked of the allocator
                    row["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
                    row["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
                rows.append(row)
    summary = {"summary": True, "method": args.method, "requests_per_round": args.requests, "rounds": args.rounds,
               "ticks": tick, "max_other_bytes": max(r["other_bytes"] for r in rows),
               "other_bytes_at_end": rows[-1]["other_bytes"], "store_bytes_peak": max(r["store_bytes"] for r in rows),
               "device": args.device, "dtype": args.dtype,
               "seconds": round(time.time() - t0, 1), "label": args.label, "torch": torch.__version__,
               "machine": torch.cuda.get_device_name() if cuda else "2-core CPU box (shared)"}
    if cuda:
        summary["cuda_allocated_bytes_at_end"] = rows[-1]["cuda_allocated_bytes"]
        summary["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for r in [*rows, summary]:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
