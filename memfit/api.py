"""Public Python API: build a compressed cache for a model, or do what `memfit run` does in one call."""

from __future__ import annotations

from typing import Any

import torch

from memfit.adapters.transformers import MemfitCache, install, num_attention_layers
from memfit.core.budget import Budget
from memfit.core.cache import CompressedCache
from memfit.core.method import build_policy


def make_cache(
    model: torch.nn.Module,
    method: str = "full",
    budget: float | int | str | Budget | None = None,
    params: dict[str, Any] | None = None,
    allocation: str = "uniform",
) -> MemfitCache:
    """A fresh compressed cache for one generation: pass it as `past_key_values=` to `model.generate` or forward.

    `method`: a method name, or `<eviction>+<quantizer>` (e.g. "snapkv+kivi"); `params` may address a component
    as "kivi.bits". `budget`: a fraction of the prompt in (0, 1], a token count per layer (> 1), or None for
    unlimited (a quantizer alone keeps every token).
    `allocation`: how the average budget is shared out — "uniform", "pyramid" (over layers, PyramidKV), "adakv"
    (over KV heads, ragged store) or "pyramid+adakv" (see memfit.core.allocation).
    Switches the model's attention implementation to memfit's (SDPA underneath), which the cache needs.
    """
    policy, layer_factory = build_policy(method, budget, params)
    install(model)
    core = CompressedCache(num_attention_layers(model), policy, layer_factory)
    if allocation != "uniform":
        from memfit.core.allocation import configure_allocation

        configure_allocation(core, allocation)
    return MemfitCache(core)
