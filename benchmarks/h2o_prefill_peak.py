"""Peak GPU memory and time of H2O's prefill scoring (accumulated attention over the whole prompt), before/after
sizing its query blocks by bytes and spreading the keys over the query heads once per call.

Random bf16 weights (memory and time do not depend on them), Llama-3.1-8B config, batch 1, 32K tokens, h2o at
budget 0.25; both variants in one process. Prints one JSON line per variant.

    python benchmarks/h2o_prefill_peak.py --out benchmarks/results/h2o_prefill_peak_h200.jsonl

Each line carries the run's provenance (machine, versions, commit, command).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memfit.core.scoring as scoring
import memfit.methods.h2o as h2o_module
from memfit.api import make_cache
from memfit.bench.provenance import ResultWriter
from memfit.engine import generate

CONFIG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
TOKENS = 32768


def previous_column_sums(queries, keys, scaling, key_valid=None, query_valid=None, chunk=256):
    """The previous version: fixed 256-query blocks, keys converted and expanded inside every block."""
    b, h, q_len, _ = queries.shape
    t_len = keys.shape[2]
    total = torch.zeros(b, h, t_len, dtype=torch.float32, device=queries.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        visible = t_len - q_len + stop
        probs = scoring.attention_probs(queries[:, :, start:stop], keys[:, :, :visible], scaling,
                                        None if key_valid is None else key_valid[:, :, :visible])
        if query_valid is not None:
            probs = probs * query_valid[:, None, start:stop, None].to(probs.dtype)
        total[:, :, :visible] += probs.sum(dim=2)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    with ResultWriter(args.out) as out:
        measure(out)


def measure(out: ResultWriter) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).eval().to("cuda", torch.bfloat16)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    current = h2o_module.column_sums
    for variant, fn in (("before: 256-query blocks", previous_column_sums), ("after: byte-sized blocks", current)):
        h2o_module.column_sums = fn
        for _ in range(2):  # the first run warms up kernels and the allocator
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = generate(model, ids, mask, make_cache(model, "h2o", 0.25), 1, [])
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base
        out.write({"model": "Llama-3.1-8B (random)", "variant": variant, "tokens": TOKENS, "method": "h2o@0.25",
                   "prefill_peak_above_weights_gib": round(peak / 2**30, 3), "prefill_seconds": round(seconds, 3),
                   "first_token": int(gen.tokens[0][0]) if gen.tokens[0] else None,
                   "device": torch.cuda.get_device_name()})
    h2o_module.column_sums = current


if __name__ == "__main__":
    main()
