"""Attention statistics for eviction policies, computed from cached keys in fp32 (no eager attention needed).

The model's own attention output always comes from SDPA; methods that need attention *probabilities* call the
functions here with the (post-RoPE) queries the attention layer just used and the keys the cache holds.
Shapes: queries (B, H, q, d); keys (B, Hkv, T, d); key validity (B, Hkv, T) bool or None; GQA group g = H // Hkv.
Never materialises more than (B, H, chunk, T) probabilities at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, H, ...) by repeating each KV head over its query group (transient, never stored)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """fp32 logits (B, H, q, T) of `queries` against `keys`, -inf where masked.

    With `causal`, the q queries are taken to be the *last* q tokens of the T keys (query i sits at key index
    T - q + i), as after a prefill or decode step that appended them.
    """
    groups = queries.shape[1] // keys.shape[1]
    q32 = queries.float()
    k32 = _expand_heads(keys.float(), groups)
    logits = torch.matmul(q32, k32.transpose(-1, -2)) * scaling
    q_len, t_len = logits.shape[-2], logits.shape[-1]
    allowed = None
    if key_valid is not None:
        allowed = _expand_heads(key_valid, groups)[:, :, None, :]
    if causal and q_len > 1:
        qi = torch.arange(q_len, device=logits.device)[:, None] + (t_len - q_len)
        kj = torch.arange(t_len, device=logits.device)[None, :]
        tri = kj <= qi
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """fp32 softmax probabilities (B, H, q, T); rows with no visible key are all zero (not NaN)."""
    logits = attention_logits(queries, keys, scaling, key_valid, causal)
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def reduce_groups(scores: torch.Tensor, num_kv_heads: int, reduce: str = "mean") -> torch.Tensor:
    """Reduce a per-query-head score (B, H, ...) to one per KV head (B, Hkv, ...) over each GQA group."""
    b, h = scores.shape[:2]
    grouped = scores.reshape(b, num_kv_heads, h // num_kv_heads, *scores.shape[2:])
    if reduce == "mean":
        return grouped.mean(dim=2)
    if reduce == "max":
        return grouped.amax(dim=2)
    if reduce == "sum":
        return grouped.sum(dim=2)
    raise ValueError(f"unknown group reduction {reduce!r}: use mean, max or sum")


def column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    chunk: int | None = None,
    block_bytes: int = 256 * 2**20,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key received, summed over the (causal) queries: (B, H, T) fp32.

    The q queries are the last q of the T keys. Computed block-wise over query chunks so memory stays
    O(chunk x T) — the accumulated-attention score of H2O / Scissorhands / Keyformer at prefill. The chunk is sized
    so one (B, H, chunk, T) fp32 block stays near `block_bytes` (16 to 256 queries), unless `chunk` is given; the
    keys are converted to fp32 and spread over the query heads once, not per chunk.
    `query_valid` (B, q) drops padding queries from the sum. On CUDA without padding the two-pass Triton kernel of
    `memfit.kernels.column_sums` computes the same sums; given each query's log-sum-exp `lse` (B, H, q) (from the
    prompt's own attention kernel), it runs only its second pass.
    """
    if (queries.is_cuda and chunk is None and _column_kernel_ok(queries, keys)
            and (key_valid is None or bool(key_valid.all())) and (query_valid is None or bool(query_valid.all()))):
        from memfit.kernels.column_sums import column_sums as fused_column_sums

        return fused_column_sums(queries, keys, scaling, lse=lse)  # Triton passes, no probability block stored
    b, h, q_len, _ = queries.shape
    t_len = keys.shape[2]
    groups = h // keys.shape[1]
    if chunk is None:
        chunk = int(min(256, max(16, block_bytes // max(1, b * h * t_len * 4))))
    k32 = _expand_heads(keys.float(), groups)
    kvalid = None if key_valid is None else _expand_heads(key_valid, groups)
    total = torch.zeros(b, h, t_len, dtype=torch.float32, device=queries.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        # Queries start..stop sit at key indices offset+start..offset+stop-1; slice keys so the causal helper's
        # "queries are the last rows" convention holds, then pad the columns back.
        visible = t_len - q_len + stop
        probs = attention_probs(
            queries[:, :, start:stop],
            k32[:, :, :visible],
            scaling,
            None if kvalid is None else kvalid[:, :, :visible],
        )
        if query_valid is not None:
            probs = probs * query_valid[:, None, start:stop, None].to(probs.dtype)
        total[:, :, :visible] += probs.sum(dim=2)
    return total


def _column_kernel_ok(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """The Triton column sums (memfit.kernels.column_sums) serve this unpadded CUDA call."""
    from memfit import kernels

    if not kernels.available():
        return False
    from memfit.kernels.column_sums import supported

    return supported(queries, keys)


def pool_scores(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Smooth scores along the token axis (SnapKV's clustering): 1-D pooling, stride 1, same length."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if kind == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    elif kind == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {kind!r}: use avg or max")
    return pooled[..., : shape[-1]].reshape(shape)
