"""The method base class, its parameter handling and the registry.

A method is a small dataclass: its fields are its parameters (with the official defaults), class attributes say
which paper it implements and when it acts, and `after_attention` is the policy: called for every attention layer
after the layer attended, it gets a read-only view of the layer and the layer's budget (`StepInfo.keep`), may score
tokens, and returns what to keep (`Selection`, memfit.core.contract); the runtime (memfit.core.cache) applies it.
A method never sees the cache nor changes a store itself. Methods never import each other; shared logic (scoring,
selection, protection) lives in `memfit.core`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memfit.core.budget import Budget
from memfit.core.contract import Decision, LayerView, StepInfo
from memfit.core.store import KVLayer
from memfit.errors import ConfigError

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Method:
    """Base policy: keeps everything. Subclasses add parameter fields and override `after_attention`."""

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    family: ClassVar[str] = ""  # eviction | quantization | reference ...
    acts: ClassVar[str] = ""  # prefill | decode | prefill+decode
    summary: ClassVar[str] = ""
    # whether `after_attention` can score a layer whose KV heads hold different tokens (AdaKV's ragged store)
    ragged_heads: ClassVar[bool] = True
    # whether `after_attention` reads each prompt query's log-sum-exp (`info.lse`): the cache then runs the prompt's
    # attention in a kernel that returns it, where one can (CUDA flash attention over an unpadded one-shot prompt)
    prefill_lse: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.budget = Budget()
        self.validate()

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, budget: Budget | float | int | str | None = None, params: dict[str, Any] | None = None) -> Method:
        """Build with a budget and user parameters (strings from the CLI are converted to the field types)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in (params or {}).items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise ConfigError(f"unknown parameter {key!r} for method {cls.name!r} (known: {known})")
            kwargs[key] = _convert(raw, hints.get(key, str), f"{cls.name}.{key}")
        method = cls(**kwargs)
        method.budget = Budget.parse(budget)
        return method

    def validate(self) -> None:
        """Raise ConfigError on bad parameter values."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        params = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            params[f.name] = {"default": default, "type": getattr(hints.get(f.name), "__name__", str(hints.get(f.name)))}
        return {
            "name": cls.name,
            "paper": cls.paper,
            "arxiv": cls.arxiv,
            "family": cls.family,
            "acts": cls.acts,
            "summary": cls.summary,
            "params": params,
        }

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- policy --------------------------------------------------------------------------------------------------
    def after_attention(self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo) -> Decision:
        """Called after each attention layer attended (global layers only): `layer` is what the store holds (this
        call's tokens are its last `info.q_len` slots), `queries` (B, H, q, d) this call's post-RoPE queries,
        `info.keep` the layer's budget per row (None = unlimited: keep everything). Return a `Selection` (what to
        keep, per-token state to store), {layer index: Selection} for a decision over several layers, or None.
        Default: keep everything."""
        return None

    def select_prompt(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Called by the runtime before prefill (`num_layers`: the model's attention layers): return shorter
        left-padded (input_ids, attention_mask) to prefill instead of the prompt (GemFilter), or None (default) to
        prefill the prompt as given. Budgets still resolve from the original prompt."""
        return None

    def after_prefill(
        self,
        model: torch.nn.Module,
        layers: Sequence[LayerView],
        keep_rows: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> Decision:
        """Called by the runtime once the whole prompt is cached (the ids and mask it prefilled), with every
        layer's view and the rows' budgets (B,) before any layer schedule (None = unlimited): a method that scores
        with extra forward passes over the prompt (KVzip) returns {layer index: Selection} here (each layer's own
        budget applies). Default: nothing."""
        return None

    def static_decode_rule(self) -> dict[str, Any] | None:
        """The rule this method applies at every decode step, as data a static store can run itself (the fast
        backend fuses it into one kernel pass and a CUDA graph), or None. Known rules: {"rule": "accumulated",
        "score_key": ..., "recent_fraction": ...} (H2O: evict the lowest accumulated-attention token outside the
        recent window). A store that runs the rule marks itself `fused`; `after_attention` then skips decode steps."""
        return None

    def reset(self) -> None:
        """Forget per-sequence state (a new prompt starts)."""

    def make_layer(self, index: int) -> KVLayer:
        """The empty store for attention layer `index`: dense by default; quantizers return a quantized store."""
        return KVLayer(index)


def protect_mask(layer: LayerView | KVLayer, sinks: int = 0, recent: int | torch.Tensor = 0) -> torch.Tensor | None:
    """(B, Hkv, T) bool: the first `sinks` real tokens of each row and its last `recent` slots (an int, or a (B,)
    tensor for per-row windows — e.g. a share of each row's own budget)."""
    if isinstance(recent, torch.Tensor):
        recent_rows = recent.to(layer.keys.device).long()
    else:
        recent_rows = None if recent <= 0 else torch.full((layer.keys.shape[0],), recent, device=layer.keys.device)
    if sinks <= 0 and recent_rows is None:
        return None
    valid = layer.valid_mask()
    mask = torch.zeros_like(valid)
    if recent_rows is not None:
        t = valid.shape[-1]
        slot = torch.arange(t, device=valid.device)
        mask |= (slot[None, :] >= t - recent_rows[:, None])[:, None, :]
    if sinks > 0:
        order = valid.long().cumsum(-1)
        mask |= valid & (order <= sinks)
    return mask


def recent_valid(valid: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T) bool: the last `recent[b]` *valid* slots of each row — counted over real tokens, so placeholder
    slots of a short row never use up its recent window (`protect_mask` counts trailing slots instead)."""
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)
    return valid & (from_end <= recent.to(valid.device)[:, None, None])


def _convert(raw: Any, typ: Any, where: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        typ = args[0] if args else str
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"parameter {where}: {raw!r} is not a valid {typ.__name__}") from None
    return raw


class Composed(Method):
    """`<eviction>+<quantizer>` (e.g. snapkv+kivi): the eviction policy decides which tokens stay, the quantizer's
    store holds them in fewer bits. Everything policy-related (budget, after_attention, select_prompt...) is the
    eviction method's; `make_layer` is the quantizer's. Not registered: built by `build_policy`."""

    family = "composed"

    def __init__(self, evictor: Method, quantizer: Method) -> None:  # no dataclass fields of its own
        self.evictor = evictor
        self.quantizer = quantizer
        self.name = f"{evictor.name}+{quantizer.name}"  # type: ignore[misc]
        self.acts = evictor.acts  # type: ignore[misc]

    @property  # type: ignore[override]
    def budget(self) -> Budget:
        return self.evictor.budget

    @budget.setter
    def budget(self, value: Budget) -> None:
        self.evictor.budget = value
        self.quantizer.budget = value

    def __getattr__(self, attr: str) -> Any:  # anything else a caller asks of "the policy" is the evictor's
        if attr in ("evictor", "quantizer") or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.evictor, attr)

    def after_attention(self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo) -> Decision:
        return self.evictor.after_attention(layer, queries, scaling, info)

    @property  # type: ignore[override]
    def prefill_lse(self) -> bool:  # a class attribute of Method would hide the evictor's from __getattr__
        return bool(self.evictor.prefill_lse)

    def select_prompt(self, *args: Any, **kwargs: Any) -> Any:  # GemFilter-style prompt selection: the evictor's
        return self.evictor.select_prompt(*args, **kwargs)

    def after_prefill(self, *args: Any, **kwargs: Any) -> Decision:  # KVzip-style scoring passes: the evictor's
        return self.evictor.after_prefill(*args, **kwargs)

    def reset(self) -> None:
        self.evictor.reset()
        self.quantizer.reset()

    def make_layer(self, index: int) -> KVLayer:
        return self.quantizer.make_layer(index)

    def params(self) -> dict[str, Any]:
        return {f"{m.name}.{k}": v for m in (self.evictor, self.quantizer) for k, v in m.params().items()}


KEEP_ALL_FAMILIES = ("quantization", "reference")
"""Families whose methods keep every token: a token budget means nothing to a spec made only of them."""


def evicts(spec: str) -> bool:
    """Whether `spec` (a method or `<eviction>+<quantizer>`) has a component that drops tokens."""
    return any(get_method(n.strip()).family not in KEEP_ALL_FAMILIES for n in spec.split("+"))


def build_policy(
    spec: str,
    budget: Budget | float | int | str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[Method, Callable[[int], KVLayer]]:
    """Parse a method spec and build (policy, layer factory) for `CompressedCache`.

    spec: one method name (`snapkv`, `kivi`), or `<eviction>+<quantizer>` (`snapkv+kivi`): at most one eviction (or
    reference) method, first, then at most one quantizer (family "quantization"). A quantizer alone keeps every token
    (like `full`; a budget does not apply to it). params: `component.key=value` (`kivi.bits=2`) or a plain `key` when
    exactly one component has that parameter. Every error is a ConfigError naming the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty method name (see `memfit methods`)")
    names = [part.strip() for part in spec.split("+")]
    if any(not n for n in names):
        raise ConfigError(f"method {spec!r} has an empty component: write <eviction>+<quantizer>, e.g. snapkv+kivi")
    classes = [get_method(n) for n in names]
    if len(names) > 1:
        quant = [n for n, c in zip(names, classes, strict=True) if c.family == "quantization"]
        if len(names) > 2 or len(quant) != 1 or classes[-1].family != "quantization":
            if len(quant) > 1:
                why = f"it has {len(quant)} quantizers ({', '.join(quant)}); use one"
            elif not quant:
                why = "it has no quantizer: eviction methods do not stack"
            elif len(names) > 2:
                why = "only one eviction method can come before the quantizer"
            else:
                why = f"the quantizer ({quant[0]}) must come last"
            raise ConfigError(f"cannot compose {spec!r}: {why}. Write <eviction>+<quantizer>, e.g. snapkv+kivi")
    routed: list[dict[str, Any]] = [{} for _ in names]
    fields = [{f.name for f in dataclasses.fields(c)} for c in classes]
    for key, value in (params or {}).items():
        if "." in key:
            comp, _, sub = key.partition(".")
            if comp not in names:
                raise ConfigError(f"parameter {key!r} names {comp!r}, which is not part of method {spec!r} "
                                  f"(components: {', '.join(names)})")
            routed[names.index(comp)][sub] = value
            continue
        owners = [i for i, f in enumerate(fields) if key in f]
        if len(owners) > 1:
            options = " or ".join(f"{names[i]}.{key}" for i in owners)
            raise ConfigError(f"parameter {key!r} is ambiguous in {spec!r}: qualify it as {options}")
        if not owners and len(names) > 1:
            known = ", ".join(f"{n}.{k}" for n, f in zip(names, fields, strict=True) for k in sorted(f)) or "none"
            raise ConfigError(f"unknown parameter {key!r} for method {spec!r} (known: {known})")
        routed[owners[0] if owners else 0][key] = value
    if not any(c.family not in KEEP_ALL_FAMILIES for c in classes) and not Budget.parse(budget).unlimited:
        # silently ignoring the budget would report "budget=0.25" for a cache that evicted nothing
        hint = (f"compose an eviction method in front, e.g. snapkv+{names[0]}" if classes[0].family == "quantization"
                else "pick an eviction method (see `memfit methods`)")
        raise ConfigError(f"method {names[0]!r} keeps every token, so a token budget does not apply to it "
                          f"(got {budget}): drop the budget, or {hint}")
    methods = [c.create(budget, p) for c, p in zip(classes, routed, strict=True)]
    policy = methods[0] if len(methods) == 1 else Composed(methods[0], methods[1])
    return policy, policy.make_layer


def get_method(name: str) -> type[Method]:
    import memfit.methods  # noqa: F401  (registers the built-in methods)

    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def all_methods() -> dict[str, type[Method]]:
    import memfit.methods  # noqa: F401

    return dict(sorted(REGISTRY.items()))
