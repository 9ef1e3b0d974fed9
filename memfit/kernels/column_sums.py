"""The attention each prompt key receives, summed over the prompt's causal queries (H2O's accumulated score at
prefill), in two Triton passes instead of PyTorch's block-by-block softmax.

`memfit.core.scoring.column_sums` materialises fp32 probability blocks of (queries x keys): at a 32K-token prompt
on an H200 that took 13 of H2O's 15 s of prefill (`benchmarks/results/runtime_h200.jsonl`, against 1.4 s for the
full cache). Here, per (row, head):
1. `_lse_kernel`: for each block of queries, the log-sum-exp of its scaled logits over the keys it may see
   (flash-attention's online max and sum, no values);
2. `_colsum_kernel`: for each block of keys, exp(logit - lse) of every query that may see it, summed over queries.
Both recompute q.k with `tl.dot` (fp32 accumulation; fp32 inputs in IEEE precision) and never store a probability.
The queries are the last q of the T keys (query i sits at key index T - q + i), GQA heads read their KV head.
Padding (key or query validity) is not handled here: callers keep the PyTorch path for it.
When the prompt's own attention returned each query's log-sum-exp (`memfit.core.store.attention_with_lse`), the
first pass is skipped. Per layer of Llama-3.1-8B at 32K on an H200 (`benchmarks/column_sums_blocks.py`): the
prompt's flash attention 26.1 ms, the column pass 17.1 ms with 128-query blocks (the default; 19.0 ms with 64),
both passes 31.0 ms.
Reference and tests: `memfit.core.scoring.column_sums`'s PyTorch path (tests/test_column_sums.py, in Triton's
interpreter on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["column_sums", "supported"]


def supported(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    d = queries.shape[-1]
    return (queries.dim() == 4 and keys.dim() == 4 and keys.shape[-1] == d and d >= 16 and d & (d - 1) == 0
            and queries.shape[1] % keys.shape[1] == 0 and queries.shape[2] <= keys.shape[2]
            and queries.dtype == keys.dtype and queries.stride(-1) == 1 and keys.stride(-1) == 1)


@triton.jit
def _rows(X, b, h, offs, valid, s_b, s_h, s_s, D: tl.constexpr):
    """Rows `offs` (masked by `valid`) of head h of row b: a (len(offs), D) tile."""
    d = tl.arange(0, D)
    ptr = X + b.to(tl.int64) * s_b + h * s_h + offs[:, None].to(tl.int64) * s_s + d[None, :]
    return tl.load(ptr, mask=valid[:, None], other=0.0)


@triton.jit
def _logits(q, k, scale, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return tl.dot(q, tl.trans(k)) * scale


@triton.jit
def _lse_kernel(Q, K, LSE, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, H, GROUPS, q_len, t_len, scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid_bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    mvalid = offs_m < q_len
    q = _rows(Q, b, h, offs_m, mvalid, sq_b, sq_h, sq_s, D)
    qpos = offs_m + (t_len - q_len)  # each query's own key index: it sees keys 0..qpos
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    hi = tl.minimum(t_len, (pid_m + 1) * BM + t_len - q_len)
    for start in range(0, hi, BN):
        offs_n = start + tl.arange(0, BN)
        k = _rows(K, b, h // GROUPS, offs_n, offs_n < t_len, sk_b, sk_h, sk_s, D)
        s = _logits(q, k, scale, IEEE)
        s = tl.where((offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] < t_len), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite from the first block on: key 0 is always visible
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, m_i + tl.log(l_i), mask=mvalid)


@triton.jit
def _colsum_kernel(Q, K, LSE, OUT, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, H, GROUPS, q_len, t_len, scale,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid_bh % H
    offs_n = pid_n * BN + tl.arange(0, BN)
    nvalid = offs_n < t_len
    k = _rows(K, b, h // GROUPS, offs_n, nvalid, sk_b, sk_h, sk_s, D)
    off = t_len - q_len
    acc = tl.zeros((BN,), dtype=tl.float32)
    lo = (tl.maximum(pid_n * BN - off, 0) // BM) * BM  # earlier queries see none of these keys
    for start in range(lo, q_len, BM):
        offs_m = start + tl.arange(0, BM)
        mvalid = offs_m < q_len
        q = _rows(Q, b, h, offs_m, mvalid, sq_b, sq_h, sq_s, D)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m, mask=mvalid, other=0.0)
        s = _logits(q, k, scale, IEEE)
        seen = (offs_n[None, :] <= (offs_m + off)[:, None]) & mvalid[:, None] & nvalid[None, :]
        acc += tl.sum(tl.where(seen, tl.exp(s - lse[:, None]), 0.0), axis=0)
    tl.store(OUT + pid_bh.to(tl.int64) * t_len + offs_n, acc, mask=nvalid)


def column_sums(queries: torch.Tensor, keys: torch.Tensor, scaling: float, block_m: int = 128,
                block_n: int = 64, lse: torch.Tensor | None = None, num_warps: int = 4) -> torch.Tensor:
    """(B, H, T) fp32: for each key, its causal attention probability summed over the queries (the last q of the T
    keys). queries (B, H, q, d), keys (B, Hkv, T, d), unit stride in d; `supported()` says which shapes run.
    `lse` (B, H, q): each query's log-sum-exp of its scaled logits, when the caller has it (the first pass is then
    skipped)."""
    b, h, q_len, d = queries.shape
    t_len = keys.shape[2]
    groups = h // keys.shape[1]
    given = lse is not None
    lse = (lse.reshape(b * h, q_len).float().contiguous() if lse is not None
           else torch.empty(b * h, q_len, dtype=torch.float32, device=queries.device))
    out = torch.empty(b, h, t_len, dtype=torch.float32, device=queries.device)
    ieee = queries.dtype == torch.float32
    args = (queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
            h, groups, q_len, t_len, float(scaling))
    consts = dict(D=d, BM=block_m, BN=block_n, IEEE=ieee, num_warps=num_warps)
    if not given:
        _lse_kernel[(b * h, triton.cdiv(q_len, block_m))](queries, keys, lse, *args, **consts)
    _colsum_kernel[(b * h, triton.cdiv(t_len, block_n))](queries, keys, lse, out, *args, **consts)
    return out
