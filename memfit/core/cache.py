"""Compressed KV storage: per-layer tensors that physically shrink when tokens are evicted.

`KVLayer` holds one layer's keys and values as (B, Hkv, T, d) tensors, plus:
- `valid` (B, Hkv, T) bool or None: a slot is invalid when it holds padding or a placeholder. Rows of a batch keep
  the same number of slots so tensors stay rectangular; a row that may keep fewer tokens than the longest row fills
  the difference with invalid placeholders (only in heterogeneous batches). None means every slot is valid.
- `extras`: per-token state a policy needs (e.g. H2O's accumulated attention), gathered together with K/V.
Kept tokens stay in original order and keep their original (post-RoPE) positions.

`CompressedCache` is a list of layers plus the policy (a `Method`) and per-row budgets. It knows nothing about
transformers: the adapter calls `append` then `attend` for each attention layer. `nbytes()` counts every tensor
held (keys, values, validity masks and policy state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from memfit.core import tp
from memfit.core.budget import Budget
from memfit.core.spans import record_spans

if TYPE_CHECKING:  # pragma: no cover
    from memfit.core.method import Method


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class StepInfo:
    """What the policy needs to know about the forward call that just attended."""

    layer_idx: int
    num_layers: int
    q_len: int
    is_prefill: bool  # this forward call is (part of) the prompt, not a generated token
    new_valid: torch.Tensor | None  # (B, q) validity of the tokens appended in this call
    prefill_done: bool = True  # False while more prompt chunks are still to come (chunked prefill)


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


def select_tokens(
    scores: torch.Tensor,
    keep_rows: torch.Tensor,
    valid: torch.Tensor | None,
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose slots to keep: per (row, KV head) the top `keep_rows[b]` valid slots by score.

    scores (B, Hkv, T); keep_rows (B,) long; valid / protect (B, Hkv, T) bool (protected valid slots are kept first).
    Returns (indices (B, Hkv, K) sorted by position, validity of the kept slots or None) with K = max(keep_rows),
    capped at T. Rows with a smaller budget fill their extra slots with invalid placeholders, so every row keeps
    exactly the tokens it would keep if run alone.
    """
    b, h, t_len = scores.shape
    k_max = min(int(keep_rows.max()), t_len)
    s = scores.float()
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    top_scores, top_idx = torch.topk(s, k_max, dim=-1, sorted=True)
    rank = torch.arange(k_max, device=scores.device)
    keep_valid = (rank[None, None, :] < keep_rows.to(scores.device)[:, None, None]).expand(b, h, k_max)
    if valid is not None:
        keep_valid = keep_valid & (top_scores > float("-inf"))
    order = torch.argsort(top_idx, dim=-1)
    indices = top_idx.gather(-1, order)
    keep_valid = keep_valid.gather(-1, order)
    return indices, (None if bool(keep_valid.all()) else keep_valid)


LayerSchedule = Callable[[torch.Tensor, int, int], torch.Tensor]


