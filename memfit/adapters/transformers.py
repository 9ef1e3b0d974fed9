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
The section "Fused small operations" gives the fast backend's decode steps fused kernels for transformers' RMSNorm,
rotary and gated-MLP modules, and one matmul for q/k/v and for gate/up (module classes and one module-level function
swapped; inert outside a fused decode step).
The last section ("Weight offload") holds what the weight streamer (`memfit/offload/`) needs to know about a
model's modules: its decoder blocks, their attention/MLP parts, sparse-MoE blocks and the experts' eager loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from memfit.core.cache import CompressedCache, StepInfo, dense_attention
from memfit.core.contract import LayerView, Selection
from memfit.core.method import Method
from memfit.errors import ConfigError

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
    """What transformers' Cache bookkeeping sees of one of our layers.

    It refers to the memfit core, not to its MemfitCache: a reference to the cache would make a cycle (cache ->
    layers -> view -> cache), and a dropped cache in a cycle keeps its stores' tensors until Python's cyclic
    collector next runs a full pass, which on a large heap can be many requests later (issue #11: `memfit serve` ran
    out of GPU memory on the stores of requests that had finished)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: MemfitCache, idx: int) -> None:
        super().__init__()
        self.core, self.idx = owner.core, idx

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.core.layers[self.idx].keys is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:
        pass

    @property
    def batch_size(self) -> int:
        k = self.core.layers[self.idx].keys
        return -1 if k is None else k.shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - MemfitCache.update is used
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.core.layers[self.idx].seen

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
    # Decode steps only: a prompt's forward keeps transformers' operations, so a method scores the same keys and
    # queries (and keeps the same tokens) on both backends; the fused kernels round RMSNorm's sums in another order.
    fused = bool(getattr(getattr(cache, "backend", None), "fused_ops", False)) and input_ids.shape[-1] == 1
    try:
        with fused_ops_active() if fused else contextlib.nullcontext():
            return model(**kwargs).logits
    finally:
        # a forward that raised between a layer's cache update and its attention (out of memory, a probe's early
        # stop) would leave that cache and its new keys/values parked here until the thread's next forward
        _PENDING.set(None)


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
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        assert layer.keys is not None
        if info.layer_idx < self.upto:  # this pass never decodes: drop the layer's K/V at once (keep no slot)
            return Selection(indices=torch.zeros(*layer.keys.shape[:2], 0, dtype=torch.long, device=layer.keys.device))
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


# -- Fused small operations (fast backend) -------------------------------------------------------------------------
# The fast backend replaces three groups of transformers' small operations with one Triton kernel each
# (memfit.kernels.fused_ops): the RMSNorm modules, the gated MLP's silu(gate) * up, and the family's rotary
# `apply_rotary_pos_emb` (a module-level function its attention forward calls by name). They are installed once on a
# model (module classes and the family module's function) but act only inside a forward made under
# `fused_ops_active()` — what `forward()` does for a decode step (one token per row) with a cache whose backend uses
# them — so prompts, the portable path and plain transformers calls keep transformers' own operations.
_FUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("memfit_fused_ops", default=False)
_NORMS = {"LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False, "Qwen3RMSNorm": False,
          "Gemma3RMSNorm": True}  # class -> Gemma-style (1 + weight) scale
_SILU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


class fused_ops_active:  # noqa: N801 - a context manager used like a function
    """Within this block, forwards on the current thread use the fused kernels where installed."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self) -> None:
        self._token = _FUSED.set(self.on)

    def __exit__(self, *exc: object) -> None:
        _FUSED.reset(self._token)


def install_fused_ops(model: torch.nn.Module) -> int:
    """Give `model`'s RMSNorm and SiLU-gated MLP modules, and its family's rotary function, their fused forms
    (idempotent). A module keeps its parameters and state dict: its class becomes a subclass whose `forward` runs
    the fused kernel under `fused_ops_active()` and the original forward otherwise. Returns how many modules have a
    fused form."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_memfit_fused", False):
            count += 1
            continue
        name = cls.__name__
        silu = type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        if name in _NORMS or (name in _SILU_MLPS and silu):
            module.__class__ = _fused_class(cls)
            count += 1
    for module in list(model.modules()):
        for names in _PROJECTION_GROUPS:
            if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
                _group_projections(module, names)
    family = model_type(model).removesuffix("_text")
    if family in _ROTARY_FAMILIES:
        import importlib

        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is not None and not getattr(original, "_memfit_fused", False):
            mod.apply_rotary_pos_emb = _fused_rotary(original)
    return count


_PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def projection_groups(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The sibling layers that read one input (an attention's q/k/v, an MLP's gate/up), per module holding all of a
    group's names: what the weight kernels may stack into one matmul."""
    return [[getattr(module, n) for n in names] for module in model.modules() for names in _PROJECTION_GROUPS
            if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names)]


