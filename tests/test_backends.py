"""The fast backend's stores (in their plain-PyTorch form on the CPU) against the portable path, sliding-window
layers (Gemma 3) against transformers' own cache, dummy weights, and the backend's clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DynamicCache

from memfit.api import make_cache
from memfit.core.method import all_methods, build_policy
from memfit.core.static_quant_store import StaticKIVILayer, static_quant_form
from memfit.core.static_store import StaticKVLayer
from memfit.engine import generate, pad_left, positions_from_mask
from memfit.errors import ConfigError
from tests.conftest import TINY, tiny_gemma3, tiny_llama, tiny_qwen

QUANTIZERS = sorted(n for n, c in all_methods().items() if c.family == "quantization")
EVICTING = sorted(n for n, c in all_methods().items() if c.family not in ("quantization", "reference"))
# every registered method, and one composition per quantizer
SPECS = ["full", *EVICTING, *QUANTIZERS, *(f"snapkv+{q}" for q in QUANTIZERS)]


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen, "gemma3": tiny_gemma3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _prompts(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (40, 33)[:batch]]
    return pad_left(rows)


def _budget(spec: str) -> float | None:
    return None if spec in ("full", *QUANTIZERS) else 0.4


def _budget_params(spec: str) -> dict:
    return {"window": 4} if spec.split("+")[0] == "snapkv" else {}


def _run(model, spec: str, backend: str, monkeypatch, batch: int = 2):
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    ids, mask = _prompts(batch)
    params = _budget_params(spec) if spec.split("+")[0] in all_methods() else {}
    cache = make_cache(model, spec, _budget(spec), params, backend=backend, reserve=4)
    gen = generate(model, ids, mask, cache, max_new_tokens=7)
    return cache, gen


@pytest.mark.parametrize("spec", SPECS)
def test_fast_stores_equal_the_portable_path(model, spec, monkeypatch):
    """Same kept tokens (keys, values, validity) per layer and head after prefill + decode, and the same tokens and
    logits, for every method and composition; quantized stores say they fall back."""
    if "+" in spec or spec in QUANTIZERS:
        # KIVI behind a prompt-only eviction has a static form (tests/test_static_quant.py compares it with the
        # portable store); the other quantized stores, and every one on a model with sliding-window layers, fall
        # back and say why
        monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
        cache = make_cache(model, spec, _budget(spec), backend="fast")
        static = static_quant_form(build_policy(spec, _budget(spec))[0]) is not None
        if static and model.config.model_type != "gemma3_text":
            assert cache.backend.name == "fast"
            assert all(isinstance(layer, StaticKIVILayer) for layer in cache.core.layers)
        else:
            assert cache.backend.name == "portable" and "fallback" in cache.backend.reason
        return
    fast_cache, fast = _run(model, spec, "fast", monkeypatch)
    port_cache, port = _run(model, spec, "portable", monkeypatch)
    assert port_cache.backend.name == "portable"
    assert fast_cache.backend.name == "fast"
    assert all(isinstance(layer, StaticKVLayer) for layer in fast_cache.core.layers)
    # the decode went past the reserve of 4 tokens: the buffers grew instead of failing
    assert any(layer.frozen for layer in fast_cache.core.layers)
    assert fast.tokens == port.tokens
    torch.testing.assert_close(fast.first_logits, port.first_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_cache.core.layers, port_cache.core.layers, strict=True):
        assert a.seen == b.seen
        if getattr(a, "fused", False):  # H2O's fused rule: same tokens, in buffer order, + the victim to overwrite
            _assert_same_token_sets(a, b)
            continue
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
        assert (a.valid is None) == (b.valid is None)
        if a.valid is not None:
            assert torch.equal(a.valid, b.valid)
    assert fast_cache.full_nbytes() == port_cache.full_nbytes()


class _Pieces:
    """A tokenizer stand-in for span ids: every 4th id is a digit (digit runs form spans), the others start words."""

    all_special_ids: list[int] = []

    def convert_ids_to_tokens(self, ids):
        return [str(i % 10) if i % 4 == 1 else f"Ġw{i}" for i in ids]


@pytest.mark.parametrize("spec", ["snapkv", "snapkv+kivi"])
def test_fast_stores_with_spans_freeze_and_equal_the_portable_path(spec, monkeypatch):
    """Spans on (the default of `memfit run` for eviction methods): the static stores still take over after the
    prompt (span ids are freed there, so a quantized store is not kept portable by them), and the tokens equal the
    portable path's with the same spans."""
    from memfit.core.spans import SPAN_KEY, enable_spans

    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (1, 48), generator=g)
    mask = torch.ones_like(ids)
    params = {"snapkv.window" if "+" in spec else "window": 4}
    if "kivi" in spec:
        params.update({"kivi.group_size": 8, "kivi.residual": 8})
    runs = {}
    for backend in ("fast", "portable"):
        cache = make_cache(model, spec, 0.5, params, backend=backend, reserve=32)
        enable_spans(cache, _Pieces())
        runs[backend] = (cache, generate(model, ids, mask, cache, max_new_tokens=12))
    (fast_cache, fast), (port_cache, port) = runs["fast"], runs["portable"]
    assert fast_cache.backend.name == "fast"
    assert all(layer.frozen for layer in fast_cache.core.layers)
    assert all(SPAN_KEY not in layer.extras for layer in fast_cache.core.layers)
    assert all(SPAN_KEY in layer.extras for layer in port_cache.core.layers)  # the portable store keeps them
    assert fast.tokens == port.tokens
    torch.testing.assert_close(fast.first_logits, port.first_logits, rtol=1e-5, atol=1e-5)


