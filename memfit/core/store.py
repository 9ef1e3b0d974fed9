"""The dense KV store: per-layer tensors that physically shrink when tokens are evicted.

`KVLayer` holds one layer's keys and values as (B, Hkv, T, d) tensors, plus:
- `valid` (B, Hkv, T) bool or None: a slot is invalid when it holds padding or a placeholder. Rows of a batch keep
  the same number of slots so tensors stay rectangular; a row that may keep fewer tokens than the longest row fills
  the difference with invalid placeholders (only in heterogeneous batches). None means every slot is valid.
- `extras`: per-token state a policy needs (e.g. H2O's accumulated attention), gathered together with K/V.
Kept tokens stay in original order and keep their original (post-RoPE) positions. The other stores (quantized,
ragged, static) subclass it. A store holds and applies; it never decides what to keep (see memfit.core.contract).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from memfit.core.contract import StepInfo
from memfit.errors import ConfigError


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVLayer:
    """One layer's dense KV store (see module docstring)."""

    def __init__(self, index: int = 0) -> None:
        self.index = index  # layer number in the model
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}
        self.seen = 0  # logical tokens ever appended (padding included), i.e. what a full cache would hold
        # A sliding-window attention layer (Gemma 3's local layers): each query sees only the last `window` tokens,
        # so the store keeps the newest window - 1 and the method does not act here. None = global attention.
        self.window: int | None = None

    # -- shape helpers -------------------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def valid_mask(self) -> torch.Tensor:
        """(B, Hkv, T) bool, materialised."""
        assert self.keys is not None
        if self.valid is not None:
            return self.valid
        b, h, t, _ = self.keys.shape
        return torch.ones(b, h, t, dtype=torch.bool, device=self.keys.device)

    def held_per_row(self) -> torch.Tensor:
        """Valid tokens held per (row, KV head): (B, Hkv) long."""
        return self.valid_mask().sum(-1)

    # -- storage -------------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Append q new tokens (B, Hkv, q, d); `new_valid` is (B, q) or None (all valid)."""
        b, h, q, _ = keys.shape
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        self._append_state(new_valid, b, h, q)

    def _append_state(self, new_valid: torch.Tensor | None, b: int, h: int, q: int) -> None:
        """Validity and per-token policy state for the q tokens the slots just received (shared by the stores)."""
        if new_valid is not None and not bool(new_valid.all()):
            step_valid = new_valid[:, None, :].expand(b, h, q)
            self.valid = torch.cat([self.valid_mask()[:, :, : self.num_slots - q], step_valid], dim=2)
        elif self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, q)], dim=2)
        for name, state in self.extras.items():
            pad = state.new_zeros(*state.shape[:2], q, *state.shape[3:])
            self.extras[name] = torch.cat([state, pad], dim=2)
        self.seen += q

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep only slots `indices` (B, Hkv, K), in that order; the rest is freed. `valid` (B, Hkv, K) or None."""
        assert self.keys is not None and self.values is not None
        d = self.keys.shape[-1]
        idx = indices.unsqueeze(-1).expand(*indices.shape, d)
        self.keys = self.keys.gather(2, idx).contiguous()
        self.values = self.values.gather(2, idx).contiguous()
        self._keep_state(indices, valid)

    def _keep_state(self, indices: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Validity and per-token policy state of the kept slots `indices` (shared by the stores)."""
        old_valid = None if self.valid is None else self.valid.gather(2, indices)
        if valid is not None:
            old_valid = valid if old_valid is None else old_valid & valid
        self.valid = None if old_valid is None or bool(old_valid.all()) else old_valid.contiguous()
        for name, state in self.extras.items():
            sidx = indices.reshape(*indices.shape, *([1] * (state.dim() - 3))).expand(
                *indices.shape, *state.shape[3:]
            )
            self.extras[name] = state.gather(2, sidx).contiguous()

    def select_batch(self, rows: torch.Tensor) -> None:
        """Reorder/select batch rows (beam search support)."""
        if self.keys is None:
            return
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, rows)
        self.extras = {k: v.index_select(0, rows) for k, v in self.extras.items()}

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        """SDPA of `queries` (B, H, q, d) — the last q appended tokens — over the held keys: (B, H, q, d).
        `window`: each query sees only keys less than `window` slots behind it (sliding-window layers)."""
        assert self.keys is not None and self.values is not None
        return dense_attention(queries, self.keys, self.values, self.valid, scaling, window)

    def trim_to_window(self) -> None:
        """Sliding-window layers: free everything but the newest window - 1 slots (all a later query can see)."""
        assert self.window is not None and self.keys is not None
        keep = self.window - 1
        if self.num_slots <= keep:
            return
        b, h, t, _ = self.keys.shape
        idx = torch.arange(t - keep, t, device=self.keys.device).expand(b, h, keep)
        self.keep(idx)

    def finalize_step(self, info: StepInfo) -> None:
        """Hook for stores that transform tokens after the policy acted (e.g. quantization). Dense: nothing."""

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.valid, *self.extras.values())

    # -- persistence (memfit.contexts) ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What this layer holds (references, not copies): tensors, ints and nested dicts/lists of them.
        `load_state_dict` on a fresh layer of the same class continues exactly from here."""
        return {"keys": self.keys, "values": self.values, "valid": self.valid, "extras": dict(self.extras),
                "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys, self.values, self.valid = state["keys"], state["values"], state["valid"]
        self.extras = dict(state["extras"])
        self.seen = int(state["seen"])

    def full_nbytes(self) -> int:
        """Bytes a plain full cache (keys + values only) would hold for the same tokens."""
        if self.keys is None:
            return 0
        b, h, _, d = self.keys.shape
        tokens = self.seen if self.window is None else min(self.seen, self.window - 1)  # a full sliding layer too
        return 2 * b * h * tokens * d * self.keys.element_size()


_FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what CUDA's fused attention kernels take (head dim up to 256)
# The fused kernels that return each query's log-sum-exp, tried in this order. cuDNN's is the faster on Hopper: at a
# 32K prompt on an H200 it took 15.5 ms per Llama-3.1-8B layer against 27.5 ms for the flash kernel
# (benchmarks/results/prefill_profile_h200.jsonl). MEMFIT_LSE_KERNELS="flash" (comma list) picks others (A/B runs).
_LSE_KERNELS = ("cudnn", "flash")
_LSE_CHECKED: dict[str, bool] = {}  # kernel -> whether its log-sum-exp matched a direct computation (once a process)


def _lse_kernel_call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    if name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scaling)
    elif name == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)
    else:
        raise ValueError(f"unknown log-sum-exp attention kernel {name!r}: cudnn or flash")
    return res[0], res[1]


def _lse_matches(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scaling: float) -> bool:
    """The last 4 queries' log-sum-exp against the (un-spread) keys in fp32, each KV head's query group at once."""
    b, h, q_len, d = queries.shape
    groups = h // keys.shape[1]
    rows = torch.arange(max(0, q_len - 4), q_len, device=queries.device)
    q_rows = queries[:, :, rows].float().reshape(b, keys.shape[1], groups * rows.numel(), d)
    logits = (q_rows @ keys.float().transpose(-1, -2)).view(b, h, rows.numel(), q_len) * scaling
    logits = logits.masked_fill(torch.arange(q_len, device=queries.device) > rows[:, None], float("-inf"))
    want = torch.logsumexp(logits, dim=-1)
    return bool(lse.shape == (b, h, q_len) and torch.allclose(lse[:, :, rows].float(), want, rtol=1e-3, atol=1e-2))


class LseAttention(NamedTuple):
    """A prompt's attention output, each query's log-sum-exp (B, H, q) fp32, and the kernel that computed them."""

    out: torch.Tensor
    lse: torch.Tensor
    kernel: str


def attention_with_lse(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> LseAttention | None:
    """Causal attention of a whole unpadded prompt (queries and keys the same tokens) and each query's log-sum-exp
    (B, H, q) fp32, from a fused CUDA attention kernel (cuDNN's, else flash attention), which computes the
    log-sum-exp anyway (H2O's prefill scoring then skips a pass over the prompt's logits). None where no such kernel
    applies. Its heads must match, so grouped KV heads are spread over the query heads first (two (B, H, T, d)
    copies, freed after the call). The first call of each kernel in a process checks its log-sum-exp against a
    direct computation on a few queries and drops that kernel if they differ (a torch whose kernel returns another
    convention or shape)."""
    b, h, q_len, d = queries.shape
    names = [n.strip() for n in os.environ.get("MEMFIT_LSE_KERNELS", ",".join(_LSE_KERNELS)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(_LSE_KERNELS))
    if unknown:
        raise ConfigError(f"MEMFIT_LSE_KERNELS: unknown kernel(s) {', '.join(unknown)}; use a comma list of "
                          f"{', '.join(_LSE_KERNELS)}")
    if not queries.is_cuda or queries.dtype not in _FLASH_DTYPES or d > 256 or keys.shape[2] != q_len:
        return None
    names = [n for n in names if _LSE_CHECKED.get(n, True)]
    if not names:
        return None
    groups = h // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    v = values.repeat_interleave(groups, dim=1) if groups > 1 else values
    for name in names:
        try:
            out, lse = _lse_kernel_call(name, queries, k, v, scaling)
        except (RuntimeError, NotImplementedError):
            _LSE_CHECKED[name] = False
            continue
        if lse.dim() == 4 and lse.shape[-1] == 1:  # cuDNN's stats carry a trailing unit dimension
            lse = lse.squeeze(-1)
        if name not in _LSE_CHECKED:
            _LSE_CHECKED[name] = _lse_matches(queries, keys, lse, scaling)
        if _LSE_CHECKED[name]:
            return LseAttention(out, lse.float(), name)
    return None


def dense_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal SDPA where the q queries are the last q of the T keys; `valid` (B, Hkv, T) masks slots.

    Each new token may always see itself, so padding queries never produce NaN (their outputs are unused).
    `window`: a query sees only keys fewer than `window` slots behind it (sliding-window layers, whose slots are
    contiguous positions).
    """
    b, h, q_len, _ = queries.shape
    hkv, t_len = keys.shape[1], keys.shape[2]
    groups = h // hkv
    if window is not None and window < t_len:
        qi = torch.arange(q_len, device=keys.device)[:, None] + (t_len - q_len)
        kj = torch.arange(t_len, device=keys.device)[None, :]
        mask = ((kj <= qi) & (qi - kj < window))[None, None]
        if valid is not None:
            per_head = valid.repeat_interleave(groups, dim=1) if groups > 1 else valid
            mask = mask & per_head[:, :, None, :]
        mask = mask | (kj == qi)[None, None]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling,
                                              enable_gqa=groups > 1)
    if valid is None and q_len == 1:
        return F.scaled_dot_product_attention(queries, keys, values, scale=scaling, enable_gqa=groups > 1)
    if valid is None and q_len == t_len:
        return F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scaling, enable_gqa=groups > 1
        )
    if valid is None and q_len > 1 and queries.is_cuda and queries.dtype in _FLASH_DTYPES and queries.shape[-1] <= 256:
        # a later chunk of a chunked prefill: query i sees keys up to T - q + i (causal aligned to the last key). As a
        # materialised (q, T) mask this would keep CUDA's SDPA off its fused kernels (flash takes no mask, the
        # memory-efficient kernel no GQA) and on the math kernel, whose (B, H, q, T) fp32 scores are 4 GiB per layer
        # for a 4096-token chunk at 8K on Llama-3.1-8B (issue #11); the lower-right causal bias runs in flash.
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=causal_lower_right(q_len, t_len),
                                              scale=scaling, enable_gqa=groups > 1)
    # (checked only for multi-token steps: a host sync per layer is fine at prefill, not at every decode step)
    same_heads = valid is not None and q_len > 1 and bool((valid == valid[:, :1]).all())
    if same_heads and q_len == t_len and q_len > 1:
        out = _left_padded_prefill(queries, keys, values, valid[:, 0], scaling, groups)  # type: ignore[index]
        if out is not None:
            return out
    qi = torch.arange(q_len, device=keys.device)[:, None] + (t_len - q_len)
    kj = torch.arange(t_len, device=keys.device)[None, :]
    mask = (kj <= qi)[None, None]
    if valid is not None:
        # one mask row per KV head, or a single one broadcast over the heads when every head holds the same slots
        # (a (B, H, q, T) mask at a long prefill is the largest tensor of the step)
        per_head = valid[:, :1] if same_heads else valid.repeat_interleave(groups, dim=1) if groups > 1 else valid
        mask = mask & per_head[:, :, None, :]
    mask = mask | (kj == qi)[None, None]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)


def _left_padded_prefill(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float, groups: int
) -> torch.Tensor | None:
    """A prompt whose rows are left-padded (valid = a suffix of each row): causal SDPA row by row over the real
    tokens, so no (B, H, T, T) mask is built and the fused (flash / memory-efficient) kernels run. Padding queries
    get zeros (their outputs are unused). None if `valid` is not such a suffix."""
    b, _, t_len, _ = queries.shape
    pads = (~valid).sum(-1)
    suffix = torch.arange(t_len, device=valid.device)[None, :] >= pads[:, None]
    if not bool((valid == suffix).all()):
        return None
    out = torch.zeros_like(queries)
    for i, pad in enumerate(pads.tolist()):
        if pad < t_len:
            out[i : i + 1, :, pad:] = F.scaled_dot_product_attention(
                queries[i : i + 1, :, pad:], keys[i : i + 1, :, pad:], values[i : i + 1, :, pad:],
                is_causal=True, scale=scaling, enable_gqa=groups > 1,
            )
    return out
