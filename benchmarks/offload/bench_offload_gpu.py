"""GPU measurement of weight streaming (for the lead to run on the GPU machine; one command, < 10 min on an H200).

Llama-3.1-8B config, random bf16 weights, `--weights-memory` = 25 % of the weights:
  1. memfit superpipeline (k=2, k'=1; pinned CPU tier, side-stream copies) — decode tokens/s, prefill time, peak;
  2. accelerate `dispatch_model` with the same GPU budget (`max_memory`), the rest offloaded to CPU (its
     synchronous per-module hooks) — same prompt, same greedy decode (plain HF DynamicCache);
  3. the bandwidth limit: time to copy the streamed bytes host-to-device from pinned memory once (what one decode
     step must move), and the resident model's step time (what compute alone needs).
Then a Mixtral-8x7B-shaped MoE (8 of its 32 layers, random bf16) with 25 % of the expert bytes as cache: pregated
(next-layer router prefetch) vs on-demand expert loading — hit rate and tokens/s.

    python benchmarks/offload/bench_offload_gpu.py --out benchmarks/offload/results_gpu.jsonl
    python benchmarks/offload/bench_offload_gpu.py --tiny      # a CPU smoke run of the same code (tiny configs)

Writes one JSON row per measurement (append) with the machine and versions.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def _init(config: Any, dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    """memfit's random-weight model (`memfit.dummy.random_model`, what `--load-format dummy` loads), drawn on `dev`
    (an 8B model: seconds on a GPU, minutes on the CPU) and returned on the CPU, where both offload paths start."""
    from memfit.dummy import random_model

    model = random_model(config, dtype, dev).to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _hf_decode(model: torch.nn.Module, ids: torch.Tensor, new: int, dev: torch.device) -> dict[str, float]:
    """Greedy decode with transformers' own cache (accelerate's baseline path)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    _peak_reset(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(dev)
        t1 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new - 1):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
    t2 = time.perf_counter()
    return {"prefill_seconds": t1 - t0, "decode_tokens_per_second": (new - 1) / (t2 - t1), "peak_bytes": _peak(dev)}


def _memfit_decode(model: torch.nn.Module, ids: torch.Tensor, new: int, dev: torch.device) -> dict[str, float]:
    from memfit.api import make_cache
    from memfit.engine import generate

    cache = make_cache(model, "full", backend="portable")
    _peak_reset(dev)
    gen = generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=new)
    return {"prefill_seconds": gen.prefill_seconds, "decode_tokens_per_second": gen.decode_tokens_per_second,
            "peak_bytes": _peak(dev)}


def _h2d_seconds(nbytes: int, dev: torch.device, chunk: int = 256 * 2**20) -> float:
    """Time to copy `nbytes` from pinned host memory to the device (chunks of 256 MiB)."""
    if dev.type != "cuda" or nbytes == 0:
        return 0.0
    src = torch.empty(min(chunk, nbytes), dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    left = nbytes
    while left > 0:
        n = min(left, src.numel())
        dst[:n].copy_(src[:n], non_blocking=True)
        left -= n
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def dense(args: argparse.Namespace, dev: torch.device, emit: Any) -> None:
    from accelerate import dispatch_model, infer_auto_device_map

    from memfit.dummy import dummy_config
    from memfit.offload import attach_offload

    if args.tiny:
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = dummy_config("llama-3.1-8b")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    base = _init(config, dtype, dev)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    budget = int(weights * args.fraction)
    emit({"what": "init", "seconds": time.perf_counter() - t0, "weight_bytes": weights, "weights_memory": budget})
    ids = torch.randint(0, int(config.vocab_size), (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)

    # 1. accelerate's device_map offload (synchronous per-module hooks), same budget
    acc = copy.deepcopy(base)
    no_split = [type(acc.model.layers[0]).__name__]
    gpu_key: Any = (dev.index or 0) if dev.type == "cuda" else "cpu"
    if dev.type == "cuda":
        dmap = infer_auto_device_map(acc, max_memory={gpu_key: budget, "cpu": 10 * weights},
                                     no_split_module_classes=no_split)
        acc = dispatch_model(acc, dmap)
        r = _hf_decode(acc, ids, args.new, dev)
        emit({"what": "accelerate_device_map", "device_map_cpu_modules": sum(v == "cpu" for v in dmap.values()),
              **r})
    del acc

    # 2. memfit superpipeline (pinned CPU tier, side stream)
    off = attach_offload(base, budget, dev, "superpipeline")
    r = _memfit_decode(base, ids, args.new, dev)
    rep = off.report()
    emit({"what": "memfit_superpipeline", **r, "offload": rep})

    # 3. the bandwidth limit of one decode step: the streamed bytes over the measured host-to-device bandwidth
    streamed = rep["bytes_cpu_tier"]
    h2d = _h2d_seconds(streamed, dev)
    emit({"what": "h2d_bound", "streamed_bytes": streamed, "seconds_per_token": h2d,
          "tokens_per_second_bound": 1 / h2d if h2d else None,
          "memfit_vs_bound": (1 / h2d) / r["decode_tokens_per_second"] if h2d else None})
    off.close()


def moe(args: argparse.Namespace, dev: torch.device, emit: Any) -> None:
    from transformers import MixtralConfig

    from memfit.adapters.transformers import set_experts_eager
    from memfit.offload import attach_offload

    if args.tiny:
        config = MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                               num_experts_per_tok=2)
    else:  # Mixtral-8x7B's shapes, 8 of its 32 layers
        config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=32768)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = _init(config, dtype, dev)
    set_experts_eager(base)
    ex = base.model.layers[0].mlp.experts
    expert_bytes = (ex.gate_up_proj.numel() + ex.down_proj.numel()) * ex.gate_up_proj.element_size()
    total = sum(p.numel() * p.element_size() for p in base.parameters())
    other = total - expert_bytes * config.num_hidden_layers
    budget = other + int(0.25 * expert_bytes * config.num_hidden_layers)
    ids = torch.randint(0, int(config.vocab_size), (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    for policy in ("pregated", "ondemand"):
        m = copy.deepcopy(base)
        off = attach_offload(m, budget, dev, policy)
        r = _memfit_decode(m, ids, args.new, dev)
        emit({"what": f"moe_{policy}", "weights_memory": budget, "weight_bytes": total, **r, "offload": off.report()})
        off.close()  # frees the expert window (memfit.offload.streamer.WeightStreamer.close)
        del m
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results_gpu.jsonl")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25, help="--weights-memory as a fraction of the weights")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke run of this script)")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--only-moe", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "tiny": args.tiny,
            "context": args.context, "new_tokens": args.new}

    def emit(row: dict[str, Any]) -> None:
        row = {**meta, **row}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    if not args.only_moe:
        dense(args, dev, emit)
    if not args.skip_moe:
        moe(args, dev, emit)


if __name__ == "__main__":
    main()
