"""`memfit plan`: what fits in N bytes, predicted from the model's config alone (no weights are loaded).

The model is built on PyTorch's meta device from its config (so every parameter's shape and the offload units are
exactly those of the real model), then:

- **weights**: bytes at the run dtype, and per weight bit width (16/8/4/3/2: the decoder's linear weights at b bits
  plus an fp16 scale and zero point per group of 128; embeddings, norms and head at 16 bits);
- **KV cache** under a method and budget, with the byte formulas of the stores: dense K/V (B, Hkv, T, d) per layer;
  eviction keeps the budget (prefill-only methods then append the decoded tokens); H2O adds its fp32 score per
  token; KIVI-style quantized stores hold per-channel key groups (codes + fp16 scale + zero per G tokens and
  channel), per-token value groups (codes + fp16 scale + zero per G channels) and a full-precision residual,
  flushed by the store's own rule (simulated step by step). These are *exact* for full, eviction methods that hold
  their budget every step (snapkv, streaming, h2o, windowkv) and KIVI alone or after a prefill-only eviction
  (tests/test_plan.py compares them with `cache.nbytes()`); anything else is marked as an estimate;
- **activations** of one forward over a prefill chunk (hidden states, MLP intermediates, q/k/v, the attention
  scores on CPU, the KV append's transient copy of one layer);
- **weight streaming**: the device bytes of `memfit.offload.layout` (resident units + the window) when the weights
  do not fit;
- **runtime**: on CPU the peak is the process's RSS, so the predicting process's own RSS (Python, torch,
  transformers, memfit imported) is added; on CUDA the peak is the allocator's, which counts tensors only.

`plan()` enumerates KV methods x prefill chunks (x weight streaming when needed), keeps what fits, and sorts by a
rough decode-time model: bytes read per token / memory bandwidth + bytes streamed per token / link bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit.errors import ConfigError
from memfit.units import current_rss

__all__ = ["ModelShape", "Prediction", "kv_bytes", "model_shape", "plan", "predict"]

WEIGHT_BITS = (16, 8, 4, 3, 2)
QUANT_GROUP = 128  # weight quantization group for the bit-width table
# rough bandwidths for ranking only (bytes/s): device memory, and the link streamed weights cross
_BANDWIDTH = {"cuda": (3.0e12, 25e9), "cpu": (20e9, 2e9)}
# KV configurations `memfit plan` tries: (method, budget, params)
KV_CHOICES: tuple[tuple[str, str | None, dict[str, str]], ...] = (
    ("full", None, {}),
    ("kivi", None, {"kivi.bits": "4"}),
    ("kivi", None, {}),
    ("snapkv", "0.5", {}),
    ("snapkv", "0.25", {}),
    ("snapkv+kivi", "0.25", {}),
    ("snapkv", "0.125", {}),
    ("snapkv+kivi", "0.125", {}),
)
CHUNKS: tuple[int | None, ...] = (None, 2048, 512)
_EXACT = {"full", "snapkv", "streaming", "h2o", "windowkv"}
# CPU peaks are process RSS: what a run allocates besides tensors after the baseline was taken (tokenizer, allocator
# arenas, thread pools). Calibrated on the default model (2-core box): measured peak minus weights, KV, activations
# and the pre-load RSS was 28-60 MiB at 512-2048 tokens.
CPU_OVERHEAD = 64 * 2**20


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class ModelShape:
    name: str
    config: Any
    model: torch.nn.Module  # on the meta device
    dtype: torch.dtype
    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    weight_bytes: int  # parameters + buffers at `dtype`

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_moe(self) -> bool:
        from memfit.adapters.transformers import moe_blocks

        return bool(moe_blocks(self.model))


def _config(spec: str) -> tuple[Any, str]:
    from memfit.dummy import BUILTIN_CONFIGS, dummy_config

    text = (spec or "default").strip()
    if text == "default":
        from memfit.models import _hf_ready, default_model_path

        folder = default_model_path()
        if _hf_ready(folder):
            return dummy_config(str(folder)), "default"
        return dummy_config("smollm2-135m"), "default"
    if text.lower() in BUILTIN_CONFIGS or Path(text).expanduser().exists():
        return dummy_config(text), text
    raise ConfigError(f"memfit plan reads the model's config only: --model {text!r} is neither 'default', a built-in "
                      f"config ({', '.join(sorted(BUILTIN_CONFIGS))}) nor a local folder / config.json")


def model_shape(spec: str | Any, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """The model of `spec` ('default', a built-in config name, a local folder or config.json, or a transformers
    config object) built on the meta device at `dtype`: exact parameter shapes, no memory."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, str):
        config, name = _config(spec)
    else:
        config, name = spec, getattr(spec, "_name_or_path", "") or type(spec).__name__
    text = getattr(config, "text_config", config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    inter = getattr(text, "intermediate_size", None) or getattr(text, "moe_intermediate_size", 0)
    return ModelShape(name, config, model, dtype, int(text.num_hidden_layers),
                      int(getattr(text, "num_key_value_heads", None) or heads), head_dim, heads,
                      int(text.hidden_size), int(inter), int(text.vocab_size), int(wbytes))


def weight_bytes_by_bits(shape: ModelShape) -> dict[int, int]:
    """Weight bytes per bit width: decoder linear weights (2D/3D inside the layers) at b bits plus an fp16 scale and
    zero point per group of 128 values; everything else at 16 bits."""
    from memfit.adapters.transformers import decoder_layers

    in_layers = {id(p) for layer in decoder_layers(shape.model) for p in layer.parameters() if p.dim() >= 2}
    linear = sum(p.numel() for p in shape.model.parameters() if id(p) in in_layers)
    rest = sum(p.numel() for p in shape.model.parameters() if id(p) not in in_layers)
    out = {}
    for b in WEIGHT_BITS:
        lin = linear * 2 if b == 16 else math.ceil(linear * b / 8) + math.ceil(linear / QUANT_GROUP) * 4
        out[b] = int(lin + rest * 2)
    return out


# ------------------------------------------------------------------------------------------------ KV cache


def _sidestore_bytes(side: Any, appended: list[int], batch: int, heads: int, d: int, elem: int) -> int:
    """Bytes of a KIVI-style SideStore after blocks of `appended` tokens (one flush check after each)."""
    from memfit.core.quant import bytes_per_group
    from memfit.core.quantized_store import ChannelCodec, TokenCodec

    codec, rule = side.codec, side.flush_rule
    r = quantized = 0
    for n in appended:
        r += n
        f = rule.count(r)
        quantized += f
        r -= f
    sb = torch.empty((), dtype=codec.scale_dtype).element_size()
    g, bits = codec.group_size, codec.bits
    if isinstance(codec, ChannelCodec):  # per channel, groups of G tokens
        groups = quantized // g
        qbytes = batch * heads * d * groups * (bytes_per_group(bits, g) + 2 * sb)
    elif isinstance(codec, TokenCodec):  # per token, groups of G channels
        qbytes = batch * heads * quantized * (d // g) * (bytes_per_group(bits, g) + 2 * sb)
    else:
        raise TypeError(type(codec).__name__)
    return qbytes + batch * heads * r * d * elem


@dataclass
class KVPrediction:
    bytes: int
    held_tokens: int  # per layer and row, after the run
    exact: bool
    full_bytes: int


def kv_bytes(
    shape: ModelShape, method: str = "full", budget: str | float | int | None = None,
    params: dict[str, Any] | None = None, prompt_tokens: int = 1024, new_tokens: int = 0, batch: int = 1,
    kv_dtype: torch.dtype | None = None, spans: bool = False,
) -> KVPrediction:
    """Bytes the cache holds after a prompt of `prompt_tokens` (every row this long: no padding) and `new_tokens`
    decode steps fed back (a run generating m tokens feeds m - 1). `spans`: the cache keeps span ids
    (memfit.core.spans: int16 per held slot and KV head)."""
    from memfit.core.budget import Budget
    from memfit.core.cache import KVLayer
    from memfit.core.method import build_policy
    from memfit.core.quantized_store import ChannelCodec, QuantizedKVLayer, TokenCodec

    policy, factory = build_policy(method, budget, params)
    elem = torch.empty((), dtype=kv_dtype or shape.dtype).element_size()
    B, H, d, L = batch, shape.kv_heads, shape.head_dim, shape.layers
    T, n = prompt_tokens, new_tokens
    keep = Budget.parse(budget).resolve(T) if policy.acts != "never" else None
    if keep is None or keep >= T + n and policy.acts != "prefill":
        blocks, held = [T] + [1] * n, T + n
    elif policy.acts == "prefill":
        kept = min(T, keep)
        blocks, held = [kept] + [1] * n, kept + n
    else:  # evicts during decoding too: holds its budget
        held = min(T + n, keep)
        blocks = [held]  # (dense stores only: the quantized path below marks this an estimate)
    names = [p.strip() for p in method.split("+")]
    exact = names[0] in _EXACT or (names[0] == "kivi" and len(names) == 1)
    layer = factory(0)
    full = 2 * B * H * (T + n) * d * elem * L
    if type(layer) is KVLayer:
        per = 2 * B * H * held * d * elem
        if names[0] == "h2o":
            per += B * H * held * 4  # fp32 accumulated attention per held token
        if spans:
            per += B * H * held * 2  # int16 span id per held slot
        exact = exact and len(names) == 1 and names[0] in _EXACT
        return KVPrediction(per * L, held, exact, full)
    if isinstance(layer, QuantizedKVLayer) and isinstance(layer.k.codec, ChannelCodec) \
            and isinstance(layer.v.codec, TokenCodec):
        per = _sidestore_bytes(layer.k, blocks, B, H, d, elem) + _sidestore_bytes(layer.v, blocks, B, H, d, elem)
        if spans:
            per += B * H * held * 2  # int16 span id per held slot
        exact = exact and (len(names) == 1 or policy.acts == "prefill" or keep is None)
        return KVPrediction(per * L, held, exact, full)
    # other quantizers: a rough bits-per-value estimate from the method's "bits" parameter
    bits = float(getattr(layer, "bits", None) or (params or {}).get("bits", 4))
    per = int(2 * B * H * held * d * (bits / 8 + 4 / 32))
    return KVPrediction(per * L, held, False, full)


# ------------------------------------------------------------------------------------------------ activations


def activation_bytes(shape: ModelShape, chunk: int, context: int, batch: int, device: str) -> int:
    """Transient bytes of one forward over `chunk` new tokens attending to `context` keys."""
    e, B, c = shape.elem, batch, chunk
    hidden = 4 * B * c * shape.hidden * e  # residual stream, normed input, attention output, MLP output
    mlp = 3 * B * c * shape.intermediate * e  # gate, up, their product
    qkv = B * c * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * e
    scores = B * shape.heads * c * context * 4 if device == "cpu" and c > 1 else 0  # CPU SDPA: (c x T) fp32
    kv_copy = 2 * 2 * B * shape.kv_heads * context * shape.head_dim * e  # torch.cat copies one layer's K and V
    logits = B * shape.vocab * 4 * 2
    return int(hidden + mlp + qkv + scores + kv_copy + logits)


def runtime_bytes(device: str) -> int:
    """What the process holds besides tensors, as peak memory counts it: the current RSS on CPU, 0 on CUDA."""
    return current_rss() if device == "cpu" else 0


# ------------------------------------------------------------------------------------------------ one prediction


@dataclass
class Prediction:
    method: str
    budget: str | None
    params: dict[str, str]
    prefill_chunk: int | None
    weights_memory: int | None  # --weights-memory (None: every weight resident)
    offload_policy: str | None
    weight_device_bytes: int
    weight_host_bytes: int  # streamed weights held in CPU memory (cpu tier)
    kv_bytes: int
    kv_exact: bool
    activation_bytes: int
    runtime_bytes: int
    peak_bytes: int
    decode_seconds_per_token: float  # rough ranking model
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(
    shape: ModelShape, *, method: str = "full", budget: str | None = None, params: dict[str, Any] | None = None,
    prompt_tokens: int, new_tokens: int = 0, batch: int = 1, prefill_chunk: int | None = None,
    weights_memory: int | None = None, offload_policy: str = "auto", offload_dir: bool = False,
    device: str = "cpu", runtime: int | None = None, spans: bool | None = None,
) -> Prediction:
    """Predicted peak memory of one run (weights + KV + activations + runtime) on `device` ('cpu' or 'cuda').
    `spans`: whether the cache keeps span ids; None = `memfit run`'s default (memfit.core.spans.spans_default)."""
    from memfit.core.spans import resolve_spans
    from memfit.offload import layout

    kv = kv_bytes(shape, method, budget, params, prompt_tokens, new_tokens, batch,
                  spans=resolve_spans(spans, method, budget))
    chunk = min(prompt_tokens, prefill_chunk or prompt_tokens)
    act = activation_bytes(shape, chunk, prompt_tokens, batch, device)
    w_dev, w_host, streamed, policy = shape.weight_bytes, 0, 0, None
    if weights_memory is not None and weights_memory < shape.weight_bytes:
        policy = offload_policy
        if policy == "auto":
            policy = "pregated" if shape.is_moe else "tpi" if offload_dir else "superpipeline"
        lay = layout(shape.model, policy, weights_memory)
        w_dev = lay.device_bytes
        streamed_bytes = sum(lay.unit_sizes[lay.resident:])
        disk = offload_dir or policy == "tpi"
        w_host = 0 if disk else streamed_bytes
        streamed = streamed_bytes
        if policy in ("pregated", "ondemand"):  # about top-k of E experts move per token (fewer with hits)
            text = getattr(shape.config, "text_config", shape.config)
            e = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", 1)
            streamed = streamed_bytes * int(getattr(text, "num_experts_per_tok", 1)) // max(1, int(e))
    rt = runtime_bytes(device) if runtime is None else runtime
    if device == "cpu":
        rt += CPU_OVERHEAD
    # on CPU the host tier is the same memory as the device
    peak = rt + w_dev + kv.bytes + act + (w_host if device == "cpu" else 0)
    mem_bw, link_bw = _BANDWIDTH["cuda" if device.startswith("cuda") else "cpu"]
    # a quantized cache is dequantized to full precision for attention (portable path): it reads its packed bytes,
    # then writes and reads the full-size K/V of the held tokens
    dequant = 2 * kv.full_bytes * kv.held_tokens // max(1, prompt_tokens + new_tokens) if "kivi" in method else 0
    step = (w_dev + kv.bytes + dequant) / mem_bw + streamed / link_bw
    return Prediction(method, None if budget is None else str(budget), dict(params or {}), prefill_chunk,
                      weights_memory if policy else None, policy, w_dev, w_host, kv.bytes, kv.exact, act, rt,
                      int(peak), step)


# ------------------------------------------------------------------------------------------------ the plan


def _command(model: str, p: Prediction, context: int, batch: int, device: str, dtype: str, new_tokens: int) -> str:
    from memfit.offload import format_bytes as fb

    parts = ["memfit run", f"--model {model}"]
    if model not in ("default",) and not Path(model).exists():
        parts.append("--load-format dummy")
    parts += [f"--device {device}", f"--dtype {dtype}", f"--method {p.method}"]
    if p.budget is not None:
        parts.append(f"--budget {p.budget}")
    parts += [f"--param {k}={v}" for k, v in p.params.items()]
    if p.prefill_chunk:
        parts.append(f"--prefill-chunk {p.prefill_chunk}")
    if p.weights_memory is not None:
        parts.append(f"--weights-memory {fb(p.weights_memory).replace(' ', '')}")
        if p.offload_policy == "tpi":
            parts.append("--offload-dir /tmp/memfit-offload")
    parts.append(f"--context {context}")  # `memfit run` feeds one row; the prediction is for `batch` rows
    parts.append(f"--max-new-tokens {new_tokens}")
    return " ".join(parts)


@dataclass
class Plan:
    model: str
    memory: int
    context: int
    batch: int
    device: str
    dtype: str
    weights_bytes: int
    weights_by_bits: dict[int, int]
    fits: list[Prediction]
    rejected: int
    minimum: Prediction | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = [p.to_dict() for p in self.fits]
        d["minimum"] = self.minimum.to_dict() if self.minimum else None
        return d


def plan(
    model: str, memory: int, context: int, batch: int = 1, device: str = "cpu", dtype: str = "auto",
    new_tokens: int = 64, offload_dir: bool = False,
) -> Plan:
    """Every KV method x prefill chunk (x weight streaming when needed) that fits in `memory` bytes, fastest first.
    Raises ConfigError naming the minimum and the configuration that reaches it when nothing fits."""
    from memfit.models import resolve_dtype
    from memfit.offload import format_bytes as fb

    dev = "cuda" if device.startswith("cuda") or device == "auto" and torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == "auto" and dev == "cuda" else torch.float32 if dtype == "auto" else \
        resolve_dtype(dtype, "cpu")
    dtype_name = str(tdtype).removeprefix("torch.")
    if context < 1 or batch < 1:
        raise ConfigError("--context and --batch must be positive")
    shape = model_shape(model, tdtype)
    rt = runtime_bytes(dev)
    fits: list[Prediction] = []
    best: Prediction | None = None
    rejected = 0
    for method, budget, params in KV_CHOICES:
        for chunk in CHUNKS:
            if chunk is not None and chunk >= context:
                continue
            kw = dict(method=method, budget=budget, params=params, prompt_tokens=context,
                      new_tokens=max(0, new_tokens - 1), batch=batch, prefill_chunk=chunk, device=dev, runtime=rt)
            p = predict(shape, **kw)
            if p.peak_bytes > memory:  # stream the weights: give them what is left
                from memfit.offload import layout

                policy = "pregated" if shape.is_moe else "tpi" if offload_dir else "superpipeline"
                lay_min = None
                try:
                    lay_min = layout(shape.model, policy, shape.weight_bytes - 1).minimum
                except ConfigError:
                    pass
                left = memory - (p.peak_bytes - p.weight_device_bytes - (p.weight_host_bytes if dev == "cpu" else 0))
                if dev == "cpu" and not offload_dir:  # streamed weights stay in RAM: only the disk tier saves it
                    policy = "tpi"
                try:
                    q = predict(shape, weights_memory=max(left, lay_min or 1), offload_policy=policy,
                                offload_dir=policy == "tpi", **kw)
                except ConfigError:
                    q = None
                if q is not None:
                    p = q
            if best is None or p.peak_bytes < best.peak_bytes:
                best = p
            if p.peak_bytes <= memory:
                p.command = _command(model, p, context, batch, dev, dtype_name, new_tokens)
                fits.append(p)
            else:
                rejected += 1
    fits.sort(key=lambda p: (round(p.decode_seconds_per_token, 6), p.prefill_chunk is not None, p.peak_bytes))
    result = Plan(shape.name, memory, context, batch, dev, dtype_name, shape.weight_bytes,
                  weight_bytes_by_bits(shape), fits, rejected, best)
    if not fits:
        assert best is not None
        best.command = _command(model, best, context, batch, dev, dtype_name, new_tokens)
        raise ConfigError(
            f"--memory {fb(memory)} is below the smallest configuration memfit can run for {shape.name} at "
            f"{context} tokens (batch {batch}, {dtype_name} on {dev}): it needs {fb(best.peak_bytes)} "
            f"(weights on the device {fb(best.weight_device_bytes)}, KV {fb(best.kv_bytes)}, activations "
            f"{fb(best.activation_bytes)}, runtime {fb(best.runtime_bytes)}). That minimum is reached by: "
            f"{best.command}. Give --memory {fb(best.peak_bytes)} or more, or a shorter --context / smaller --batch."
        )
    return result


def predict_run(
    model: torch.nn.Module, *, method: str, budget: Any, params: dict[str, Any] | None, prompt_tokens: int,
    new_tokens: int, batch: int, prefill_chunk: int | None, offload: Any = None, spans: bool = False,
) -> Prediction:
    """The prediction `memfit run --json` reports beside its measured peak: the same formulas as `memfit plan`,
    from the loaded model's config (built again on the meta device) and the run's own settings."""
    dev = "cuda" if any(p.device.type == "cuda" for p in model.parameters()) else "cpu"
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    shape = model_shape(model.config, dtype)
    from memfit import models

    baseline = getattr(models, "runtime_baseline", None)
    rt = (baseline() if baseline is not None else runtime_bytes("cpu")) if dev == "cpu" else 0
    p = predict(shape, method=method, budget=None if budget is None else str(budget), params=params,
                prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch, prefill_chunk=prefill_chunk,
                weights_memory=None if offload is None else offload.budget,
                offload_policy="auto" if offload is None else offload.policy,
                offload_dir=offload is not None and offload.stats.extra.get("tier") == "disk", device=dev,
                runtime=rt, spans=spans)
    return p
