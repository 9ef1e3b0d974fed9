"""The method contract: what the runtime hands a method, and what the method hands back.

Methods score and choose; stores hold and apply; the runtime (`memfit.core.cache.CompressedCache`) drives both and
nothing calls back up. For every attention layer that attended, the runtime calls
`Method.after_attention(layer, queries, scaling, info)` with
- `layer`: a `LayerView`, a read-only window on the layer's store (keys, validity, per-token policy state...);
- `info`: a `StepInfo`, which carries the layer's resolved budget (`info.keep`, (B,) tokens per row, or None for
  unlimited) next to what the forward call was;
and the method returns a `Selection` (what to keep, and the per-token state to store), a dict {layer index:
Selection} for a decision that covers several layers (GemFilter), or None ("keep everything, nothing to store").
The runtime applies it (`memfit.core.cache.apply_selection`: whole-word spans, per-head allocation, top-k, the
store's `keep`), the same way for every store — dense, quantized, ragged and the fast backend's static buffers.
This module imports nothing from the rest of memfit: stores, methods and the runtime all import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


@dataclass
class StepInfo:
    """What a policy (and a store's `finalize_step`) needs to know about the forward call that just attended."""

    layer_idx: int
    num_layers: int
    q_len: int
    is_prefill: bool  # this forward call is (part of) the prompt, not a generated token
    new_valid: torch.Tensor | None  # (B, q) validity of the tokens appended in this call
    prefill_done: bool = True  # False while more prompt chunks are still to come (chunked prefill)
    # this layer's budget per row (B,) long, resolved by the runtime (allocation schedules applied); None = unlimited:
    # the method must then keep everything (and should skip scoring)
    keep: torch.Tensor | None = None
    # for decisions that span layers (GemFilter): every attention layer, read-only, and the budget of any layer
    layers: Sequence[LayerView] = ()
    budget_of: Callable[[int], torch.Tensor | None] | None = None
    # (B, H, q) fp32: each of this call's queries' log of its summed exp(scaled logit) over the keys it saw, when the
    # attention kernel returned it (a method with `prefill_lse` asked for it); None otherwise
    lse: torch.Tensor | None = None


class LayerView:
    """A method's read-only view of one layer's store: everything it may score with, nothing it could change.

    Works over any store (dense, quantized, ragged, static): ragged stores already present their tokens as
    (B, Hkv, T, ...) views with each (row, head) right-aligned, so a method never needs to know which store it sees.
    """

    __slots__ = ("_store",)

    def __init__(self, store: Any) -> None:
        self._store = store

    @property
    def index(self) -> int:
        return int(self._store.index)

    @property
    def keys(self) -> torch.Tensor:
        """(B, Hkv, T, d) post-RoPE keys of the held slots (the last q are this call's tokens)."""
        return self._store.keys

    @property
    def values(self) -> torch.Tensor:
        return self._store.values

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, Hkv, T) bool, or None when every slot holds a real token."""
        return self._store.valid

    def valid_mask(self) -> torch.Tensor:
        return self._store.valid_mask()

    def held_per_row(self) -> torch.Tensor:
        """Valid tokens held per (row, KV head): (B, Hkv) long."""
        return self._store.held_per_row()

    @property
    def num_slots(self) -> int:
        return int(self._store.num_slots)

    @property
    def seen(self) -> int:
        """Tokens ever appended to this layer (padding included): what a full cache would hold."""
        return int(self._store.seen)

    @property
    def window(self) -> int | None:
        """Sliding-window size of a local-attention layer (the method does not act there), else None."""
        return getattr(self._store, "window", None)

    @property
    def fused(self) -> bool:
        """The store ran the method's decode rule itself this step (`Method.static_decode_rule`)."""
        return bool(getattr(self._store, "fused", False))

    @property
    def extras(self) -> Mapping[str, torch.Tensor]:
        """Per-token policy state (B, Hkv, T, ...), read-only: a method returns new state in `Selection.state`."""
        return MappingProxyType(self._store.extras)


@dataclass
class Selection:
    """What a method decided for one layer; the runtime applies it (`memfit.core.cache.apply_selection`).

    Exactly one way to choose, or none:
    - `scores` (B, Hkv, T): keep each row's top-budget valid slots by score, `protect`ed (B, Hkv, T) slots first.
      The runtime brings the budget (`StepInfo.keep`), whole-word spans and per-head allocation (AdaKV);
    - `indices` (B, Hkv, K) slot numbers to keep, in that order, with their validity `valid` (B, Hkv, K) or None:
      for methods that make their own selection (their own per-row targets);
    - neither: keep every slot (only `state` is stored).
    `state`: per-token policy state to store in the layer (`extras[name]`, (B, Hkv, T, ...) over the slots held
    *before* this selection), written first so that it is gathered with the kept tokens and counted by `nbytes()`.
    """

    scores: torch.Tensor | None = None
    protect: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # with `scores`: this layer's budget per row (B,) when the method shares one budget over layers itself (KVzip's
    # single ranking of every layer's pairs); None = the layer's own budget (`StepInfo.keep`)
    keep: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores is not None and self.indices is not None:
            raise ValueError("a Selection chooses by scores or by indices, not both")


Decision = Selection | dict[int, Selection] | None
"""What `Method.after_attention` / `after_prefill` return: one layer's selection, several layers' ({index:
selection}), or None (keep everything)."""


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
