"""Admission by real bytes: predict a request's compressed KV bytes before it runs, and keep the pool's books.

Prediction. A request's cache ends up holding `kept` tokens per layer: the budget resolved from its prompt length
(`Budget.resolve`, capped at the prompt) plus every token it generates (we do not assume a decode-time method keeps
its budget during decode, so for H2O/StreamingLLM the prediction is an upper bound by at most `max_tokens` tokens).
What one held token costs depends on the store (dense K/V, policy scores, packed bits + scales, a full-precision
residual window), so we do not model each store by hand: once per (method, params) we drive a throw-away
`CompressedCache` of the model's shape (layers, KV heads, head dim, dtype) with random keys, values and queries at
six sizes, read `nbytes()`, and fit `bytes = intercept + slope * kept` (the slope between two sizes 512 tokens apart
at the same phase of a 128-token window; the intercept, which absorbs residual windows and fixed buffers, is the
smallest that puts the line on or above every point). No model weights
are involved, so calibrating costs milliseconds.

The fit is an upper estimate: for a quantizer with a block residual the intercept is a whole full-precision window
(128 tokens), so short prompts are over-predicted by up to that window; a residual longer than 128 tokens
(`kivi.residual=256`) can be under-predicted, which the scheduler's preemption absorbs.

During a chunked prefill a store may briefly hold its kept tokens plus one chunk at full precision before the
policy evicts, so a request reserves max(final prediction, (kept + chunk) tokens at the full-cache rate).

The pool. `--kv-memory` bytes are shared by the running requests; each running request counts
max(its reservation, what its cache holds now). A request is admitted when its reservation fits what is left.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from memfit.core.budget import Budget
from memfit.core.cache import CompressedCache
from memfit.core.method import build_policy, evicts

# Calibration points: tokens kept after the decode steps (eviction methods get a prompt twice as long and a budget
# of half of it, so eviction runs). Their phases modulo 128 spread from 10 to 127, so stores that quantize in blocks
# (KIVI's residual of 128) are seen nearly empty and completely full; the first and last share a phase.
_CAL_KEPT = (127, 266, 424, 582, 612, 639)
_CAL_LAYERS = 2  # stores are per layer and alike: drive two layers and scale to the model's count
_CAL_DECODE = 8  # decode steps after each calibration prefill


@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_positions: int

    @property
    def full_bytes_per_token(self) -> int:
        """Keys + values of one token over every layer in an uncompressed cache."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        from memfit.adapters.transformers import model_dims

        d = model_dims(model)
        dtype = next(model.parameters()).dtype
        return cls(d["layers"], d["heads"], d["kv_heads"], d["head_dim"], dtype, d["max_positions"])


@dataclass(frozen=True)
class ByteModel:
    """bytes(kept) = intercept + slope * kept, fitted on a throw-away cache (see module docstring)."""

    slope: float
    intercept: float
    keeps_all: bool  # the method kept every token in calibration (full cache or a quantizer alone)


def _drive(shape: ModelShape, method: str, budget: Budget, params: dict[str, Any], prompt: int, seed: int) -> tuple[int, int]:
    """Prefill `prompt` random tokens and decode a few through every layer; returns (kept tokens, nbytes)."""
    policy, factory = build_policy(method, budget, params)
    core = CompressedCache(_CAL_LAYERS, policy, factory)
    gen = torch.Generator().manual_seed(seed)
    scaling = shape.head_dim**-0.5

    def step(q_len: int) -> None:
        for layer in range(_CAL_LAYERS):
            k = torch.randn(1, shape.kv_heads, q_len, shape.head_dim, generator=gen).to(shape.dtype)
            v = torch.randn(1, shape.kv_heads, q_len, shape.head_dim, generator=gen).to(shape.dtype)
            q = torch.randn(1, shape.heads, q_len, shape.head_dim, generator=gen).to(shape.dtype)
            core.step(layer, k, v, q, scaling, None)

    step(prompt)
    for _ in range(_CAL_DECODE):
        step(1)
    kept = min(prompt, budget.resolve(prompt) or prompt) + _CAL_DECODE
    return kept, core.nbytes()


class BytePredictor:
    """Predicts a request's compressed KV bytes; calibrates each (method, params) once and remembers it."""

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape
        self._models: dict[tuple[str, str], ByteModel] = {}
        self._lock = threading.Lock()  # calibrations come from the server's worker threads

    def byte_model(self, method: str, params: dict[str, Any]) -> ByteModel:
        key = (method, repr(sorted(params.items())))
        with self._lock:
            return self._models.get(key) or self._calibrate(key, method, params)

    def _calibrate(self, key: tuple[str, str], method: str, params: dict[str, Any]) -> ByteModel:
        keeps_all = not evicts(method)  # the full cache or a quantizer alone: no budget applies
        points = []
        for i, target in enumerate(_CAL_KEPT):
            held = target - _CAL_DECODE
            n, budget = (held, Budget()) if keeps_all else (2 * held, Budget(tokens=held))
            kept, nbytes = _drive(self.shape, method, budget, params, n, seed=i)
            points.append((kept, nbytes * self.shape.layers / _CAL_LAYERS))
        # the slope between the first and last points (same phase, four windows apart, so block effects cancel),
        # then the smallest intercept that puts the line on or above every point
        (k0, b0), (k1, b1) = points[0], points[-1]
        slope = (b1 - b0) / (k1 - k0)
        intercept = max(0.0, *(b - slope * k for k, b in points))
        found = self._models[key] = ByteModel(slope, intercept, keeps_all)
        return found

    def kept_tokens(self, method: str, budget: Budget, params: dict[str, Any], prompt: int, max_tokens: int) -> int:
        keep = prompt if self.byte_model(method, params).keeps_all else min(prompt, budget.resolve(prompt) or prompt)
        return keep + max_tokens

    def span_bytes_per_token(self) -> int:
        """What keeping whole spans adds per held token (memfit.core.spans: one int16 per layer and KV head)."""
        return 2 * self.shape.kv_heads * self.shape.layers

    def predict(self, method: str, budget: Budget, params: dict[str, Any], prompt: int, max_tokens: int,
                spans: bool = False) -> int:
        """Bytes the request's cache will hold after `max_tokens` generated tokens (an upper estimate)."""
        m = self.byte_model(method, params)
        slope = m.slope + (self.span_bytes_per_token() if spans else 0)
        return int(m.intercept + slope * self.kept_tokens(method, budget, params, prompt, max_tokens))

    def reserve(
        self, method: str, budget: Budget, params: dict[str, Any], prompt: int, max_tokens: int, chunk: int,
        spans: bool = False,
    ) -> int:
        """What to set aside at admission: the final prediction, or the prefill transient if that is larger."""
        final = self.predict(method, budget, params, prompt, max_tokens, spans)
        keep = self.kept_tokens(method, budget, params, prompt, 0)
        per_token = self.shape.full_bytes_per_token + (self.span_bytes_per_token() if spans else 0)
        transient = min(prompt, keep + chunk) * per_token
        return max(final, transient)
