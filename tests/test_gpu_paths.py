"""Every method, composition and allocation on CUDA (marker `gpu`; skipped without CUDA).

The CPU matrix (test_core, test_quant_methods) proves the invariants; this file proves that the same code runs on a
GPU without a stray CPU tensor or dtype mix-up, in the dtypes GPU users run (bf16 cache; fp32 for exactness), and
that the bench measures on CUDA. Run: `python -m pytest -m gpu tests/test_gpu_paths.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import held_tensors
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.api import make_cache
from memfit.core.method import all_methods
from memfit.engine import generate, pad_left

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

QUANTIZERS = sorted(n for n, c in all_methods().items() if c.family == "quantization")
EVICTING = sorted(n for n, c in all_methods().items() if c.family not in ("quantization", "reference"))
COMPOSED = ["snapkv+kivi", "h2o+gear", "streaming+vidkv", "scissorhands+kivi", "windowkv+kivi"]
# head_dim 64 (Llama-3 uses 128, SmolLM2 64): the quantizers' default group sizes divide it
CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    attn_implementation="sdpa",
)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval().to("cuda", dtype)


@pytest.fixture(scope="module")
def bf16_model() -> torch.nn.Module:
    return _model(torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_model() -> torch.nn.Module:
    return _model(torch.float32)


def _batch(lengths: tuple[int, ...] = (400, 290), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, mask = pad_left([torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths])
    return ids.cuda(), mask.cuda()


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor reachable from the cache's layers."""
    return list(held_tensors(list(cache.core.layers)).values())


@pytest.mark.parametrize("method", EVICTING + QUANTIZERS + COMPOSED)
def test_method_runs_on_cuda_and_holds_fewer_bytes(bf16_model, method):
    ids, mask = _batch()
    budget = None if method in QUANTIZERS else 0.25
    cache = make_cache(bf16_model, method, budget, {"kivi.residual": 32} if method.endswith("+kivi") else None)
    with torch.no_grad():
        gen = generate(bf16_model, ids, mask, cache, 12, [])
    assert all(len(t) == 12 for t in gen.tokens)
    assert 0 < cache.nbytes() < cache.full_nbytes(), (cache.nbytes(), cache.full_nbytes())
    held = _cache_tensors(cache)
    assert held, "the cache holds no tensors"
    assert all(t.device.type == "cuda" for t in held), sorted({str(t.device) for t in held})
    assert gen.peak_memory_bytes > 0


@pytest.mark.parametrize("method", EVICTING)
def test_unlimited_budget_is_exact_on_cuda(fp32_model, method):
    """fp32 on CUDA: an unlimited budget reproduces the full cache's greedy tokens and (near-)equal logits."""
    ids, mask = _batch((300, 211))
    with torch.no_grad():
        ref = generate(fp32_model, ids, mask, make_cache(fp32_model, "full", None), 8, [])
        out = generate(fp32_model, ids, mask, make_cache(fp32_model, method, None), 8, [])
    assert out.tokens == ref.tokens
    torch.testing.assert_close(out.first_logits, ref.first_logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("allocation", ["pyramid", "adakv", "pyramid+adakv"])
def test_allocations_on_cuda(bf16_model, allocation):
    ids, mask = _batch()
    uniform = make_cache(bf16_model, "snapkv", 0.25)
    cache = make_cache(bf16_model, "snapkv", 0.25, allocation=allocation)
    with torch.no_grad():
        generate(bf16_model, ids, mask, uniform, 6, [])
        generate(bf16_model, ids, mask, cache, 6, [])
    assert cache.nbytes() <= uniform.nbytes() * 1.01
    assert all(t.device.type == "cuda" for t in _cache_tensors(cache))


def test_chunked_prefill_on_cuda(bf16_model):
    ids, mask = _batch((1024,))
    whole = make_cache(bf16_model, "snapkv", 0.25)
    chunked = make_cache(bf16_model, "snapkv", 0.25)
    with torch.no_grad():
        a = generate(bf16_model, ids, mask, whole, 4, [])
        b = generate(bf16_model, ids, mask, chunked, 4, [], 256)
    assert b.peak_memory_bytes <= a.peak_memory_bytes
    assert chunked.nbytes() <= whole.nbytes()


def test_bench_measures_on_cuda(tmp_path):
    from memfit.bench.runner import run_bench
    from memfit.bench.testing import toy_tokenizer

    tok = toy_tokenizer()
    torch.manual_seed(0)
    cfg = dict(CONFIG, vocab_size=len(tok))
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to("cuda", torch.bfloat16)
    result = run_bench(
        (model, tok), methods=["snapkv", "kivi", "snapkv+kivi"], budgets=[0.25], tasks=["niah_single_number", "fidelity"],
        context=256, samples=2, out=tmp_path, model_name="tiny-cuda", progress=False, max_new_tokens=4,
        task_options={"fidelity": {"continuation_tokens": 8}},
    )
    rows = [r for r in result.rows if r["method"] != "full"]
    assert rows and not any(r["device"].startswith("cpu") for r in result.rows)
    assert all(r["kv_bytes_held"] < r["kv_bytes_full"] for r in rows)
    assert all(r["peak_memory_bytes"] > 0 for r in result.rows)
