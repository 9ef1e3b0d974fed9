"""H2O's prompt scoring kernels (`memfit.kernels.column_sums`) per launch shape, beside the prompt's own flash
attention on the same tensors: where the extra prefill time of H2O goes (issue #10's target: H2O prefill <= 1.5x the
full cache's).

One layer of Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head dim 128) at a 32K-token prompt, bf16,
random values; each time is the median of `triton.testing.do_bench`. `flash_ms`: the causal attention the prefill
runs anyway (with its log-sum-exp, as `memfit.core.store.attention_with_lse` calls it); `colsum_ms`: the column pass
alone (log-sum-exp given); `both_ms`: both passes. Times x 32 layers = the prefill's share.

    python benchmarks/column_sums_blocks.py --out benchmarks/results/column_sums_blocks_h200.jsonl
"""

from __future__ import annotations

import argparse
import itertools

import torch

from memfit.bench.provenance import ResultWriter


def main() -> None:
    import triton.testing

    from memfit.core.store import attention_with_lse
    from memfit.kernels.column_sums import column_sums

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--out", default="benchmarks/results/column_sums_blocks.jsonl")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, dev = args.context, "cuda"
    q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
    scale = 128 ** -0.5
    got = attention_with_lse(q, k, v, scale)
    assert got is not None, "flash attention with log-sum-exp did not run here"
    lse = got[1]
    flash_ms = triton.testing.do_bench(lambda: attention_with_lse(q, k, v, scale), return_mode="median")
    ref = column_sums(q, k, scale)
    with ResultWriter(args.out) as out:
        out.write({"kind": "flash", "context": n, "flash_ms": flash_ms, "prefill_share_s": 32 * flash_ms / 1000})
        for bm, bn, w in itertools.product(*[[int(x) for x in a.split(",")] for a in (args.blocks, args.blocks,
                                                                                      args.warps)]):
            try:
                sums = column_sums(q, k, scale, block_m=bm, block_n=bn, lse=lse, num_warps=w)
                err = ((sums - ref).abs().max() / ref.abs().max()).item()
                colsum = triton.testing.do_bench(
                    lambda bm=bm, bn=bn, w=w: column_sums(q, k, scale, block_m=bm, block_n=bn, lse=lse, num_warps=w),
                    return_mode="median")
                both = triton.testing.do_bench(
                    lambda bm=bm, bn=bn, w=w: column_sums(q, k, scale, block_m=bm, block_n=bn, num_warps=w),
                    return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a launch shape that does not compile is a row, not a crash
                out.write({"kind": "blocks", "block_m": bm, "block_n": bn, "num_warps": w,
                           "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            out.write({"kind": "blocks", "context": n, "block_m": bm, "block_n": bn, "num_warps": w,
                       "colsum_ms": colsum, "both_ms": both, "rel_err_vs_default": err,
                       "prefill_share_s": 32 * colsum / 1000})


if __name__ == "__main__":
    main()