def _assert_same_token_sets(fast, port) -> None:
    """Per (row, KV head): the fused buffer's live slots (all used slots but the next victim when full) hold exactly
    the portable store's tokens (keys and values), in any order."""
    n = fast.length
    for r in range(port.keys.shape[0]):
        for h in range(port.keys.shape[1]):
            live = torch.ones(n, dtype=torch.bool)
            if n == fast.capacity:
                live[int(fast.slot_hk[r, h])] = False
            fk, fv = fast.keys[r, h][live], fast.values[r, h][live]
            pk, pv = port.keys[r, h], port.values[r, h]
            assert fk.shape == pk.shape
            match = torch.cdist(fk.float(), pk.float()).argmin(dim=1)
            assert sorted(match.tolist()) == list(range(pk.shape[0]))
            # decode-step keys differ by fp32 rounding: the fused step's attention is the reference, not SDPA
            torch.testing.assert_close(fk, pk[match], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fv, pv[match], rtol=1e-5, atol=1e-5)


def test_h2o_fused_rule_is_the_portable_rule(monkeypatch):
    """H2O on the fast backend runs its decode rule inside the store (one pass: write, attend, accumulate, pick the
    victim) and keeps exactly the tokens the portable H2O keeps, step after step."""
    model = tiny_llama()
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    ids, mask = _prompts(1)
    caches = {b: make_cache(model, "h2o", 12, backend=b) for b in ("fast", "portable")}
    gens = {b: generate(model, ids, mask, caches[b], max_new_tokens=15) for b in caches}
    assert gens["fast"].tokens == gens["portable"].tokens
    for a, b in zip(caches["fast"].core.layers, caches["portable"].core.layers, strict=True):
        assert a.fused and a.capacity == 12 + 1 and b.num_slots == 12
        _assert_same_token_sets(a, b)


def test_static_store_holds_its_buffers_and_no_more(monkeypatch):
    """nbytes() of a frozen layer counts the whole preallocated buffer (capacity = kept + reserve), and decoding
    inside the reserve allocates nothing new."""
    model = tiny_llama()
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    ids, mask = _prompts(1)
    cache = make_cache(model, "snapkv", 16, {"window": 4}, backend="fast", reserve=10)
    generate(model, ids, mask, cache, max_new_tokens=6)
    layer = cache.core.layers[0]
    assert layer.frozen and layer.capacity == 16 + 10
    b, h, _, d = layer.keys.shape
    per_slot = 2 * b * h * d * layer.keys.element_size()
    assert layer.nbytes() == per_slot * layer.capacity + 8 + 4 * b  # + the slot counter and row lengths
    assert layer.length == 16 + 5  # 5 decode steps appended (the 6th token is never fed back)
    buffer = layer._kbuf
    generate_more = layer.length
    assert buffer is layer._kbuf and generate_more <= layer.capacity


