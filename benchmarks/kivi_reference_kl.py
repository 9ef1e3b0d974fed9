"""KIVI-2 on the default model against an independent fake-quantized cache: per-step next-token KL vs the full cache.

For 2 bench fidelity prompts (2048 tokens, seed 0) and 8 teacher-forced tokens, three caches are compared with the
full cache: (1) a plain transformers DynamicCache whose first T - R keys and values (in whole groups of G) are
fake-quantized with KIVI's grouping, written here from the paper; (2) memfit's kivi with `key_residual=sliding`
(the same tokens quantized); (3) memfit's kivi with the official block rule (at T = 2048 = 16 x 128 every key is
quantized). (1) and (2) agreeing says the loss is the quantizer's, not memfit's; (2) vs (3) is the rule's effect.

    python benchmarks/kivi_reference_kl.py --out benchmarks/results/kivi_reference_kl.jsonl

One JSON line per (prompt, cache): the per-step KLs, and for memfit's caches the largest per-step difference from the
fake-quantized reference's KL; each line carries its provenance (machine, versions, commit, command).
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache

from memfit.adapters.transformers import _cache_kwarg, forward
from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.bench.tasks import generate_samples
from memfit.engine import positions_from_mask
from memfit.models import load_model

STEPS, R, G, BITS = 8, 128, 32, 2


def fake_quant(x: torch.Tensor, along_tokens: bool) -> torch.Tensor:
    """Min-max BITS-bit groups of G tokens per channel (keys) or G channels per token (values), dequantized."""
    B, H, T, d = x.shape
    v = x.reshape(B, H, T // G, G, d) if along_tokens else x.reshape(B, H, T, d // G, G)
    dim = 3 if along_tokens else 4
    lo, hi = v.amin(dim, keepdim=True), v.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**BITS - 1)).clamp(min=1e-8)
    return (((v - lo) / scale).round().clamp(0, 2**BITS - 1) * scale + lo).reshape(B, H, T, d)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def dynamic_run(model, ids, cont, quantize: bool) -> list[torch.Tensor]:
    kw = _cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    out = [model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1]]
    if quantize:
        nq = (ids.shape[1] - R) // G * G
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            layer.keys = torch.cat([fake_quant(k[:, :, :nq], True), k[:, :, nq:]], 2)
            layer.values = torch.cat([fake_quant(v[:, :, :nq], False), v[:, :, nq:]], 2)
    for t in range(STEPS - 1):
        out.append(model(input_ids=cont[:, t : t + 1], use_cache=True, **{kw: cache}).logits[:, -1])
    return out


def memfit_run(model, ids, cont, params: dict) -> list[torch.Tensor]:
    cache = make_cache(model, "kivi", None, params)
    mask = torch.ones_like(ids)
    pos = positions_from_mask(mask)
    out = [forward(model, ids, mask, cache, pos)[:, -1]]
    last = pos[:, -1:]
    for t in range(STEPS - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        last = last + 1
        out.append(forward(model, cont[:, t : t + 1], mask, cache, last)[:, -1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    model, tok = load_model("default", progress=False)
    with torch.no_grad(), ResultWriter(args.out) as writer:
        for i, s in enumerate(generate_samples("fidelity", tok, 2048, 2, seed=0)):
            ids, cont = torch.tensor([s.prompt_ids]), torch.tensor([s.continuation_ids[:STEPS]])
            full = dynamic_run(model, ids, cont, quantize=False)
            runs = {
                "fake-quant DynamicCache": dynamic_run(model, ids, cont, quantize=True),
                "memfit kivi sliding": memfit_run(model, ids, cont, {"key_residual": "sliding"}),
                "memfit kivi block": memfit_run(model, ids, cont, {}),
            }
            kls = {name: [kl(a, b) for a, b in zip(full, logits, strict=True)] for name, logits in runs.items()}
            reference = kls["fake-quant DynamicCache"]
            for name, per_step in kls.items():
                row = {"prompt": i, "prompt_tokens": int(ids.shape[1]), "steps": STEPS, "cache": name,
                       "kl_per_step": per_step, "kl_first": per_step[0]}
                if name != "fake-quant DynamicCache":
                    row["max_abs_kl_diff_vs_fake_quant"] = max(abs(a - b) for a, b in zip(per_step, reference, strict=True))
                writer.write(row)


if __name__ == "__main__":
    main()
