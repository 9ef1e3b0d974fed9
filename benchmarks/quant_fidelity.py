"""KV quantization on the default model: compression ratio and next-token fidelity against the full cache.

Data: PG-19 books in ../shared/data/pg19 (natural prose; read, never copied into the project). From each book we take
`--prompt-tokens` tokens from the body (past the Gutenberg header) and the `--continuation` tokens that follow. Every
configuration — the full cache included — prefills the prompt with a memfit cache, then is fed the continuation one
token at a time (teacher forcing, `memfit.adapters.transformers.forward`), so quantization and eviction act exactly as
in generation. Reported per configuration: KV bytes held at the end (`cache.nbytes()`, every tensor: codes, scales,
zeros, residuals, low-rank factors, outliers, lane maps), the compression ratio full / held, top-1 agreement of the
next-token argmax with the full cache (pooled over all positions and prompts), mean KL(full || method), and CPU
decode speed (noisy on a shared machine: compare rows of one run only).

    python benchmarks/quant_fidelity.py                       # 3 books x 2048 + 64 tokens, all configurations
    python benchmarks/quant_fidelity.py --books 1 --only kivi-2,snapkv+kivi-2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19"

# label -> (method spec, budget, params)
CONFIGS: dict[str, tuple[str, float | None, dict[str, Any] | None]] = {
    "full": ("full", None, None),
    "kivi-4": ("kivi", None, {"bits": 4}),
    "kivi-2": ("kivi", None, {"bits": 2}),
    "gear-2 (kivi base)": ("gear", None, None),
    "gear-4 (kcvt base)": ("gear", None, {"bits": 4, "base": "kcvt"}),
    "vidkv (K1.5/V1.58, stp 0.2)": ("vidkv", None, None),
    # ablations: GEAR at KIVI's group size; VidKV's key and value paths one at a time (8-bit = nearly exact)
    "gear-2 G32": ("gear", None, {"group_size": 32}),
    "kivi K2/V8": ("kivi", None, {"key_bits": 2, "value_bits": 8}),
    "vidkv K1.5/V8": ("vidkv", None, {"value_bits": 8, "stp": 0.0}),
    "vidkv K2/V8 (no FFT half)": ("vidkv", None, {"anomalous_ratio": 1.0, "value_bits": 8, "stp": 0.0}),
    "vidkv K8/V1.58 stp 0.2": ("vidkv", None, {"anomalous_ratio": 1.0, "anomalous_bits": 8}),
    "vidkv K8/V1.58 stp 0": ("vidkv", None, {"anomalous_ratio": 1.0, "anomalous_bits": 8, "stp": 0.0}),
    "snapkv 0.25": ("snapkv", 0.25, None),
    "snapkv+kivi-2 0.25": ("snapkv+kivi", 0.25, {"kivi.bits": 2}),
    "h2o+kivi-2 0.25": ("h2o+kivi", 0.25, {"kivi.bits": 2}),
    "streaming+kivi-2 0.25": ("streaming+kivi", 0.25, {"kivi.bits": 2}),
}


def samples(tokenizer: Any, prompt_tokens: int, continuation: int, books: int) -> list[tuple[str, torch.Tensor]]:
    need = prompt_tokens + continuation
    out = []
    for path in sorted(DATA.glob("*.txt"))[:books]:
        text = path.read_text(encoding="utf-8", errors="replace")
        start = len(text) // 3  # well inside the book
        ids = tokenizer(text[start : start + need * 8], add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            out.append((path.stem, torch.tensor(ids[:need])))
    return out


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor, prompt_tokens: int, spec: str, budget: float | None,
        params: dict[str, Any] | None) -> dict[str, Any]:
    """Prefill the prompt, feed the continuation token by token; next-token logits after the prompt and each fed
    token (continuation, V), bytes and timings."""
    cache = make_cache(model, spec, budget, params)
    prompt = ids[None, :prompt_tokens]
    mask = torch.ones_like(prompt)
    t0 = time.perf_counter()
    logits = [forward(model, prompt, mask, cache, logits_to_keep=1)[:, -1].float()]
    t1 = time.perf_counter()
    held_after_prompt = cache.nbytes()
    for i in range(prompt_tokens, ids.numel() - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        logits.append(forward(model, ids[None, i : i + 1], mask, cache, logits_to_keep=1)[:, -1].float())
    t2 = time.perf_counter()
    return {
        "logits": torch.cat(logits),
        "full_bytes": cache.full_nbytes(),
        "held_bytes": cache.nbytes(),
        "held_after_prompt": held_after_prompt,
        "prefill_s": t1 - t0,
        "decode_tok_s": (len(logits) - 1) / (t2 - t1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--books", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated labels (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per configuration (with its provenance)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from memfit.models import load_model

    model, tok = load_model("default")
    data = samples(tok, args.prompt_tokens, args.continuation, args.books)
    labels = [s.strip() for s in args.only.split(",") if s.strip()] or list(CONFIGS)
    refs = {name: run(model, ids, args.prompt_tokens, "full", None, None) for name, ids in data}
    rows = []
    writer = ResultWriter(args.jsonl, "a")  # rows with their provenance; appended, so runs accumulate
    for label in labels:
        spec, budget, params = CONFIGS[label]
        agree = kl = count = 0.0
        full_b = held_b = 0
        speeds, prefills = [], []
        for name, ids in data:
            r = refs[name] if label == "full" else run(model, ids, args.prompt_tokens, spec, budget, params)
            ref = refs[name]["logits"]
            agree += float((r["logits"].argmax(-1) == ref.argmax(-1)).sum())
            kl += float(F.kl_div(r["logits"].log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                 reduction="sum"))
            count += ref.shape[0]
            full_b += r["full_bytes"]
            held_b += r["held_bytes"]
            speeds.append(r["decode_tok_s"])
            prefills.append(r["prefill_s"])
        row = {
            "config": label, "method": spec, "budget": budget, "params": params or {},
            "prompts": len(data), "prompt_tokens": args.prompt_tokens, "continuation": args.continuation,
            "kv_bytes_full": full_b // len(data), "kv_bytes_held": held_b // len(data),
            "compression": full_b / held_b, "top1_agreement": agree / count, "mean_kl": kl / count,
            "prefill_s": sum(prefills) / len(prefills), "decode_tok_s": sum(speeds) / len(speeds),
        }
        rows.append(writer.write(row))
    print(f"\nSmolLM2-135M (fp32, CPU), {len(data)} PG-19 prompts x {args.prompt_tokens} tokens, "
          f"{args.continuation} teacher-forced tokens each\n")
    writer.close()
    print("| config | KV held (MiB) | compression | top-1 agreement | mean KL | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['kv_bytes_held'] / 2**20:.2f} | {r['compression']:.2f}x | "
              f"{100 * r['top1_agreement']:.1f}% | {r['mean_kl']:.4f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