def test_gemma3_sliding_layers_match_transformers_and_keep_their_window():
    """Unlimited budget on a model with sliding-window layers reproduces transformers' own cache (prompt longer than
    the window, then decoding), and sliding layers hold only window - 1 tokens."""
    model = tiny_gemma3()
    ids, mask = _prompts(1)
    pos = positions_from_mask(mask)
    from memfit.adapters.transformers import _cache_kwarg, forward

    ref_cache = DynamicCache(config=model.config)
    kw = {_cache_kwarg(model): ref_cache}  # `cache` on newer transformers (`past_key_values` is deprecated there)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]
    cache = make_cache(model, "full", backend="portable")

    ours = forward(model, ids, mask, cache, pos, logits_to_keep=1)[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    last = pos[:, -1:]
    for _ in range(4):
        tok = ref.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        last = last + 1
        ref = model(input_ids=tok, attention_mask=mask, position_ids=last, **kw).logits[:, -1]
        ours = forward(model, tok, mask, cache, last, logits_to_keep=1)[:, -1]
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    windows = [layer.window for layer in cache.core.layers]
    assert windows == [8, None, 8, None]
    assert [layer.num_slots for layer in cache.core.layers] == [7, 44, 7, 44]
    assert cache.full_nbytes() < 2 * cache.core.layers[1].nbytes() + 2 * cache.core.layers[0].nbytes() + 1


def test_method_acts_only_on_global_layers_of_gemma3():
    model = tiny_gemma3()
    ids, mask = _prompts(1)
    cache = make_cache(model, "snapkv", 12, {"window": 4}, backend="portable")
    generate(model, ids, mask, cache, max_new_tokens=3)
    held = cache.held_tokens()
    assert held[0] == held[2] == 7  # the window
    assert held[1] == held[3] == 12 + 2  # the budget, then two decoded tokens (snapkv acts on the prompt)


def test_backend_errors(monkeypatch):
    monkeypatch.delenv("MEMFIT_FAST_ON_CPU", raising=False)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        make_cache(model, "snapkv", 0.5, backend="fast")
    with pytest.raises(ConfigError, match="unknown --backend"):
        make_cache(model, "snapkv", 0.5, backend="turbo")
    assert make_cache(model, "snapkv", 0.5).backend.name == "portable"  # auto on a CPU
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ConfigError, match="does not support the 'gpt2' architecture"):
        make_cache(gpt2, "snapkv", 0.5, backend="fast")
    assert make_cache(gpt2, "snapkv", 0.5, backend="auto").backend.name == "portable"


def test_dummy_configs_build_the_architecture():
    from memfit.dummy import BUILTIN_CONFIGS, dummy_config

    cfg = dummy_config("llama-3.1-8b")
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
    assert dummy_config("qwen2.5-7b").model_type == "qwen2"
    assert set(BUILTIN_CONFIGS) >= {"llama-3.1-8b", "qwen2.5-7b", "gemma-3-1b"}
    with pytest.raises(ConfigError, match="unknown config 'llama-9000'"):
        dummy_config("llama-9000")