class _ProjectionGroup:
    """Linear layers that read the same input (an attention's q/k/v, an MLP's gate/up), their weights stored as row
    blocks of one matrix (each layer's weight is a view of it: the weights exist once). Under `fused_ops_active()`
    the first member called computes every member's output with one matmul; the others, called with the same input
    tensor, take their part (a batch-1 decode step then reads the three or two matrices in one kernel instead of
    several small ones, each with its own split-K reduction). The group holds no tensor and only weak references to
    its layers: replacing a layer (say, by a compressed one) frees the old weights as usual."""

    def __init__(self, parent: torch.nn.Module, names: tuple[str, ...]) -> None:
        import weakref

        self.parent = weakref.ref(parent)
        self.names = names
        self.members = [weakref.ref(getattr(parent, n)) for n in names]
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = []

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor | None, list[int]] | None:
        """The group's (weight, bias, rows per layer) as views over the layers' shared storage; None when that no
        longer holds (a `.to()`, a replaced layer): the layers then run on their own."""
        parent = self.parent()
        members = [m() for m in self.members]
        if parent is None or any(m is None or getattr(parent, n) is not m for m, n in zip(members, self.names,
                                                                                        strict=True)):
            return None
        first = members[0].weight
        has_bias = members[0].bias is not None
        # One storage, not only adjacent addresses: after a `.to()` the caching allocator can place the separate
        # new weights back to back, and a view across them would read past the first one's storage.
        storage = first.untyped_storage().data_ptr()
        bias_storage = members[0].bias.untyped_storage().data_ptr() if has_bias else None
        offset, sizes = 0, []
        for m in members:
            w = m.weight
            if (w.dtype != first.dtype or w.device != first.device or w.stride() != first.stride()
                    or w.shape[1] != first.shape[1] or (m.bias is not None) != has_bias
                    or w.untyped_storage().data_ptr() != storage
                    or w.data_ptr() != first.data_ptr() + offset * first.stride(0) * first.element_size()):
                return None
            if has_bias and (m.bias.untyped_storage().data_ptr() != bias_storage or m.bias.data_ptr()
                             != members[0].bias.data_ptr() + offset * first.element_size()):
                return None
            offset += w.shape[0]
            sizes.append(w.shape[0])
        weight = first.as_strided((offset, first.shape[1]), first.stride())
        bias = members[0].bias.as_strided((offset,), (1,)) if has_bias else None
        return weight, bias, sizes

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer `index`'s output for `x`: a part of the group's matmul (computed at the first member's call, taken
        by the others), or None when the group no longer holds (the layer then runs on its own)."""
        if self.input is not x or self.outputs[index] is None:
            fused = self.matrices()
            if fused is None:
                return None
            weight, bias, sizes = fused
            self.input, self.outputs = x, list(F.linear(x, weight, bias).split(sizes, dim=-1))
        out = self.outputs[index]
        self.outputs[index] = None
        if all(o is None for o in self.outputs):
            self.input, self.outputs = None, []
        assert out is not None
        return out


def _group_projections(parent: torch.nn.Module, names: tuple[str, ...]) -> None:
    current = getattr(parent, "_memfit_projections", {}).get(names)
    if current is not None and current.matrices() is not None:
        return
    members = [getattr(parent, n) for n in names]
    weights = [m.weight for m in members]
    biases = [m.bias for m in members]
    first = weights[0]
    if (not all(_plain(w) and w.dtype == first.dtype and w.device == first.device and w.shape[1] == first.shape[1]
                for w in weights) or any((b is None) != (biases[0] is None) for b in biases)
            or any(type(m) not in (torch.nn.Linear, _grouped_linear_class()) for m in members)
            or first.device.type == "meta" or any(hasattr(m, "_hf_hook") for m in (parent, *members))):
        return  # compressed, sharded, offloaded (hooked) or mixed layers keep their own matmuls
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights], dim=0)
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases], dim=0)
    del weights, biases  # the layers' old weights go as soon as they are replaced below
    group = _ProjectionGroup(parent, names)
    offset = 0
    for i, member in enumerate(members):
        size = member.out_features
        member.weight = torch.nn.Parameter(weight[offset:offset + size], requires_grad=False)
        if bias is not None:
            member.bias = torch.nn.Parameter(bias[offset:offset + size], requires_grad=False)
        member.__class__ = _grouped_linear_class()
        member._memfit_group, member._memfit_index = group, i
        offset += size
    parent._memfit_projections = {**getattr(parent, "_memfit_projections", {}), names: group}


_GROUPED_LINEAR: list[type] = []


def _grouped_linear_class() -> type:
    if not _GROUPED_LINEAR:

        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
            group = getattr(self, "_memfit_group", None)
            if _FUSED.get() and group is not None and _plain(x):
                out = group.output(self._memfit_index, x)
                if out is not None:
                    return out
            return torch.nn.Linear.forward(self, x)

        _GROUPED_LINEAR.append(type("Linear", (torch.nn.Linear,), {"forward": forward, "__module__": "torch.nn"}))
    return _GROUPED_LINEAR[0]


_FUSED_CLASSES: dict[type, type] = {}


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor shard or another tensor subclass


def _fused_class(cls: type) -> type:
    if cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls]
    from memfit.kernels import fused_ops

    base_forward = cls.forward
    if cls.__name__ in _NORMS:
        gemma = _NORMS[cls.__name__]

        def forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
            w = self.weight
            if (_FUSED.get() and _plain(w) and _plain(hidden_states) and hidden_states.dtype == w.dtype
                    and hidden_states.device == w.device and hidden_states.shape[-1] == w.shape[-1]):
                eps = float(getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6)))
                return fused_ops.rms_norm(hidden_states, w, eps, offset=gemma)
            return base_forward(self, hidden_states)
    else:

        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[misc]
            if not _FUSED.get():
                return base_forward(self, x)
            gate, up = self.gate_proj(x), self.up_proj(x)
            if gate.shape != up.shape or gate.dtype != up.dtype or not (_plain(gate) and _plain(up)):
                return self.down_proj(self.act_fn(gate) * up)
            return self.down_proj(fused_ops.silu_mul(gate, up))

    fused = type(cls.__name__, (cls,), {"forward": forward, "_memfit_fused": True, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})
    _FUSED_CLASSES[cls] = fused
    return fused


def _fused_rotary(original: Callable) -> Callable:
    from memfit.kernels import fused_ops

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202 - transformers' signature
        if (_FUSED.get() and unsqueeze_dim == 1 and all(_plain(t) for t in (q, k, cos, sin))
                and fused_ops.rotary_supported(q, k, cos, sin)):
            return fused_ops.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._memfit_fused = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


# -- Weight offload ------------------------------------------------------------------------------------------------
# What the weight streamer needs to know about a model's modules:
# - `decoder_layers(model)`: the repeated blocks, in execution order (``model.model.layers`` for every decoder-only
#   architecture transformers 5.x ships: Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE, ...).
# - `layer_parts(layer)`: a block's attention and MLP submodules (TPI-LLM streams these as separate units).
# - `moe_blocks(model)`: for sparse-MoE models, per layer the block, its router and its fused experts module
#   (transformers 5 stores the experts of a layer as 3D tensors ``gate_up_proj`` (E, 2I, h) and ``down_proj``
#   (E, h, I)).
# - `run_experts(...)`: the experts' eager forward (the loop of ``MixtralExperts.forward``) with each expert's
#   weights fetched through a callback, so a streamer can hand in only the experts that are on the device. The
#   arithmetic is the same ops in the same order as transformers' eager loop, so logits are bit-identical.


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM, in order."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None) if base is not None else None
    if layers is None:
        layers = getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"weight offload does not know where the decoder layers of {type(model).__name__} are "
            "(expected model.model.layers); run without --weights-memory"
        )
    return list(layers)


def layer_parts(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """A block's attention and MLP (or sparse-MoE) submodules, in execution order."""
    parts = [getattr(layer, n) for n in ("self_attn", "mlp") if isinstance(getattr(layer, n, None), torch.nn.Module)]
    if len(parts) != 2:
        raise ConfigError(f"{type(layer).__name__} has no self_attn/mlp pair: use --offload-policy superpipeline")
    return parts


