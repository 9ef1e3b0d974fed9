"""Weight methods: the base class, the registry, ``NAME[:BITS][:KEY=VALUE...]`` specs, and `quantize_model`.

A weight method is a small dataclass (fields = parameters with the official defaults) whose `compress` turns one
``nn.Linear`` (plus, for calibrated methods, its input statistics) into a `CompressedLinear`. `quantize_model`
replaces every linear layer of a model except its output head, block by block when the method calibrates.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.units import return_freed_memory
from memfit.weights.calibrate import (
    BlockForward,
    LinearStats,
    calibration_ids,
    calibration_text,
    quantize_blockwise,
    set_module,
    target_linears,
    untie_head,
)
from memfit.weights.format import CompressedLinear, check_bits, check_group_size

WEIGHT_METHODS: dict[str, type[WeightMethod]] = {}


def register_weight_method(cls: type[WeightMethod]) -> type[WeightMethod]:
    if cls.name in WEIGHT_METHODS and WEIGHT_METHODS[cls.name] is not cls:
        raise ValueError(f"weight method {cls.name!r} registered twice")
    WEIGHT_METHODS[cls.name] = cls
    return cls


@dataclass
class WeightMethod:
    """Base: subclasses set the class attributes, add parameter fields and implement `compress`."""

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    family: ClassVar[str] = "weights"
    summary: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False  # needs input statistics (runs `quantize_blockwise`)

    def needs_calibration(self) -> bool:
        """Whether this configuration uses input statistics (a method may use them only with some settings)."""
        return self.calibrated

    # also compress the output head (``:head=true``). Off by default, as GPTQ, AWQ and HQQ leave it: it sees every
    # logit. llama.cpp's Q4_K_M keeps it at 6 bits; at batch-1 decode of an 8B model its bf16 bytes are ~22 % of
    # what a 4-bit step reads. A head tied to the input embeddings gets its own compressed copy (`untie_head`).
    head: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if hasattr(self, "bits"):
            check_bits(self.bits)
        if hasattr(self, "group_size"):
            check_group_size(self.group_size)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on bad parameter values."""

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        raise NotImplementedError

    def refine_block(
        self, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, forward: BlockForward
    ) -> None:
        """Optional recovery step of calibrated methods, called by `quantize_blockwise` once every linear of one
        decoder block is compressed: train the block in place so ``forward(inputs[rows], rows)`` approaches
        ``targets[rows]`` (the full-precision block's output on those inputs). Default: nothing (GQSA's BQPO
        overrides it). Runs under ``torch.no_grad()``: enable gradients locally."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        defaults = type(self)()  # type: ignore[call-arg]
        extra = [f"{k}={v}" for k, v in self.params().items() if k != "bits" and v != getattr(defaults, k)]
        bits = [str(self.bits)] if hasattr(self, "bits") else []
        return ":".join([self.name, *bits, *extra])

    @classmethod
    def describe(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        params = {
            f.name: {"default": f.default, "type": getattr(hints.get(f.name), "__name__", str(hints.get(f.name)))}
            for f in dataclasses.fields(cls)
        }
        return {
            "name": cls.name,
            "paper": cls.paper,
            "arxiv": cls.arxiv,
            "family": cls.family,
            "acts": "load (weights)",
            "summary": cls.summary,
            "params": params,
        }

    @classmethod
    def create(cls, params: dict[str, Any] | None = None) -> WeightMethod:
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in (params or {}).items():
            if key not in fields:
                raise ConfigError(
                    f"unknown parameter {key!r} for weight method {cls.name!r} (known: {', '.join(sorted(fields))})"
                )
            kwargs[key] = _convert(raw, hints.get(key, str), f"{cls.name}.{key}")
        return cls(**kwargs)


def _convert(raw: Any, typ: Any, what: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return typ(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={raw!r} is not a valid {getattr(typ, '__name__', typ)}") from None


def weight_methods() -> dict[str, type[WeightMethod]]:
    import memfit.weights.methods  # noqa: F401  (registers the methods)

    return dict(WEIGHT_METHODS)


def parse_weight_spec(spec: str, params: dict[str, Any] | None = None) -> WeightMethod | None:
    """``"slim-llm:3"``, ``"gqsa:4:sparsity=0.5"``, ``"rtn"`` (its default bits) -> a method; ``"none"``/empty ->
    None. ``params`` (e.g. from ``--param``) override the spec's."""
    text = (spec or "").strip()
    if text.lower() in ("", "none", "fp", "full"):
        return None
    name, *rest = text.split(":")
    methods = weight_methods()
    if name not in methods:
        raise ConfigError(f"unknown weight method {name!r} (known: {', '.join(sorted(methods))}, or none)")
    kwargs: dict[str, Any] = {}
    for i, part in enumerate(rest):
        if "=" in part:
            key, value = part.split("=", 1)
            kwargs[key.strip()] = value.strip()
        elif i == 0:
            kwargs["bits"] = part.strip()
        else:
            raise ConfigError(f"weight spec {spec!r}: use NAME[:BITS][:KEY=VALUE...], e.g. slim-llm:3 or gqsa:4:sparsity=0.5")
    if "bits" in kwargs:
        if "bits" not in {f.name for f in dataclasses.fields(methods[name])}:
            raise ConfigError(f"weight method {name!r} takes no bits (see `memfit methods` for its parameters)")
        try:
            kwargs["bits"] = int(kwargs["bits"])
        except ValueError:
            raise ConfigError(f"weight spec {spec!r}: bits must be an integer from 1 to 8") from None
        check_bits(kwargs["bits"])
    kwargs.update(params or {})
    return methods[name].create(kwargs)


def quantize_model(
    model: nn.Module,
    method: WeightMethod | str,
    *,
    tokenizer: Any = None,
    calib_file: str | Path | None = None,
    calib_tokens: int = 512,
    calib_seq_len: int = 256,
    calib_ids: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Replace every linear layer except the output head (and the head too with the method's ``head=True``) by the
    method's `CompressedLinear` (in place). Calibrated
    methods need the tokenizer; they read ``calib_file`` (default: the standard library's pydoc prose), or take
    ready token ids ``calib_ids`` ``(rows, seq_len)``."""
    m = parse_weight_spec(method) if isinstance(method, str) else method
    if m is None:
        return model
    targets = target_linears(model, head=m.head)
    if m.head:
        untie_head(model)
    if m.needs_calibration():
        if calib_ids is not None:
            ids = calib_ids
        elif tokenizer is None:
            raise ConfigError(f"weight method {m.name!r} calibrates on text: pass the tokenizer")
        else:
            ids = calibration_ids(tokenizer, calibration_text(calib_file), calib_tokens, calib_seq_len)
        quantize_blockwise(model, ids, lambda _n, lin, st: m.compress(lin, st), progress, refine=m.refine_block)
        # linears outside the decoder blocks (rare) get no statistics: compress them uncalibrated
        targets = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n in targets}
    names = list(targets)
    for i, name in enumerate(names):
        set_module(model, name, m.compress(targets.pop(name), None))  # drop our reference: the dense weight is freed
        return_freed_memory()  # the layer's temporaries: otherwise the peak RSS grows layer after layer
        if progress is not None:
            progress(f"layer {i + 1}/{len(names)}")
    model.memfit_weights = m.spec()  # type: ignore[assignment]
    return model


def linear_weight(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 weight and the bias (kept in its dtype) of a linear layer."""
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return linear.weight.detach().float(), bias