def test_dummy_load_runs_a_generated_context(tmp_path):
    import json

    from memfit.engine import run

    cfg = dict(TINY, model_type="llama")
    cfg.pop("attn_implementation")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = run("", model=str(tmp_path), method="snapkv", budget=0.5, load_format="dummy", context=64,
                 max_new_tokens=3)
    assert result.prompt_tokens == 64 and result.backend == "portable"
    assert result.kv_bytes_held < result.kv_bytes_full


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "fast", "--prompt", "hi"], "needs a CUDA device"),
        (["--backend", "warp", "--prompt", "hi"], "unknown --backend"),
        (["--load-format", "dummy", "--model", "no-such-config", "--prompt", "hi"], "unknown config"),
        (["--load-format", "zip", "--prompt", "hi"], "unknown --load-format"),
        (["--context", "100", "--prompt", "hi"], "not both"),
    ],
)
def test_cli_backend_errors(args, message, monkeypatch, capsys):
    from memfit.cli import main

    monkeypatch.delenv("MEMFIT_FAST_ON_CPU", raising=False)
    monkeypatch.setattr(sys, "argv", ["memfit", "run", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["full", "snapkv", "h2o", "streaming", "gemfilter"])
def test_fast_backend_on_cuda_matches_portable(spec):
    """On a GPU: the fast backend (static buffers, Triton decode attention, CUDA graphs where the method allows)
    generates what the portable path generates, within bf16 rounding."""
    model = tiny_llama().to("cuda", torch.bfloat16)
    ids, mask = _prompts(1)
    runs = {}
    for backend in ("fast", "portable"):
        cache = make_cache(model, spec, None if spec == "full" else 0.5, _budget_params(spec), backend=backend,
                           reserve=80)
        runs[backend] = (cache, generate(model, ids, mask, cache, max_new_tokens=80))
    fast_cache, fast = runs["fast"]
    port_cache, port = runs["portable"]
    assert fast_cache.backend.name == "fast"
    assert fast_cache.backend.graphs == (spec in ("full", "snapkv", "gemfilter", "h2o"))
    if fast_cache.backend.graphs:
        assert fast.graph_replays == 80 - 2  # step 1 eager, step 2 captured + replayed, the rest replayed
        assert fast.setup_steps == 2 and 0 < fast.setup_seconds < fast.decode_seconds
        assert fast.steady_tokens_per_second is not None
    else:
        assert fast.setup_steps == 0 and fast.steady_tokens_per_second is None
    torch.testing.assert_close(fast.first_logits, port.first_logits, rtol=2e-2, atol=2e-2)
    # greedy paths part for good at the first bf16 near-tie: compare the first 12 tokens
    agree = sum(a == b for a, b in zip(fast.tokens[0][:12], port.tokens[0][:12], strict=True)) / 12
    assert agree >= 0.75, (fast.tokens, port.tokens)
    assert fast_cache.held_tokens() == port_cache.held_tokens()


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["kivi", "snapkv+kivi"])
def test_fast_kivi_on_cuda_matches_portable(spec):
    """On a GPU: KIVI's static store (packed codes + full-precision ring, the Triton KIVI kernel, flushes as masked
    writes) decodes in a CUDA graph and generates what the portable quantized store generates, within bf16 rounding,
    holding the same tokens (the portable store's bytes = the static store's used bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.core.static_quant_store import StaticKIVILayer

    torch.manual_seed(0)  # head dim 64: the kernel's tested shapes (G = 32)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, head_dim=64))).eval().to("cuda", torch.bfloat16)
    ids, mask = _prompts(1)
    kivi = {"group_size": 32, "residual": 32}  # 40-token prompt + 80 tokens: key flushes at 64 and 96
    params = kivi if spec == "kivi" else {"snapkv.window": 4, **{f"kivi.{k}": v for k, v in kivi.items()}}
    runs = {}
    for backend in ("fast", "portable"):
        cache = make_cache(model, spec, None if spec == "kivi" else 0.5, params, backend=backend, reserve=80)
        runs[backend] = (cache, generate(model, ids, mask, cache, max_new_tokens=80))
    fast_cache, fast = runs["fast"]
    port_cache, port = runs["portable"]
    assert fast_cache.backend.name == "fast" and fast_cache.backend.graphs
    assert fast.graph_replays == 80 - 2
    assert all(isinstance(layer, StaticKIVILayer) and layer.frozen for layer in fast_cache.core.layers)
    torch.testing.assert_close(fast.first_logits, port.first_logits, rtol=2e-2, atol=2e-2)
    agree = sum(a == b for a, b in zip(fast.tokens[0][:12], port.tokens[0][:12], strict=True)) / 12
    assert agree >= 0.75, (fast.tokens, port.tokens)
    assert fast_cache.held_tokens() == port_cache.held_tokens()
    assert sum(layer.used_nbytes() for layer in fast_cache.core.layers) == port_cache.nbytes()
    for layer in fast_cache.core.layers:  # the graph's device counters and the host mirrors agree
        assert (int(layer.t_dev), int(layer.qk_dev), int(layer.qv_dev)) == (layer.length, layer.qk, layer.qv)
