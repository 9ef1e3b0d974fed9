"""Peak GPU memory of a left-padded batched prefill: one (B, H, T, T) attention mask (before) vs row-by-row fused
causal attention over each row's real tokens (memfit.core.store._left_padded_prefill, after).

Random bf16 weights (memory and time do not depend on them), configs of SmolLM2-135M and Llama-3.1-8B, a batch of
4 prompts of 8192/7168/6144/5120 tokens, snapkv at budget 0.25 (the prefill attends over the whole prompt before it
evicts). Both variants run in one process on the same inputs; prints one JSON line per (model, variant).

    python benchmarks/padded_prefill_peak.py --out benchmarks/results/padded_prefill_peak_h200.jsonl

Each line carries the run's provenance (machine, versions, commit, command).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import memfit.core.store as core_cache  # the module whose KVLayer.attend looks up dense_attention
from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.engine import generate, pad_left

CONFIGS = {
    "SmolLM2-135M (random)": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
    "Llama-3.1-8B (random)": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                  rope_theta=500000.0),
}
LENGTHS = (8192, 7168, 6144, 5120)


def masked_attention(queries, keys, values, valid, scaling):
    """The previous dense_attention: a causal mask with the validity of every slot, expanded to the query heads."""
    b, h, q_len, _ = queries.shape
    hkv, t_len = keys.shape[1], keys.shape[2]
    groups = h // hkv
    if valid is None and q_len == 1:
        return F.scaled_dot_product_attention(queries, keys, values, scale=scaling, enable_gqa=groups > 1)
    if valid is None and q_len == t_len:
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scaling,
                                              enable_gqa=groups > 1)
    qi = torch.arange(q_len, device=keys.device)[:, None] + (t_len - q_len)
    kj = torch.arange(t_len, device=keys.device)[None, :]
    mask = (kj <= qi)[None, None]
    if valid is not None:
        mask = mask & (valid.repeat_interleave(groups, dim=1) if groups > 1 else valid)[:, :, None, :]
    mask = mask | (kj == qi)[None, None]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    with ResultWriter(args.out) as out:
        measure(out)


def measure(out: ResultWriter) -> None:
    current = core_cache.dense_attention
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval().to("cuda", torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        ids, mask = pad_left([torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS])
        ids, mask = ids.cuda(), mask.cuda()
        first = {}
        for variant, fn in (("before: one masked SDPA", masked_attention), ("after: row-by-row causal", current)):
            core_cache.dense_attention = fn
            for _ in range(2):  # the first run warms up kernels and the allocator
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with torch.no_grad():
                    gen = generate(model, ids, mask, make_cache(model, "snapkv", 0.25), 1, [])
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() - base
            first[variant] = gen.first_logits.float()
            out.write({"model": name, "variant": variant, "lengths": LENGTHS, "method": "snapkv@0.25",
                       "prefill_peak_above_weights_gib": round(peak / 2**30, 3),
                       "prefill_seconds": round(seconds, 3), "device": torch.cuda.get_device_name()})
        core_cache.dense_attention = current
        a, b = first.values()
        out.write({"model": name, "max_abs_logit_diff": float((a - b).abs().max()),
                   "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())})
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
