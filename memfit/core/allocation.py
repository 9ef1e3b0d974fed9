"""Adaptive KV budgets: how a row's average budget is shared out over layers (pyramid) and KV heads (AdaKV).

Both allocations keep the user's budget as an *average* and make the bytes really shrink; any eviction method that
returns scores (`Selection(scores=...)`, applied by `memfit.core.cache.apply_selection`) uses them unchanged.

**Per layer — PyramidKV** ("PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
Cai et al., 2024, arXiv 2406.02069). Lower layers attend broadly, upper layers to a few tokens, so the budget
decreases linearly from the bottom layer to the top one. With per-layer average `b` (minus an optional `reserve`
that every layer keeps, e.g. an observation window), the top layer gets `lo = b / beta` and the bottom layer
`hi = 2 b - lo`, so the mean is `b`. When `hi` would exceed what there is to keep (the prompt), `hi` is clamped to
it and `lo = 2 b - hi` (the official code does the same). Official default: beta = 20 (KVCache-Factory
`PyramidKVCluster`, AdaKV's `pyram_beta`). Deviation: the official code rounds `lo` and the step down, so its layers
sum to slightly less than L x b; we compute the line exactly (rationals) and round by largest remainder, so the
budgets sum to exactly `num_layers * b` for every row, stay non-increasing with depth and are >= 1. The reserve
is the method's observation window when it has one (`window`, SnapKV); other methods pyramid their whole budget.

**Per head — AdaKV** ("Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", Feng et al., 2024, arXiv 2407.11550). Within a layer, a row's Hkv x k slots are shared by the KV heads
by score: the top Hkv x k scores over all heads jointly decide how many slots each head would get (c_h); with the
safeguard `alpha` every head gets `(1 - alpha) c_h + alpha k` (official `floor_alpha` = 0.2), rounded down; slots
lost to rounding (or to heads holding fewer tokens than their share) go to the best remaining tokens of the layer.
Each head then keeps its own top tokens (protected ones first). So heads whose attention is concentrated keep
fewer tokens and dispersed heads more; the total never exceeds Hkv x k per row. This only makes sense when scores
are comparable across heads (attention mass, as in SnapKV / H2O). Deviations: per KV head with group-reduced
scores (AdaKV's first release was per query head); no `skip` of the first layers and no score normalisation
(official options, off by default in our reading); it also runs at decode steps for methods that evict then.
Storage: `memfit.core.ragged.RaggedKVLayer` (real bytes, no masking — kvpress only masks for this).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from memfit.core import tp
from memfit.core.cache import CompressedCache
from memfit.core.store import KVLayer
from memfit.errors import ConfigError

ALLOCATIONS = ("uniform", "pyramid", "adakv", "pyramid+adakv")
PYRAMID_BETA = 20.0  # official PyramidKV default
ADAKV_ALPHA = 0.2  # official AdaKV safeguard (floor_alpha)


# -- per layer ---------------------------------------------------------------------------------------------------
def pyramid_budgets(
    budget: int, num_layers: int, beta: float = PYRAMID_BETA, cap: int | None = None, reserve: int = 0
) -> list[int]:
    """Per-layer budgets (bottom layer first), decreasing linearly, summing to exactly `num_layers * budget`.

    `cap`: most tokens a layer can hold (the prompt length); `reserve`: tokens every layer keeps outside the pyramid.
    """
    if beta < 1:
        raise ConfigError("pyramid beta must be >= 1")
    if num_layers <= 1 or budget <= 1 or (cap is not None and budget >= cap):
        return [budget] * num_layers
    r = max(0, min(reserve, budget - 1))
    base = Fraction(budget - r)
    lo = max(base / Fraction(beta), Fraction(1 if r == 0 else 0))
    hi = 2 * base - lo
    if cap is not None and hi + r > cap:
        hi = Fraction(cap - r)
        lo = 2 * base - hi
    if hi <= lo:
        return [budget] * num_layers
    exact = [r + hi - (hi - lo) * i / (num_layers - 1) for i in range(num_layers)]
    out = [math.floor(x) for x in exact]
    missing = num_layers * budget - sum(out)
    # largest remainder; ties to the lower layer, which keeps the schedule non-increasing
    order = sorted(range(num_layers), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:missing]:
        out[i] += 1
    return out


class PyramidSchedule:
    """A `CompressedCache.layer_schedule`: each row's budget laid out as a pyramid over the layers."""

    def __init__(
        self,
        beta: float = PYRAMID_BETA,
        reserve: int = 0,
        prompt_lens: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        if beta < 1:
            raise ConfigError("pyramid beta must be >= 1")
        self.beta, self.reserve, self.prompt_lens = beta, reserve, prompt_lens
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None  # (B, L) long

    def __call__(self, keep_rows: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        caps = self.prompt_lens() if self.prompt_lens is not None else None
        rows = [int(k) for k in keep_rows.tolist()]
        cap_list = (
            [int(c) for c in caps.tolist()] if caps is not None and len(caps) == len(rows) else [None] * len(rows)
        )
        key = (tuple(rows), tuple(cap_list), num_layers)
        if key != self._key or self._table is None:
            table = [
                pyramid_budgets(k, num_layers, self.beta, c, self.reserve) for k, c in zip(rows, cap_list, strict=True)
            ]
            self._table = torch.tensor(table, dtype=torch.long).reshape(len(rows), num_layers)
            self._key = key
        return self._table[:, layer_idx].to(keep_rows.device)


def pyramid_schedule(
    beta: float = PYRAMID_BETA, reserve: int = 0, prompt_lens: Callable[[], torch.Tensor | None] | None = None
) -> PyramidSchedule:
    """A PyramidKV layer schedule to set as `CompressedCache.layer_schedule` (what allocation="pyramid" installs)."""
    return PyramidSchedule(beta, reserve, prompt_lens)


# -- per head ----------------------------------------------------------------------------------------------------
def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis by descending score (0 = best); ties keep index order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def adakv_keep_mask(
    scores: torch.Tensor,
    keep_rows: torch.Tensor,
    valid: torch.Tensor | None,
    protect: torch.Tensor | None = None,
    alpha: float = ADAKV_ALPHA,
) -> torch.Tensor:
    """Which slots each (row, KV head) keeps: (B, Hkv, T) bool, at most Hkv * keep_rows[b] per row in total.

    scores (B, Hkv, T) comparable across heads; keep_rows (B,) per-head average budget; valid / protect (B, Hkv, T)
    bool (protected valid slots are kept first, invalid slots never). Under tensor parallelism the inputs are this
    rank's heads: the choice is made over every rank's heads (one all-gather) and this rank's slice returned."""
    local_heads = scores.shape[1]
    scores = tp.all_heads(scores)
    valid = None if valid is None else tp.all_heads(valid)
    protect = None if protect is None else tp.all_heads(protect)
    return tp.own_heads(_adakv_keep_mask(scores, keep_rows, valid, protect, alpha), local_heads)


def _adakv_keep_mask(
    scores: torch.Tensor,
    keep_rows: torch.Tensor,
    valid: torch.Tensor | None,
    protect: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    b, h, t = scores.shape
    device = scores.device
    s = scores.float()
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    present = s > float("-inf")
    k = keep_rows.to(device).long()
    total = h * k  # (B,)
    n_valid = present.sum(-1)  # (B, H)
    # 1. joint top-(H k) over the layer's heads -> how many slots each head would win (c_h)
    flat_rank = _rank_desc(s.reshape(b, h * t)).reshape(b, h, t)
    won = (flat_rank < total[:, None, None]) & present
    counts = won.sum(-1)
    # 2. safeguard: every head keeps at least alpha * k; round down, never more than it holds
    share = ((1.0 - alpha) * counts.double() + alpha * k[:, None].double()).floor().long()
    share = torch.minimum(share, n_valid)
    keep = (_rank_desc(s) < share[:, :, None]) & present
    # 3. slots lost to rounding / short heads go to the best remaining tokens of the layer
    left = (total - keep.sum((1, 2))).clamp(min=0)
    if bool((left > 0).any()):
        rest = s.masked_fill(keep, float("-inf"))
        extra = (_rank_desc(rest.reshape(b, h * t)).reshape(b, h, t) < left[:, None, None]) & present & ~keep
        keep = keep | extra
    return keep


@dataclass
class HeadAllocation:
    """Per-head (AdaKV) selection, applied by `memfit.core.cache.apply_selection`; the layers must be `RaggedKVLayer`s."""

    alpha: float = ADAKV_ALPHA

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("adakv alpha (safeguard share per head) must be in [0, 1]")

    def evict(
        self, layer: KVLayer, scores: torch.Tensor, keep_rows: torch.Tensor, protect: torch.Tensor | None
    ) -> None:
        if not hasattr(layer, "keep_mask"):
            raise ConfigError("per-head allocation needs a ragged store (make_cache(..., allocation='adakv'))")
        held = layer.held_per_row()  # (B, H)
        # the layer's budget covers every head (all ranks under tensor parallelism): decide on the layer's total
        total = tp.sum_over_heads(held.sum(-1))
        if bool((total <= held.shape[1] * tp.world()[1] * keep_rows.to(held.device)).all()):
            return  # every row is within its layer budget: nothing to free
        mask = adakv_keep_mask(scores, keep_rows, layer.valid, protect, self.alpha)
        layer.keep_mask(mask)  # type: ignore[attr-defined]


# -- wiring ------------------------------------------------------------------------------------------------------
def parse_allocation(allocation: str | None) -> tuple[bool, bool]:
    """'uniform' | 'pyramid' | 'adakv' | 'pyramid+adakv' -> (pyramid over layers, adakv over heads)."""
    text = (allocation or "uniform").strip().lower().replace(" ", "")
    parts = set(text.split("+"))
    if text == "uniform":
        return False, False
    if not parts or not parts <= {"pyramid", "adakv"} or len(parts) != len(text.split("+")):
        raise ConfigError(f"unknown allocation {allocation!r} (known: {', '.join(ALLOCATIONS)})")
    return "pyramid" in parts, "adakv" in parts


def configure_allocation(
    cache: CompressedCache, allocation: str | None = "uniform", beta: float = PYRAMID_BETA, alpha: float = ADAKV_ALPHA
) -> CompressedCache:
    """Give `cache` a layer schedule (pyramid) and/or ragged per-head stores with AdaKV selection."""
    pyramid, adakv = parse_allocation(allocation)
    if pyramid:
        # A method's observation window (SnapKV's `window`) stays whole in every layer, outside the pyramid, as in
        # PyramidKV (built on SnapKV: each layer keeps its window plus its share of the rest).
        window = getattr(cache.method, "window", 0)
        reserve = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else 0
        cache.layer_schedule = pyramid_schedule(beta, reserve, prompt_lens=lambda: cache.prompt_lens)
    if adakv:
        from memfit.core.ragged import RaggedKVLayer

        if not getattr(cache.method, "ragged_heads", True):
            raise ConfigError(f"method {cache.method.name!r} scores all KV heads of a layer over the same tokens, so "
                              f"it cannot run with per-head budgets: use --allocation uniform or pyramid")

        factory = _ragged_factory(cache.layers[0]) if cache.layers else RaggedKVLayer
        odd = {type(layer).__name__ for layer in cache.layers if type(layer) not in (KVLayer, RaggedKVLayer)}
        if odd and factory is None:
            raise ConfigError(
                f"allocation 'adakv' needs the plain store or KIVI's codes; it does not combine with "
                f"{', '.join(sorted(odd))}"
            )
        assert factory is not None
        cache.layers = [factory(i) for i in range(cache.num_layers)]
        cache.layer_factory = factory  # type: ignore[attr-defined]  (reset() rebuilds ragged layers)
        cache.head_allocation = HeadAllocation(alpha)
    return cache


def _ragged_factory(layer: Any) -> Callable[[int], Any] | None:
    """The ragged store standing in for `layer`'s kind under per-head budgets: the plain ragged store for a dense
    layer, the quantized one for KIVI's store (per-channel key codes, per-token value codes); None otherwise."""
    from memfit.core.quantized_store import ChannelCodec, QuantizedKVLayer, TokenCodec
    from memfit.core.ragged import QuantizedRaggedKVLayer, RaggedKVLayer

    if type(layer) in (KVLayer, RaggedKVLayer):
        return RaggedKVLayer
    if isinstance(layer, QuantizedKVLayer) and isinstance(layer.k.codec, ChannelCodec) and isinstance(
            layer.v.codec, TokenCodec):
        kb, vb, g = layer.k.codec.bits, layer.v.codec.bits, layer.k.codec.group_size
        residual = layer.k.flush_rule.residual
        return lambda index: QuantizedRaggedKVLayer(index, int(kb), int(vb), int(g), int(residual))
    return None
