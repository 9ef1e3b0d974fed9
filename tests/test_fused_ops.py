"""The fast backend's fused small operations (memfit.kernels.fused_ops) against transformers' own modules.

Without CUDA the kernels run in Triton's CPU interpreter (small shapes); with CUDA the same checks run on the GPU
(`-m gpu`). Each kernel must give what the unfused operations give, to within one rounding of the dtype (the row
sums of RMSNorm reduce in another order); the model-level tests check that installing the fused forms changes
nothing outside `fused_ops_active()` and keeps the logits inside it."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from memfit.adapters.transformers import forward, fused_ops_active, install_fused_ops
from tests.conftest import tiny_gemma3, tiny_llama, tiny_qwen
from tests.test_kernels import _DEVICES, interpreter_dtype  # noqa: F401 (the fixture is used by name)


@pytest.fixture(params=_DEVICES)
def setup(request: pytest.FixtureRequest) -> tuple[str, torch.dtype]:
    if request.param == "interpret":
        dtype = request.getfixturevalue("interpreter_dtype")  # sets TRITON_INTERPRET=1 first
        import memfit.kernels.fused_ops as mod

        if type(mod._rms_norm_kernel).__name__ != "InterpretedFunction":
            importlib.reload(mod)  # defined under TRITON_INTERPRET=1 (the fixture set it)
        return "cpu", dtype
    return "cuda", torch.bfloat16


def _ulps(dtype: torch.dtype) -> dict[str, float]:
    eps = torch.finfo(dtype).eps
    return {"rtol": eps, "atol": eps}  # one rounding of the dtype


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_equals_transformers(setup, gemma: bool) -> None:
    from memfit.kernels import fused_ops

    dev, dtype = setup
    torch.manual_seed(0)
    hidden = 96  # not a power of two: the row is masked
    norm = (Gemma3RMSNorm(hidden, eps=1e-6) if gemma else LlamaRMSNorm(hidden, eps=1e-5)).to(dev, dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, hidden, device=dev, dtype=dtype) * 3
    eps = norm.eps if gemma else norm.variance_epsilon
    out = fused_ops.rms_norm(x, norm.weight, eps, offset=gemma)
    ref = norm(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **_ulps(dtype))
    # the weight matters: a kernel that skipped it would fail here
    assert not torch.allclose(out, fused_ops.rms_norm(x, torch.ones_like(norm.weight), eps, offset=gemma))


@pytest.mark.parametrize("batch,cos_rows", [(1, 1), (2, 2), (2, 1)])
def test_rotary_equals_transformers(setup, batch: int, cos_rows: int) -> None:
    from memfit.kernels import fused_ops

    dev, dtype = setup
    torch.manual_seed(1)
    n, hq, hk, d = 3, 4, 2, 16
    # the projections' layout: (B, n, H, d) viewed as (B, H, n, d), not contiguous
    q = torch.randn(batch, n, hq, d, device=dev, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, n, hk, d, device=dev, dtype=dtype).transpose(1, 2)
    angles = torch.randn(cos_rows, n, d // 2, device=dev)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    assert fused_ops.rotary_supported(q, k, cos, sin)
    out_q, out_k = fused_ops.rotary(q, k, cos, sin)
    ref_q, ref_k = modeling_llama.apply_rotary_pos_emb.__wrapped__(q, k, cos, sin) if hasattr(
        modeling_llama.apply_rotary_pos_emb, "__wrapped__") else modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q, **_ulps(dtype))
    torch.testing.assert_close(out_k, ref_k, **_ulps(dtype))
    assert out_q.stride() == q.stride()  # the layout the attention code received before


def test_silu_mul_equals_torch(setup) -> None:
    from memfit.kernels import fused_ops

    dev, dtype = setup
    torch.manual_seed(2)
    gate = torch.randn(3, 1500, device=dev, dtype=dtype) * 4  # more than one block, a partial last block
    up = torch.randn(3, 1500, device=dev, dtype=dtype)
    torch.testing.assert_close(fused_ops.silu_mul(gate, up), F.silu(gate) * up, **_ulps(dtype))


def test_append_kv_equals_the_plain_ops(setup) -> None:
    """The fused decode append writes what two `index_copy_` and two `add_` write, advances the counters once per
    call (twice here: the ticket counter resets) and touches no other slot."""
    from memfit.kernels import fused_ops

    dev, dtype = setup
    torch.manual_seed(0)
    b, h, cap, d = 3, 2, 10, 32
    kbuf, vbuf = (torch.randn(b, h, cap, d, device=dev).to(dtype) for _ in range(2))
    want_k, want_v = kbuf.clone(), vbuf.clone()
    slot = torch.tensor([4], device=dev)
    lengths = torch.full((b,), 4, dtype=torch.int32, device=dev)
    want_slot, want_lengths = slot.clone(), lengths.clone()
    done = torch.zeros(1, dtype=torch.int32, device=dev)
    for _ in range(2):
        # as transformers hands them over: (B, 1, H, d) projections transposed to (B, H, 1, d)
        k = torch.randn(b, 1, h, d, device=dev).to(dtype).transpose(1, 2)
        v = torch.randn(b, 1, h, d, device=dev).to(dtype).transpose(1, 2)
        assert fused_ops.append_kv_supported(kbuf, vbuf, k, v)
        fused_ops.append_kv(kbuf, vbuf, k, v, slot, lengths, done)
        want_k.index_copy_(2, want_slot, k)
        want_v.index_copy_(2, want_slot, v)
        want_slot.add_(1)
        want_lengths.add_(1)
    assert torch.equal(kbuf, want_k) and torch.equal(vbuf, want_v)
    assert torch.equal(slot, want_slot) and torch.equal(lengths, want_lengths) and int(done) == 0
    assert not fused_ops.append_kv_supported(kbuf, vbuf, k.float() if dtype != torch.float32 else k.half(), v)
    fused_ops.append_kv(kbuf, vbuf, k, v, slot)  # without counters (the KIVI store moves its own): writes only
    want_k.index_copy_(2, want_slot, k)
    want_v.index_copy_(2, want_slot, v)
    assert torch.equal(kbuf, want_k) and torch.equal(vbuf, want_v) and torch.equal(slot, want_slot)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen, tiny_gemma3], ids=["llama", "qwen2", "gemma3"])
def test_installed_model_keeps_its_logits(setup, build, monkeypatch) -> None:
    from memfit.kernels import fused_ops

    dev, dtype = setup
    model = build().to(dev, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    calls = {"rms_norm": 0, "rotary": 0, "silu_mul": 0}
    for name in calls:
        def spy(*args, _name=name, _fn=getattr(fused_ops, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(fused_ops, name, spy)
    from memfit.adapters import transformers as adapter

    grouped = {"n": 0}
    real_output = adapter._ProjectionGroup.output

    def counted(self, index, x):
        grouped["n"] += 1
        return real_output(self, index, x)

    monkeypatch.setattr(adapter._ProjectionGroup, "output", counted)
    ids = torch.randint(0, 128, (2, 7), device=dev)
    keys = set(model.state_dict())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        before = forward(model, ids)
        assert install_fused_ops(model) > 0
        assert install_fused_ops(model) > 0  # idempotent
        outside = forward(model, ids)
        assert sum(calls.values()) == 0 and grouped["n"] == 0  # installed but inactive: transformers' operations
        with fused_ops_active():
            inside = forward(model, ids)
    assert torch.equal(outside, before)
    layers = model.config.num_hidden_layers
    assert calls["rms_norm"] >= 2 * layers + 1 and calls["rotary"] == layers
    assert grouped["n"] == 5 * layers  # q, k, v and gate, up: each part of one matmul per group
    # the weights exist once: each projection's weight is a row block of its group's matrix
    attn = model.model.layers[0].self_attn
    row = attn.q_proj.weight.stride(0) * attn.q_proj.weight.element_size()
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.out_features * row
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == param_bytes
    assert calls["silu_mul"] == (0 if "gemma" in model.config.model_type else layers)  # Gemma's MLP is GELU
    scale = before.abs().max()
    assert (inside - before).abs().max() <= 0.05 * scale  # a few roundings of the dtype through 3-4 layers
    assert set(model.state_dict()) == keys  # the modules keep their parameters


def test_a_moved_model_leaves_the_grouped_projections(setup) -> None:
    """After `.to()` the layers' weights are no longer views of the group's matrix: they run on their own (never
    on the stale matrix), and installing again regroups them."""
    from memfit.adapters import transformers as adapter

    dev, dtype = setup
    model = tiny_llama().to(dev, dtype)
    ids = torch.randint(0, 128, (1, 5), device=dev)
    with torch.no_grad():
        install_fused_ops(model)
        model.to(torch.float32)  # new storage for every parameter
        group = model.model.layers[0].self_attn._memfit_projections[("q_proj", "k_proj", "v_proj")]
        assert group.matrices() is None
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight.mul_(2)  # would be missed by the stale matrix
        plain = forward(model, ids)
        with fused_ops_active():
            fused = forward(model, ids)
        torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
        install_fused_ops(model)
        assert model.model.layers[0].self_attn._memfit_projections[("q_proj", "k_proj", "v_proj")].matrices()
    assert adapter._grouped_linear_class() is type(model.model.layers[0].self_attn.q_proj)


def test_replaced_layers_free_their_grouped_weights(setup) -> None:
    """Replacing grouped layers (as quantizing them does) leaves nothing holding the old matrix: the group keeps
    only weak references, and after a fused forward no activation either."""
    import gc
    import weakref

    dev, dtype = setup
    model = tiny_llama().to(dev, dtype)
    with torch.no_grad():
        install_fused_ops(model)
        with fused_ops_active():
            forward(model, torch.randint(0, 128, (1, 4), device=dev))
    attn = model.model.layers[0].self_attn
    group = attn._memfit_projections[("q_proj", "k_proj", "v_proj")]
    assert group.input is None and group.outputs == []
    storage = weakref.ref(attn.q_proj.weight)
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attn, name)
        setattr(attn, name, torch.nn.Linear(old.in_features, old.out_features, bias=False).to(dev, dtype))
    del old
    gc.collect()
    assert storage() is None and group.matrices() is None


def test_default_model_decodes_the_same_with_fused_steps(setup, default_model, monkeypatch) -> None:
    """Real weights (the default model, a Llama-architecture SmolLM2): the fast stores with fused decode steps —
    norms, rotary and activation kernels, grouped q/k/v and gate/up matmuls — generate the portable path's greedy
    tokens on a real prompt (here with the kernels in Triton's interpreter on CPU)."""
    import copy
    import dataclasses

    from memfit.api import make_cache
    from memfit.engine import encode_prompts, generate
    from memfit.kernels import fused_ops

    dev, dtype = setup
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    calls = {"n": 0}

    def spy(*args, _fn=fused_ops.rms_norm, **kwargs):
        calls["n"] += 1
        return _fn(*args, **kwargs)

    monkeypatch.setattr(fused_ops, "rms_norm", spy)
    model, tok = default_model
    model = copy.deepcopy(model).to(dev, dtype)  # the session fixture stays untouched
    ids, mask = encode_prompts(tok, ["The capital of France is Paris. The capital of Italy is"], chat=False)
    runs = {}
    for backend in ("portable", "fast"):
        cache = make_cache(model, "snapkv", 0.5, backend=backend, reserve=8)
        if backend == "fast":
            assert cache.backend.name == "fast"
            install_fused_ops(model)
            cache.backend = dataclasses.replace(cache.backend, fused_ops=True)
        runs[backend] = generate(model, ids, mask, cache, max_new_tokens=6).tokens[0]
    assert runs["fast"] == runs["portable"], runs
    assert calls["n"] == 5 * (2 * model.config.num_hidden_layers + 1)  # 5 decode steps, each norm of each layer
    group = model.model.layers[0].self_attn._memfit_projections[("q_proj", "k_proj", "v_proj")]
    assert group.matrices() is not None  # the grouped matmul was in place while decoding