@dataclass
class MoEBlock:
    layer: int
    block: torch.nn.Module  # the sparse-MoE block (its forward gets the normed hidden state)
    router: torch.nn.Module  # returns (logits, scores, indices)
    experts: torch.nn.Module  # fused experts: gate_up_proj (E, 2I, h), down_proj (E, h, I)


def _is_fused_experts(m: torch.nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
        and getattr(m, "has_gate", True) and not getattr(m, "has_bias", False)
        and not getattr(m, "is_transposed", False) and getattr(m, "is_concatenated", True)
        and not getattr(m, "has_post_expert_norm", False)
    )


def moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Every sparse-MoE block with fused experts, by layer ([] for dense models)."""
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts, router = getattr(block, "experts", None), getattr(block, "gate", None)
        if isinstance(experts, torch.nn.Module) and isinstance(router, torch.nn.Module) and _is_fused_experts(experts):
            found.append(MoEBlock(i, block, router, experts))
    return found


def set_experts_eager(model: torch.nn.Module) -> None:
    """Use transformers' eager experts loop (the one `run_experts` mirrors) for the resident parts too."""
    cfg = model.config
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and hasattr(c, "_experts_implementation"):
            c._experts_implementation = "eager"


def run_experts(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights_of: Callable[[int, list[int]], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """transformers' eager experts loop; `weights_of(e, hit)` returns expert e's (gate_up (2I, h), down (h, I)) on
    the compute device (`hit` = every expert this call uses, ascending, so a streamer may fetch ahead)."""
    num_experts = int(experts.num_experts)
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = [int(e) for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist() if e != num_experts]
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        gate_up, down = weights_of(e, hit)
        state = hidden_states[token_idx]
        gate, up = F.linear(state, gate_up).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        h = F.linear(h, down)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out