class CompressedCache:
    """All layers' stores + the policy and per-row budgets. Independent of transformers."""

    def __init__(self, num_layers: int, method: Method, layer_factory: Callable[[int], KVLayer] = KVLayer) -> None:
        self.method = method
        self.layer_factory = layer_factory  # layer index -> empty store (dense KVLayer, or a quantized store)
        self.layers: list[KVLayer] = [layer_factory(i) for i in range(num_layers)]
        # Per-layer budget schedule: maps (row budgets, layer index, layer count) -> that layer's row budgets.
        # Uniform by default; adaptive allocations (pyramid...) plug in here and must keep the mean budget.
        self.layer_schedule: LayerSchedule | None = None
        self.prompt_lens: torch.Tensor | None = None  # (B,) real prompt tokens per row
        self.keep_rows: torch.Tensor | None = None  # (B,) resolved budget per row (None = unlimited)
        self.prefill_done = False  # becomes True after the first complete forward over the prompt
        self._expected_prompt: torch.Tensor | None = None  # set by the engine for chunked prefill
        self._padded_prompt_len = 0
        self.skipped_prompt_tokens = 0  # prompt tokens removed before prefill (counted as held by a full cache)
        self.tensor_parallel = False  # the model is split over ranks: this cache holds this rank's KV heads
        # Keep whole words/numbers (memfit.core.spans): `span_rule` (set by enable_spans) maps the prompt's ids to
        # span ids before prefill; each layer stores them for its prompt tokens as they are appended.
        self.span_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.prompt_spans: torch.Tensor | None = None  # (B, T_prompt) for the prompt being prefilled

    def layer_keep(self, layer_idx: int) -> torch.Tensor | None:
        """Budget per row (B,) for one layer (None = unlimited)."""
        if self.keep_rows is None or self.layer_schedule is None:
            return self.keep_rows
        return self.layer_schedule(self.keep_rows, layer_idx, self.num_layers)

    @property
    def budget(self) -> Budget:
        return self.method.budget

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def begin_prompt(self, prompt_lens: torch.Tensor, padded_len: int) -> None:
        """Declare the prompt before a chunked prefill: real tokens per row (so fraction budgets resolve from the
        whole prompt, not the first chunk) and the padded length (so the policy knows when the prompt ends)."""
        self._expected_prompt = prompt_lens.detach().cpu().long()
        self._padded_prompt_len = int(padded_len)

    def _start_forward(self, layer_idx: int, q_len: int, new_valid: torch.Tensor | None, batch: int) -> StepInfo:
        layer = self.layers[layer_idx]
        is_prefill = not self.prefill_done
        if is_prefill and layer_idx == 0 and layer.seen == 0:
            if self._expected_prompt is not None:
                self.prompt_lens = self._expected_prompt
            elif new_valid is not None:
                self.prompt_lens = new_valid.sum(-1).cpu().long()
            else:
                self.prompt_lens = torch.full((batch,), q_len, dtype=torch.long)
            self.keep_rows = self.method.budget.resolve_rows(self.prompt_lens)
        prefill_done = True
        if is_prefill and self._expected_prompt is not None:
            # chunked prefill: done once this layer has seen the whole (padded) prompt
            prefill_done = layer.seen + q_len >= self._padded_prompt_len
        return StepInfo(layer_idx, self.num_layers, q_len, is_prefill, new_valid, prefill_done)

    def step(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        new_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """Append new K/V, attend, then let the policy compress. Returns the attention output (B, H, q, d)."""
        info = self._start_forward(layer_idx, keys.shape[2], new_valid, keys.shape[0])
        layer = self.layers[layer_idx]
        layer.append(keys, values, new_valid)
        if self.prompt_spans is not None and info.is_prefill:
            record_spans(layer, self.prompt_spans, keys.shape[2])
        if getattr(layer, "window", None) is not None:  # a sliding-window layer keeps its window; the method acts
            # on the global layers
            out = layer.attend(queries, scaling, layer.window)
            layer.trim_to_window()
        else:
            out = layer.attend(queries, scaling)
            with tp.scope(self.tensor_parallel):  # cross-head decisions talk to the other ranks only for a split model
                self.method.after_attention(self, layer, queries, scaling, info)
            if info.is_prefill and info.prefill_done and hasattr(layer, "budget_tokens"):
                keep = self.layer_keep(layer_idx)  # static stores size their buffers from it
                layer.budget_tokens = None if keep is None else int(keep.max())
        layer.finalize_step(info)
        if layer_idx == self.num_layers - 1 and info.is_prefill and info.prefill_done:
            self.prefill_done = True
            self._expected_prompt = None
        return out

    # -- accounting ----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same tokens (keys + values, same dtype), including prompt
        tokens a method never fed to the model (GemFilter's prompt selection)."""
        total = sum(layer.full_nbytes() for layer in self.layers)
        if self.skipped_prompt_tokens:
            for layer in self.layers:
                if layer.seen:
                    total += layer.full_nbytes() * self.skipped_prompt_tokens // layer.seen
        return total

    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def held_tokens(self) -> list[int]:
        """Max valid tokens held by any (row, head), per layer."""
        return [int(layer.held_per_row().max()) if layer.num_slots else 0 for layer in self.layers]

    def select_batch(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_batch(rows)
        if self.keep_rows is not None:
            self.keep_rows = self.keep_rows.index_select(0, rows.cpu())
        if self.prompt_lens is not None:
            self.prompt_lens = self.prompt_lens.index_select(0, rows.cpu())

    def reset(self) -> None:
        swapped = bool(self.layers) and type(self.layers[0]) is not type(self.layer_factory(0))
        factory = type(self.layers[0]) if swapped else self.layer_factory  # layers replaced after construction
        windows = [getattr(layer, "window", None) for layer in self.layers]
        self.layers = [factory(i) for i in range(len(self.layers))]
        for layer, window in zip(self.layers, windows, strict=True):
            layer.window = window
        self.prompt_lens = self.keep_rows = None
        self.prefill_done = False
        self._expected_prompt = None
        self.skipped_prompt_tokens = 0
        self.prompt_spans = None
        self.method.reset()
