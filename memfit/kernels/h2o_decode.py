"""Fused H2O decode step over a fixed-size slot buffer (Triton): attention + accumulated-attention update + eviction.

Static-shape H2O (evict one per step): a layer's keys / values live in a (B, Hkv, C, d) buffer with C = budget + 1
slots, a per-slot fp32 accumulated score `acc` and the token position `pos` of each slot. One step, four launches:
1. split-K attention (the `kivi_attention` kernel over plain slots) that first writes the new token into the slot
   the previous step freed (`slot`, per row and KV head) and stores the row's logits once (B, Hq, C fp32: the only
   time the attention row touches HBM), plus each split's running max / sum;
2. the combine kernel merges the splits into the attention output;
3. a score pass over (row x KV head x chunk of 256 slots): recomputes each query head's softmax max / sum from the
   split partials, sets the new slot's pos = cur_pos and acc = 0, adds the step's probabilities summed over the GQA
   group to `acc` in place (H2O's accumulated attention) and finds the chunk's eviction candidate: the first empty
   slot (slot >= lengths[b]) if any, else the unprotected slot with the smallest score, where the ``recent`` newest
   tokens (pos > cur_pos - recent) are protected;
4. a tiny reduction over the chunks writes the victim (B, Hkv), which receives the next token.
Ties go to the lowest slot index at every level (argmin within a tile, strict `<` across tiles, argmin across
chunks), as `torch.argmin` in the reference does: given the same inputs, kernel and reference evict the same slot.
Scores differ from the reference's only by fp32 rounding (summation order), so two candidates whose scores are
closer than that can still swap (tests/test_kernels.py allows that only on CUDA with random scores).
The buffer never grows or moves: shapes are static and the step is CUDA-graph safe. H2O's rule is the same: keep
the heavy hitters + the recent window, drop the rest (here one token per step, as the cache is always full).

Reference: `memfit.kernels.reference.h2o_decode_ref`.
"""

from __future__ import annotations

import torch

from memfit.kernels.kivi_attention import _as_len, _launch, _slot_index, _zeros, triton_next_pow2

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
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    block_t: int = 64,
    num_splits: int | None = None,
    chunk: int = 256,
    out: torch.Tensor | None = None,
    victim: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: returns (attention output (B, Hq, d), victim slot (B, Hkv) int32); `acc` is updated in place.

    q (B, Hq, d); k, v (B, Hkv, C, d); acc (B, Hkv, C) fp32 and pos (B, Hkv, C) int32, contiguous last dims.
    With k_new, v_new (B, Hkv, d) and `slot` (B, Hkv) int32, the new token is first written into its slot (keys,
    values, pos = cur_pos, acc = 0) inside the kernels. `victim` may be the same tensor as `slot` (the freed slot
    then receives the next token).
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
    append = k_new is not None
    if append:
        sl, s_sb, s_sh = _slot_index(slot, b, hkv, dev)
    else:
        sl, s_sb, s_sh = n, 0, 0
    logits = torch.empty(b, hq, cap, dtype=torch.float32, device=dev)
    out, pml, splits, gp = _launch(
        q, k, v, _zeros(b, dev), n, None, scale, store_logits=True, logits=logits, block_t=block_t,
        num_splits=num_splits, out=out, k_new=k_new, v_new=v_new, append_at=slot if append else None,
    )  # fmt: skip
    if victim is None:
        victim = torch.empty(b, hkv, dtype=torch.int32, device=dev)
    nch = -(-cap // chunk)
    pval = torch.empty(b * hkv * nch, dtype=torch.float32, device=dev)
    pidx = torch.empty(b * hkv * nch, dtype=torch.int32, device=dev)
    K._h2o_score_kernel[(b * hkv, nch)](
        logits, pml, acc, pos, n, cur, sl, pval, pidx, int(recent), cap, splits, chunk,
        logits.stride(0), logits.stride(1), acc.stride(0), acc.stride(1), pos.stride(0), pos.stride(1), s_sb, s_sh,
        HKV=hkv, GQ=g, GP=gp, BLOCK_T=128, SP=max(2, triton_next_pow2(splits)), APPEND=append, num_warps=4,
    )  # fmt: skip
    K._victim_kernel[(b * hkv,)](
        pval, pidx, victim, nch, victim.stride(0), victim.stride(1), HKV=hkv, NCP=max(2, triton_next_pow2(nch)),
        num_warps=1,
    )  # fmt: skip
    return out, victim
