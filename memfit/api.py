"""Public Python API: build a compressed cache for a model, or do what `memfit run` does in one call."""

from __future__ import annotations

import os
from typing import Any

import torch

from memfit.adapters.transformers import (
    MemfitCache,
    install,
    install_fused_ops,
    num_attention_layers,
    projection_groups,
    sliding_windows,
)
from memfit.backend import Backend, choose_backend
from memfit.core import tp
from memfit.core.budget import Budget
from memfit.core.cache import CompressedCache, KVLayer
from memfit.core.method import build_policy
from memfit.core.static_quant_store import static_quant_form
from memfit.errors import ConfigError


def make_cache(
    model: torch.nn.Module,
    method: str = "full",
    budget: float | int | str | Budget | None = None,
    params: dict[str, Any] | None = None,
    allocation: str = "uniform",
    backend: str = "auto",
    reserve: int | None = None,
    rows: int = 1,
) -> MemfitCache:
    """A fresh compressed cache for one generation: pass it to `model.generate` or forward as the model's cache
    (`past_key_values=`), or to `memfit.engine.generate`.

    `method`: a method name, or `<eviction>+<quantizer>` (e.g. "snapkv+kivi"); `params` may address a component
    as "kivi.bits". `budget`: a fraction of the prompt in (0, 1], a token count per layer (> 1), or None for
    unlimited (a quantizer alone keeps every token).
    `allocation`: how the average budget is shared out — "uniform", "pyramid" (over layers, PyramidKV), "adakv"
    (over KV heads, ragged store) or "pyramid+adakv" (see memfit.core.allocation).
    `backend`: "auto" | "fast" | "portable" (see memfit.backend); the choice is `cache.backend`. `reserve`: tokens
    the fast stores leave room for after the prompt (the decode length; they grow if exceeded). `rows`: how many
    sequences will decode together; on the fast backend it picks the kernel of 4-bit weight layers (one row: the
    pair-order kernel; several: torch's int4 matmul; `memfit.weights.format.int4_kernel_for`).
    Switches the model's attention implementation to memfit's (SDPA underneath), which the cache needs.
    Sliding-window layers (Gemma 3's local layers) keep their window; the method acts on the global layers.
    """
    policy, layer_factory = build_policy(method, budget, params)
    windows = sliding_windows(model)
    sliding = any(w is not None for w in windows)
    if sliding and "adakv" in allocation:
        raise ConfigError("--allocation adakv does not support models with sliding-window layers yet: use uniform "
                          "or pyramid")
    dense = type(layer_factory(0)) is KVLayer and "adakv" not in allocation
    # KIVI (alone or behind a prompt-only eviction) has a static form; it quantizes inside the store while decoding
    quant_form = None if dense or sliding or "adakv" in allocation else static_quant_form(policy)
    rule = policy.static_decode_rule() if dense else None
    fused = rule is not None and rule.get("rule") == "accumulated"
    chosen: Backend = choose_backend(backend, model, dense_store=dense, static_quantized=quant_form is not None,
                                     decode_free=policy.acts in ("prefill", "never") or fused
                                     or quant_form is not None, sliding=sliding,
                                     decode_steps=reserve,
                                     graph_safe=all(getattr(m, "cuda_graph_safe", True) for m in model.modules()))
    if chosen.name == "fast":
        from memfit.core.static_store import DEFAULT_RESERVE, AccumulatedStaticLayer, StaticKVLayer

        room = DEFAULT_RESERVE if reserve is None else max(1, int(reserve))
        if quant_form is not None:
            from memfit.core.static_quant_store import StaticKIVILayer

            form = quant_form
            layer_factory = lambda index: StaticKIVILayer(index, form, room)  # noqa: E731
        elif fused:
            assert rule is not None
            score_key, fraction = str(rule["score_key"]), float(rule["recent_fraction"])
            layer_factory = lambda index: AccumulatedStaticLayer(  # noqa: E731
                index, score_key=score_key, recent_fraction=fraction)
        else:
            layer_factory = lambda index: StaticKVLayer(index, room)  # noqa: E731
    install(model)
    if chosen.fused_ops:
        install_fused_ops(model)
    if chosen.name == "fast":
        from memfit.weights.format import group_repacked, repack_for_decode

        # uniform 4-bit layers take a decode kernel's layout (MEMFIT_INT4_KERNEL); q/k/v and gate/up then run as one
        # matmul each
        # (MEMFIT_INT4_GROUPS=0 keeps them apart, for A/B runs)
        if (repack_for_decode(model, next(model.parameters()).dtype, rows)
                and os.environ.get("MEMFIT_INT4_GROUPS") != "0"):
            group_repacked(projection_groups(model))
    core = CompressedCache(num_attention_layers(model), policy, layer_factory)
    core.tensor_parallel = tp.is_sharded(model)
    for layer, window in zip(core.layers, windows, strict=True):
        layer.window = window
    if allocation != "uniform":
        from memfit.core.allocation import configure_allocation

        configure_allocation(core, allocation)
    cache = MemfitCache(core)
    cache.backend = chosen
    return cache
