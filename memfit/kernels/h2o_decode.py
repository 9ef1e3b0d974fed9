"""Fused H2O decode step over a fixed-size slot buffer (Triton): attention + accumulated-attention update + eviction.

Static-shape H2O (evict one per step): a layer's keys / values live in a (B, Hkv, C, d) buffer with C = budget + 1
slots, a per-slot fp32 accumulated score `acc` and the token position `pos` of each slot. Each decode step:
1. the caller writes the new token into the slot freed by the previous step (``victim``), with pos = its position
   and acc = 0;
2. `h2o_decode` runs one pass of split-K attention that also stores the row's logits once (B, Hq, C fp32 — the
   only time the attention row touches HBM), merges the splits into the output and each head's softmax max / sum;
3. a per-(row, KV head) pass turns the stored logits into probabilities, adds them, summed over the GQA group, to
   `acc` in place, and picks the victim: the first empty slot (slot >= lengths[b]) if any, else the unprotected slot
   with the smallest accumulated score; the ``recent`` newest tokens (pos > cur_pos - recent) are protected.
The victim's slot receives the next token, so the buffer never grows or moves: the shape is static and the whole
step is CUDA-graph safe. H2O's official rule is the same: keep the heavy hitters + the recent window, drop the rest.

Reference: `memfit.kernels.reference.h2o_decode_ref`.
"""

from __future__ import annotations

import torch

from memfit.kernels.kivi_attention import _as_len, _launch, _zeros, triton_next_pow2

__all__ = ["h2o_decode"]


def h2o_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | int,
    acc: torch.Tensor,
    pos: torch.Tensor,
    cur_pos: torch.Tensor | int,
    recent: int,
    *,
    scale: float,
    block_t: int = 64,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    victim: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: returns (attention output (B, Hq, d), victim slot (B, Hkv) int32); `acc` is updated in place.

    q (B, Hq, d); k, v (B, Hkv, C, d); acc (B, Hkv, C) fp32 and pos (B, Hkv, C) int32, contiguous.
    """
    from memfit.kernels import _decode_kernels as K

    b, hq, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    g = hq // hkv
    if acc.dtype != torch.float32 or acc.shape != (b, hkv, cap) or acc.stride(-1) != 1:
        raise ValueError(f"acc must be float32 (B, Hkv, C) = {(b, hkv, cap)} with a contiguous last dim")
    if pos.dtype != torch.int32 or pos.shape != (b, hkv, cap) or pos.stride(-1) != 1:
        raise ValueError(f"pos must be int32 (B, Hkv, C) = {(b, hkv, cap)} with a contiguous last dim")
    if not 0 <= recent < cap:
        raise ValueError(f"recent={recent} must be in [0, C={cap}) so that some slot can be evicted")
    dev = q.device
    n = _as_len(lengths, b, dev)
    cur = _as_len(cur_pos, b, dev)
    logits = torch.empty(b, hq, cap, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, 2, dtype=torch.float32, device=dev)
    zero = _zeros(b, dev)
    out = _launch(q, k, v, zero, n, None, scale, store_logits=True, logits=logits, lse=lse, block_t=block_t,
                  num_splits=num_splits, out=out)
    if victim is None:
        victim = torch.empty(b, hkv, dtype=torch.int32, device=dev)
    gp = max(16, triton_next_pow2(g))
    K._h2o_score_kernel[(b * hkv,)](
        logits, lse, acc, pos, n, cur, victim, int(recent), cap,
        logits.stride(0), logits.stride(1), acc.stride(0), acc.stride(1), pos.stride(0), pos.stride(1),
        HKV=hkv, GQ=g, GP=gp, BLOCK_T=128, num_warps=4,
    )
    return out, victim
