"""The only module that knows transformers internals.

How memfit plugs in (works with transformers 5.17 .. 5.24):
- We register an attention function under the name "memfit" and switch the model to it, plus a mask function
  that passes the user's 2D padding mask through untouched; we build causal/padding masks from our own per-layer
  validity, which stays right after eviction (held length != logical length).
- `MemfitCache` is a transformers `Cache`. Its `update` only parks the new keys/values; the attention function
  then calls `CompressedCache.step`, which appends, attends (SDPA) and lets the method evict — so methods see the
  post-RoPE queries without eager attention, and storage physically shrinks.
- `get_seq_length` reports the *logical* length (tokens seen), so position ids and generate's bookkeeping stay
  correct after eviction.
Kwarg names that changed between versions (`past_key_values` -> `cache`, `cache_kwargs` -> `kwargs`) are handled
here and nowhere else.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from memfit.core.cache import CompressedCache, KVLayer, StepInfo, dense_attention
from memfit.core.method import Method

ATTN_NAME = "memfit"
_PENDING: contextvars.ContextVar[tuple[MemfitCache, int, torch.Tensor, torch.Tensor] | None] = contextvars.ContextVar(
    "memfit_pending", default=None
)


def memfit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' interface: (B, H, q, d) in, (B, q, H, d) out."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len = query.shape[2]
    pad = _padding_from_mask(attention_mask)
    pending = _PENDING.get()
    layer_idx = getattr(module, "layer_idx", None)
    if pending is not None and pending[1] == layer_idx:
        cache, _, new_k, new_v = pending
        _PENDING.set(None)
        new_valid = None if pad is None else pad[:, -q_len:].to(query.device)
        out = cache.core.step(layer_idx, new_k, new_v, query, scaling, new_valid)
    else:
        # No memfit cache in this call (use_cache=False or another cache): plain causal attention.
        valid = None
        if pad is not None:
            valid = pad[:, -key.shape[2] :].to(key.device)[:, None, :].expand(key.shape[0], key.shape[1], -1)
        out = dense_attention(query, key, value, valid, scaling)
    return out.transpose(1, 2).contiguous(), None


def _padding_from_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, kv_len) bool validity of tokens, from a 2D mask (or a 4D one's last query row)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 4:  # a prepared mask: its diagonal tells which new tokens are real
        m = mask[:, 0]
        m = m if m.dtype == torch.bool else m == 0
        return m.diagonal(offset=m.shape[-1] - m.shape[-2], dim1=-2, dim2=-1).contiguous()
    raise ValueError(f"unsupported attention mask with {mask.dim()} dims")


def _pass_padding_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask "creation" for memfit: hand the 2D padding mask through unchanged; memfit builds causal/eviction masks
    itself from each layer's held slots."""
    return attention_mask


AttentionInterface.register(ATTN_NAME, memfit_attention)
AttentionMaskInterface.register(ATTN_NAME, _pass_padding_mask)


def install(model: torch.nn.Module) -> None:
    """Switch `model` to memfit's attention (idempotent). Required for a MemfitCache to work."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == ATTN_NAME:
        return
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is None:
            raise AttributeError
        setter(ATTN_NAME)
    except Exception:  # older/odd models: set the config field directly
        config._attn_implementation = ATTN_NAME
        for sub in ("text_config",):
            if hasattr(config, sub):
                getattr(config, sub)._attn_implementation = ATTN_NAME


def num_attention_layers(model: torch.nn.Module) -> int:
    config = getattr(model.config, "text_config", model.config)
    return int(config.num_hidden_layers)


class _LayerView(CacheLayerMixin):
    """What transformers' Cache bookkeeping sees of one of our layers."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: MemfitCache, idx: int) -> None:
        super().__init__()
        self.owner, self.idx = owner, idx

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.owner.core.layers[self.idx].keys is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:
        pass

    @property
    def batch_size(self) -> int:
        k = self.owner.core.layers[self.idx].keys
        return -1 if k is None else k.shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - MemfitCache.update is used
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.owner.core.layers[self.idx].seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass


class MemfitCache(Cache):
    """A transformers Cache backed by a memfit `CompressedCache` (use `memfit.make_cache`)."""

    def __init__(self, core: CompressedCache) -> None:
        self.core = core
        super().__init__(layers=[_LayerView(self, i) for i in range(core.num_layers)])
        self.backend: Any = None  # memfit.backend.Backend, set by memfit.make_cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        # Park the new K/V; memfit_attention appends, attends and compresses in one place.
        _PENDING.set((self, layer_idx, key_states, value_states))
        return key_states, value_states

    # -- what users and the engine read --------------------------------------------------------------------------
    @property
    def method(self):
        return self.core.method

    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds now."""
        return self.core.nbytes()

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same tokens."""
        return self.core.full_nbytes()

    def held_tokens(self) -> list[int]:
        return self.core.held_tokens()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.core.layers[layer_idx].seen if layer_idx < self.core.num_layers else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.core.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.core.select_batch(indices)

    def reset(self) -> None:
        self.core.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("memfit caches cannot be cropped (assisted decoding is not supported)")

    def __repr__(self) -> str:
        return f"MemfitCache(method={self.core.method.name}, budget={self.core.budget}, layers={self.core.num_layers})"


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """One forward call; returns logits (B, q, V) (only the last `logits_to_keep` positions if > 0)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": cache is not None}
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(**kwargs).logits


def model_dims(model: torch.nn.Module) -> dict[str, int]:
    """Layer count, heads, KV heads and head dim from the config."""
    config = getattr(model.config, "text_config", model.config)
    heads = int(config.num_attention_heads)
    return {
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", heads) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "max_positions": int(getattr(config, "max_position_embeddings", 0) or 0),
    }


class _StopForward(Exception):
    """Raised by `_LayerProbe` inside a forward to end it early; caught by `run_first_layers`."""


class _LayerProbe(Method):
    """Not a registered method: frees layers below `upto`, captures layer `upto`, then stops the forward."""

    def __init__(self, upto: int) -> None:
        super().__init__()
        self.upto = upto
        self.captured: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float] | None = None

    def after_attention(
        self, cache: CompressedCache, layer: KVLayer, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> None:
        assert layer.keys is not None
        if info.layer_idx < self.upto:  # this pass never decodes: drop the layer's K/V at once
            layer.keep(torch.zeros(*layer.keys.shape[:2], 0, dtype=torch.long, device=layer.keys.device))
            return
        self.captured = (queries, layer.keys, layer.valid, scaling)
        raise _StopForward


def run_first_layers(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, upto: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Run a left-padded prompt through attention layers 0..`upto` only (the rest of the model never runs).

    Returns layer `upto`'s post-RoPE queries (B, H, q, d), its keys (B, Hkv, T, d), their validity (B, Hkv, T) or
    None, and the attention scaling. Lower layers' K/V are freed as soon as they have been used. (GemFilter's
    filter pass.)"""
    layers = num_attention_layers(model)
    if not 0 <= upto < layers:
        raise ValueError(f"layer {upto} out of range: the model has {layers} attention layers")
    install(model)
    probe = _LayerProbe(upto)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        forward(model, input_ids, attention_mask, MemfitCache(CompressedCache(layers, probe)), positions, 1)
    except _StopForward:
        pass
    if probe.captured is None:
        raise RuntimeError(f"the forward ended before attention layer {upto} ran")
    return probe.captured


def sliding_windows(model: torch.nn.Module) -> list[int | None]:
    """Per attention layer: the sliding window (tokens a query may see) of local-attention layers, else None.

    Read from the config's `layer_types` ("sliding_attention" / "full_attention") and `sliding_window`, the fields
    transformers uses for Gemma 3, Mistral, Qwen2 (use_sliding_window) and others."""
    config = getattr(model.config, "text_config", model.config)
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or not types:
        return [None] * layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model.config, "text_config", model.config)
    return str(getattr(config, "model_type", "") or "")
