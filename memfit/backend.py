"""Which runtime backend serves a run: `fast` or `portable` (`--backend auto|fast|portable`, `backend=` in the API).

- portable: any transformers causal LM, any device. The cache's stores grow and shrink as dense tensors
  (`memfit.core.cache`), attention is SDPA.
- fast: CUDA, architectures whose decoder layers we have checked (the Llama family incl. Mistral and SmolLM2, the
  Qwen2/Qwen3 family, Gemma 3). After the prompt, each layer's tokens live in a preallocated buffer sized to what the
  method kept plus the tokens to decode (`memfit.core.static_store`), single-token attention runs memfit's split-K
  Triton kernel, and when the method never acts during decoding (SnapKV, GemFilter, WindowKV, KVzip, the full
  cache...) the decode step is captured once in a CUDA graph and replayed.
  KIVI (alone or behind an eviction that acts on the prompt only, e.g. snapkv+kivi) keeps packed codes and a
  full-precision ring in fixed buffers (`memfit.core.static_quant_store`), attends in the Triton KIVI kernel and
  decodes in a CUDA graph too. On CUDA the decode steps also run the layers' small operations fused
  (`memfit.kernels.fused_ops`: RMSNorm, rotary embedding, the gated MLP's activation; q/k/v and gate/up read as one
  matrix each), installed by `memfit.adapters.transformers.install_fused_ops`; prompts keep transformers' own
  operations, so a method keeps the same tokens on both backends. Stores that have no static form yet — GEAR,
  VidKV, KIVI behind an eviction during decoding, and the ragged per-head store (AdaKV allocation) — run on the
  portable path, and the run says so (`backend_reason` in `--json`).

`auto` picks fast on CUDA for a supported architecture, else portable. `MEMFIT_FAST_ON_CPU=1` lets the fast stores run
on the CPU in their plain-PyTorch form (tests compare them with the portable path there; no kernels, no graphs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from memfit.errors import ConfigError

MIN_GRAPH_STEPS = 64  # decode steps below which recording a CUDA graph does not pay (memfit.graphs)

BACKENDS = ("auto", "fast", "portable")
FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class Backend:
    name: str  # "fast" | "portable"
    reason: str  # why this backend (and why not the other)
    graphs: bool = False  # decode steps replayed from a CUDA graph
    fused_ops: bool = False  # RMSNorm, rotary and the MLP's activation run fused (memfit.kernels.fused_ops)
    decode_free: bool = False  # fast stores whose method never acts while decoding (a step = append, attend, flush)

    def to_dict(self) -> dict[str, object]:
        return {"backend": self.name, "backend_reason": self.reason, "cuda_graphs": self.graphs,
                "fused_ops": self.fused_ops}


def check_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise ConfigError(f"unknown --backend {requested!r}: use auto, fast or portable")
    return requested


def fast_on_cpu() -> bool:
    return os.environ.get("MEMFIT_FAST_ON_CPU", "0") == "1"


def choose_backend(
    requested: str,
    model: torch.nn.Module,
    *,
    dense_store: bool,
    decode_free: bool,
    static_quantized: bool = False,
    sliding: bool,
    decode_steps: int | None = None,
    graph_safe: bool = True,
) -> Backend:
    """Decide the backend for one cache. `dense_store`: the method's layers are the dense store (not quantized or
    ragged); `static_quantized`: its quantized store has a static form (KIVI: memfit.core.static_quant_store);
    `decode_free`: the method never evicts while decoding; `sliding`: the model has sliding-window layers.

    `--backend fast` where it cannot run at all (no CUDA, an architecture we have not checked) is a ConfigError; where
    only the method's store lacks a static form, the run falls back to portable and says why."""
    from memfit.adapters.transformers import model_type

    check_backend(requested)
    if requested == "portable":
        return Backend("portable", "asked for (--backend portable)")
    device = next(model.parameters()).device
    kind = model_type(model)
    if device.type != "cuda" and not fast_on_cpu():
        if requested == "fast":
            raise ConfigError("--backend fast needs a CUDA device (its kernels and CUDA graphs are GPU-only): use "
                              "--device cuda on a machine with a GPU, or --backend portable")
        return Backend("portable", "auto: no CUDA device")
    if kind not in FAST_MODEL_TYPES:
        if requested == "fast":
            raise ConfigError(f"--backend fast does not support the {kind or 'unknown'!r} architecture yet (supported: "
                              f"{', '.join(FAST_MODEL_TYPES)}): use --backend portable or auto")
        return Backend("portable", f"auto: architecture {kind!r} has no fast path")
    if not dense_store and not static_quantized:
        return Backend("portable", "fallback: this method's store has no static form on the fast backend yet (GEAR, "
                                   "VidKV, KIVI behind an eviction during decoding or with 1-bit or mixed key/value "
                                   "bits, the ragged per-head store)")
    on_gpu = device.type == "cuda"
    if requested == "auto" and on_gpu and not decode_free:
        # measured (benchmarks/results/runtime_h200.jsonl): eager static stores that evict every step (compaction
        # copies, no graph) decode slower than the portable path, so auto keeps those methods portable
        return Backend("portable", "auto: the method evicts during decoding and has no fused static rule (the fast "
                                   "backend would run it eagerly, slower than portable)")
    if on_gpu and not graph_safe:  # e.g. compressed linear layers (memfit.weights) that sync with the host
        if requested == "auto":
            return Backend("portable", "auto: a module of the model cannot run inside a CUDA graph (compressed "
                                       "weights), and without one the portable path is faster")
        return Backend("fast", "asked for; no CUDA graph: a module of the model cannot run inside one")
    if requested == "auto" and on_gpu and decode_steps is not None and decode_steps <= MIN_GRAPH_STEPS:
        # measured on an H200 (benchmarks/results/backend_agreement_h200.jsonl, the bench's 12-48-token answers):
        # without a graph the static stores decode slower than the portable path
        return Backend("portable", f"auto: {decode_steps} decode steps are too few for a CUDA graph, and without "
                                   "one the portable path is faster")
    graphs = on_gpu and decode_free and not sliding
    why = "CUDA, supported architecture" if on_gpu else "MEMFIT_FAST_ON_CPU=1 (plain-PyTorch form of the fast stores)"
    if on_gpu and not graphs:
        why += "; no CUDA graph: " + ("sliding-window layers trim every step" if sliding
                                      else "the method evicts during decoding")
    return Backend("fast", why, graphs, fused_ops=on_gpu and fused_ops_enabled(), decode_free=decode_free)


def fused_ops_enabled() -> bool:
    """The fast backend fuses the layers' small operations on CUDA (memfit.kernels.fused_ops) unless
    MEMFIT_FUSED_OPS=0 (for A/B measurements: benchmarks/decode_step_profile.py)."""
    from memfit import kernels

    return os.environ.get("MEMFIT_FUSED_OPS", "1") != "0" and kernels.available()
