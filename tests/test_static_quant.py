"""The fast backend's KIVI store (memfit.core.static_quant_store) against the portable quantized store.

- store level, same inputs: attention outputs within fp32 roundoff at every decode step, and after the decode the
  buffers turned back into segments hold bit-identical codes, scales and zeros, and the same residuals;
- model level (tiny random Llama / Qwen2, MEMFIT_FAST_ON_CPU=1): decode logits within fp32 tolerance and the same
  greedy tokens over enough steps to cross several key flushes, and the bytes (the portable store's held bytes,
  and the allocated buffers by formula);
- a frozen decode step never reads a device value on the host (what a CUDA graph needs);
- the Triton KIVI kernel (CPU interpreter) reads the store's layout: codes up to a token that is not a group boundary,
  then a full ring.
"""

from __future__ import annotations

import pytest
import torch

from memfit.api import make_cache
from memfit.core.cache import StepInfo
from memfit.core.method import build_policy
from memfit.core.quant import QuantizedTensor, bytes_per_group
from memfit.core.static_quant_store import KIVIForm, StaticKIVILayer, static_quant_form
from memfit.engine import generate, pad_left, positions_from_mask
from tests.conftest import tiny_llama, tiny_qwen

G, R = 4, 8  # tiny heads have 16 channels
KIVI = {"group_size": G, "residual": R}
CASES = {
    "kivi2-block": ("kivi", None, dict(KIVI)),
    "kivi4-block": ("kivi", None, dict(KIVI, bits=4)),
    "kivi2-sliding": ("kivi", None, dict(KIVI, key_residual="sliding")),
    "snapkv+kivi2": ("snapkv+kivi", 0.4, {"snapkv.window": 4, **{f"kivi.{k}": v for k, v in KIVI.items()}}),
}
STEPS = 26  # 40-token prompt + 26 tokens: key flushes at 48, 56, 64 (block), one value flush per step


def _portable_kivi_layer(form: KIVIForm):
    params = {"bits": form.bits, "group_size": form.group_size, "residual": form.residual,
              "key_residual": "sliding" if form.sliding_keys else "block"}
    policy, factory = build_policy("kivi", None, params)
    return factory(0)


def _segments(side) -> QuantizedTensor:
    return QuantizedTensor.concat([s.qt for s in side.segments])


@pytest.mark.parametrize("bits, sliding, prompt, layout", [
    (2, False, 37, "canonical"), (4, False, 5, "canonical"), (2, True, 37, "canonical"), (2, True, 13, "canonical"),
    (2, False, 37, "planes"), (4, False, 70, "planes"), (2, True, 45, "planes")])
def test_store_matches_portable_store_bit_for_bit(bits, sliding, prompt, layout, monkeypatch):
    """Same keys, values and queries into both stores: outputs within fp32 summation-order error every step, and afterwards the
    same codes, scales, zeros (bit-identical) and residuals; the host mirrors equal the device counters. Plane order
    (the codes the plane-order kernel reads, `memfit.core.planes`) needs 16-token groups: larger shapes."""
    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", layout)
    g, r, d = (G, R, 16) if layout == "canonical" else (16, 32, 32)
    form = KIVIForm(bits, g, r, sliding)
    gen = torch.Generator().manual_seed(bits + prompt)
    b, hkv, hq = 2, 2, 4
    fast, port = StaticKIVILayer(0, form, reserve=8), _portable_kivi_layer(form)  # reserve 8 < steps: it grows
    scale = d**-0.5

    def step(q_len: int, is_prefill: bool):
        k = torch.randn(b, hkv, q_len, d, generator=gen) * 3 + 1
        v = torch.randn(b, hkv, q_len, d, generator=gen)
        q = torch.randn(b, hq, q_len, d, generator=gen)
        info = StepInfo(0, 1, q_len, is_prefill, None)
        outs = []
        for layer in (fast, port):
            layer.append(k, v, None)
            outs.append(layer.attend(q, scale))
            layer.finalize_step(info)
        return outs

    step(prompt, True)
    for i in range(3 * r + 5):
        a, p = step(1, False)
        # the two stores sum the same fp32 terms in different orders (static slots vs segments), and how far that
        # moves an output depends on the CPU's matmul kernels: 3e-5 relative on one CI machine. One token more or
        # less moves these outputs by ~1e-2 or more, and the codes below must still be bit-identical.
        torch.testing.assert_close(a, p, rtol=1e-4, atol=1e-5)
        assert fast.frozen and fast.used_nbytes() == port.nbytes(), i
        assert fast.layout == layout
    assert fast.capacity > prompt + 8  # grew past the reserve
    assert (int(fast.t_dev), int(fast.qk_dev), int(fast.qv_dev)) == (fast.length, fast.qk, fast.qv)
    assert fast.qk >= r and fast.qv > 3 * r  # several flushes on both sides
    fast.unfreeze()
    for a_side, p_side in ((fast.k, port.k), (fast.v, port.v)):
        assert (a_side.slots, a_side.q, a_side.residual_len) == (p_side.slots, p_side.q, p_side.residual_len)
        qa, qp = _segments(a_side), _segments(p_side)
        for x, y in zip(qa.tensors(), qp.tensors(), strict=True):
            assert torch.equal(x, y)
        assert torch.equal(a_side.residual, p_side.residual)
    assert fast.nbytes() == port.nbytes()  # the portable form again: same bytes


def _prompt(batch: int, lengths=(40, 40)):
    g = torch.Generator().manual_seed(1)
    return pad_left([torch.randint(3, 120, (n,), generator=g).tolist() for n in lengths[:batch]])


def _decode_both(model, spec, budget, params, ids, mask, steps=STEPS):
    """Prefill both backends, then feed both the portable path's greedy token; returns caches and per-step logits."""
    from memfit.adapters.transformers import forward

    caches = {b: make_cache(model, spec, budget, params, backend=b, reserve=steps) for b in ("fast", "portable")}
    pos = positions_from_mask(mask)
    logits = {b: forward(model, ids, mask, c, pos, logits_to_keep=1)[:, -1] for b, c in caches.items()}
    history = [logits]
    last = pos[:, -1:]
    for _ in range(steps):
        tok = logits["portable"].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        last = last + 1
        logits = {b: forward(model, tok, mask, c, last, logits_to_keep=1)[:, -1] for b, c in caches.items()}
        history.append(logits)
    return caches, history


@pytest.mark.parametrize("arch, case", [*(("llama", c) for c in sorted(CASES)), ("qwen2", "kivi2-block"),
                                        ("qwen2", "snapkv+kivi2")])
def test_fast_kivi_equals_portable_kivi(arch, case, monkeypatch):
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    model = tiny_llama() if arch == "llama" else tiny_qwen()
    spec, budget, params = CASES[case]
    ids, mask = _prompt(2)  # two rows of the same length: no padding, the buffers hold both
    caches, history = _decode_both(model, spec, budget, params, ids, mask)
    fast, port = caches["fast"], caches["portable"]
    assert fast.backend.name == "fast" and port.backend.name == "portable"
    for logits in history:
        torch.testing.assert_close(logits["fast"], logits["portable"], rtol=1e-5, atol=1e-5)
        assert torch.equal(logits["fast"].argmax(-1), logits["portable"].argmax(-1))
    form = static_quant_form(build_policy(spec, budget, params)[0])
    assert form is not None
    for a, p in zip(fast.core.layers, port.core.layers, strict=True):
        assert isinstance(a, StaticKIVILayer) and a.frozen and a.freezes == 1  # frozen once, for the whole decode
        assert a.seen == p.seen and a.num_slots == p.num_slots
        assert a.used_nbytes() == p.nbytes()
        b, h, d = a._shape
        bpg = bytes_per_group(form.bits, G)
        per_token = b * h * (d // G * bpg + 2 * 2 * d // G) + b * h * d * (bpg + 2 * 2) // G  # codes + fp16 scales
        ring = 2 * b * h * form.ring * d * 4
        assert a.nbytes() == a.capacity * per_token + ring + 4 * 8 + 2 * 4 * b  # + counters
        assert a.capacity >= a.length
    assert fast.held_tokens() == port.held_tokens()
    assert fast.full_nbytes() == port.full_nbytes()


def test_generate_runs_fast_kivi_and_matches(monkeypatch):
    """Through the engine's loop (memfit.engine.generate, what `memfit run` calls)."""
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    model = tiny_llama()
    ids, mask = _prompt(1)
    gens = {}
    for backend in ("fast", "portable"):
        cache = make_cache(model, "snapkv+kivi", 0.5, CASES["snapkv+kivi2"][2], backend=backend, reserve=20)
        gens[backend] = generate(model, ids, mask, cache, max_new_tokens=20)
        assert cache.backend.name == backend
    assert gens["fast"].tokens == gens["portable"].tokens
    torch.testing.assert_close(gens["fast"].first_logits, gens["portable"].first_logits, rtol=1e-5, atol=1e-5)


def test_padded_batch_stays_portable_and_matches(monkeypatch):
    """Rows of different lengths leave placeholder slots: the layers do not freeze and behave as the portable store."""
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    ids, mask = _prompt(2, (40, 33))
    caches, history = _decode_both(tiny_llama(), "kivi", None, KIVI, ids, mask, steps=10)
    assert not any(layer.frozen for layer in caches["fast"].core.layers)
    for logits in history:
        torch.testing.assert_close(logits["fast"], logits["portable"], rtol=0, atol=0)


@pytest.mark.parametrize("spec, params", [("h2o+kivi", KIVI), ("streaming+kivi", KIVI), ("gear", {}),
                                          ("kivi", dict(KIVI, bits=1)), ("kivi", dict(KIVI, key_bits=4))])
def test_stores_without_a_static_form_fall_back(spec, params, monkeypatch):
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    budget = 0.5 if "+" in spec else None
    cache = make_cache(tiny_llama(), spec, budget, params, backend="fast")
    assert cache.backend.name == "portable" and "fallback" in cache.backend.reason


def test_frozen_decode_step_never_syncs(monkeypatch):
    """append / attend / finalize of a frozen layer read no device value on the host (a CUDA graph replays them)."""
    form = KIVIForm(2, G, R, False)
    layer = StaticKIVILayer(0, form, reserve=64)
    gen = torch.Generator().manual_seed(0)
    kv = lambda n: torch.randn(1, 2, n, 16, generator=gen)  # noqa: E731
    layer.append(kv(21), kv(21), None)
    layer.attend(torch.randn(1, 4, 21, 16, generator=gen), 0.25)
    layer.finalize_step(StepInfo(0, 1, 21, True, None))
    layer.append(kv(1), kv(1), None)  # freezes (host work allowed here: once, before any graph)
    assert layer.frozen
    layer.attend(torch.randn(1, 4, 1, 16, generator=gen), 0.25)
    layer.finalize_step(StepInfo(0, 1, 1, False, None))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside a decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2 * R):
        layer.append(kv(1), kv(1), None)
        layer.attend(torch.randn(1, 4, 1, 16, generator=gen), 0.25)
        layer.finalize_step(StepInfo(0, 1, 1, False, None))
    monkeypatch.undo()
    assert (int(layer.t_dev), int(layer.qk_dev), int(layer.qv_dev)) == (layer.length, layer.qk, layer.qv)


# ------------------------------------------------------------------------- the kernel on the store's layout

try:
    from tests.test_kernels import _INTERPRET, _assert_close, interpreter_dtype  # noqa: F401  (fixture)
except ImportError:  # pragma: no cover
    _INTERPRET = False


@pytest.mark.skipif(not _INTERPRET, reason="needs triton >= 3.8 (its CPU interpreter) and no CUDA device")
@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("layout", ["canonical", "planes"])
def test_kernel_reads_the_store_layout(sliding, layout, interpreter_dtype, monkeypatch):
    """The store's buffers after a decode (codes for n_q = T + 1 - W tokens, not a group boundary, then a full ring)
    through the Triton kernel equal its reference."""
    from memfit.kernels.kivi_attention import kivi_decode_attention
    from memfit.kernels.reference import kivi_decode_attention_ref

    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", layout)
    dtype = interpreter_dtype
    g, r, d = 16, 32, 32
    form = KIVIForm(2, g, r, sliding)
    layer = StaticKIVILayer(0, form, reserve=32)
    gen = torch.Generator().manual_seed(3)
    kv = lambda n: (torch.randn(1, 2, n, d, generator=gen) * 2).to(dtype)  # noqa: E731
    layer.append(kv(70), kv(70), None)
    layer.finalize_step(StepInfo(0, 1, 70, True, None))
    for _ in range(5):
        layer.append(kv(1), kv(1), None)
        layer.attend(torch.randn(1, 4, 1, d, generator=gen).to(dtype), d**-0.5)
        layer.finalize_step(StepInfo(0, 1, 1, False, None))
    layer.append(kv(1), kv(1), None)
    q = torch.randn(1, 4, d, generator=gen).to(dtype)
    bufs = layer.buffers
    n_q = torch.tensor([layer.length - form.ring], dtype=torch.int32)
    n_r = torch.tensor([form.ring], dtype=torch.int32)
    assert int(n_q) % g  # not a group boundary
    assert layer.layout == layout
    args = (bufs["kc"], bufs["ks"], bufs["kz"], bufs["vc"], bufs["vs"], bufs["vz"], bufs["kr"], bufs["vr"], n_q, n_r)
    kc, vc = layer._canonical_codes(layer.capacity, layer.capacity)
    ref = kivi_decode_attention_ref(q.float(), kc, *args[1:3], vc, *args[4:], bits=2, group_size=g, scale=d**-0.5)
    out = kivi_decode_attention(q, *args, bits=2, group_size=g, scale=d**-0.5, layout=layout)
    _assert_close(out, ref, dtype)
    # and it is what the store's own attention computes (the reference path on the CPU)
    torch.testing.assert_close(layer.attend(q[:, :, None], d**-0.5)[:, :, 0].float(), ref, rtol=2e-2, atol=2e-2)


_FLUSH_DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    pytest.param("interpret", marks=pytest.mark.skipif(
        not _INTERPRET, reason="needs triton >= 3.8 (the kernels run in its CPU interpreter) and no CUDA device")),
]


@pytest.mark.parametrize("device", _FLUSH_DEVICES)
@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("layout", ["canonical", "planes"])
def test_triton_flush_equals_the_torch_flush(device, sliding, layout, request, monkeypatch):
    """The three Triton launches of a step's flush (memfit.kernels.kivi_flush, what CUDA runs) leave every code,
    scale, zero and counter bit-identical to the PyTorch masked writes, step after step, across several flushes of
    both sides (interpreter: small shapes, the ring bit-identical too; CUDA: KIVI's defaults, G = 32, R = 128 — the
    ring's dequantized entries may differ by one bf16 unit where the GPU fuses a multiply-add)."""
    import importlib

    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", layout)  # plane order: the codes OR-ed into shared bytes
    if device == "interpret":
        dtype, dev, (d, g, r, steps) = request.getfixturevalue("interpreter_dtype"), "cpu", (16, 4, 8, 24)
        if layout == "planes":  # whole 16-token slices
            d, g, r, steps = 32, 16, 32, 72
        import memfit.kernels.kivi_flush as kf

        if type(kf._flush_values_kernel).__name__ != "InterpretedFunction":
            importlib.reload(kf)  # defined under TRITON_INTERPRET=1 (the fixture set it)
        assert type(kf._flush_values_kernel).__name__ == "InterpretedFunction"
    else:
        dtype, dev, (d, g, r, steps) = torch.bfloat16, "cuda", (128, 32, 128, 300)
    form = KIVIForm(2, g, r, sliding)
    layers = [StaticKIVILayer(0, form, reserve=steps + 8), StaticKIVILayer(0, form, reserve=steps + 8)]
    gen = torch.Generator().manual_seed(7)
    rows = 1 if device == "interpret" else 2  # the interpreter runs every program in Python: keep the grid small
    kv = lambda n: (torch.randn(rows, 2, n, d, generator=gen) * 3 + 1).to(dev, dtype)  # noqa: E731
    keys, values = kv(37), kv(37)
    for layer in layers:
        layer.append(keys, values, None)
        layer.finalize_step(StepInfo(0, 1, 37, True, None))
    qk0 = layers[0].k.q  # keys quantized by the prompt
    for i in range(steps):
        k, v, q = kv(1), kv(1), kv(1).repeat(1, 2, 1, 1)  # 4 query heads over 2 KV heads
        for layer, triton_flush in zip(layers, (True, False), strict=True):
            layer.append(k, v, None)
            layer.triton_flush = triton_flush
            layer.attend(q, d**-0.5)
            layer.finalize_step(StepInfo(0, 1, 1, False, None))
        a, b = layers
        if i == 0:  # the compile check at freeze on CUDA: the kernels run on scratch counters and change nothing
            before = {name: t.clone() for name, t in a.buffers.items()}
            assert a._dry_flush()
            assert all(torch.equal(before[name], a.buffers[name]) for name in before)
        for name in a.buffers:
            if name in ("kr", "vr") and device == "cuda":
                torch.testing.assert_close(a.buffers[name], b.buffers[name], rtol=2**-7, atol=0)
            else:
                assert torch.equal(a.buffers[name], b.buffers[name]), (i, name)
        for name in ("t_dev", "qk_dev", "qv_dev", "slot", "n_q", "n_r"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (i, name)
    assert a.qk - qk0 >= 2 * form.key_block and a.qv > steps - r  # key flushes during the decode
    assert a.layout == b.layout == layout


@pytest.mark.parametrize("spec, budget", [("kivi", None), ("snapkv+kivi", 0.5)])
def test_chunked_prefill(spec, budget, monkeypatch):
    """Chunked prefill: KIVI alone quantizes chunk by chunk and freezes as usual; behind an eviction that acts at every
    chunk, nothing is quantized until the prompt is in (memfit.core.quantized_store), so the eviction leaves no holes
    in quantized key groups and the layers freeze too (they used to stay the slower portable store: issue #11)."""
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    model = tiny_llama()
    ids, mask = _prompt(1)
    params = CASES["kivi2-block"][2] if spec == "kivi" else CASES["snapkv+kivi2"][2]
    gens, caches = {}, {}
    for backend in ("fast", "portable"):
        caches[backend] = make_cache(model, spec, budget, params, backend=backend, reserve=12)
        gens[backend] = generate(model, ids, mask, caches[backend], max_new_tokens=12, prefill_chunk=16)
    assert [layer.frozen for layer in caches["fast"].core.layers] == [True] * 3
    assert gens["fast"].tokens == gens["portable"].tokens


def test_chunked_prefill_behind_an_eviction_quantizes_once_the_prompt_is_in():
    """snapkv+kivi with a chunked prompt (portable store): after every chunk but the last the layers hold their kept
    tokens in full precision (the eviction may still drop any of them), within the kept tokens plus one chunk that
    serve's admission reserves; once the prompt is in they are quantized (fewer bytes than the same tokens in full
    precision)."""
    from memfit.adapters.transformers import forward

    model = tiny_llama()
    ids, mask = _prompt(1)
    total, chunk = ids.shape[1], 16
    cache = make_cache(model, "snapkv+kivi", 0.5, CASES["snapkv+kivi2"][2], backend="portable")
    core = cache.core
    core.begin_prompt(mask.sum(-1), total)
    pos = positions_from_mask(mask)
    keep = total // 2
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        forward(model, ids[:, start:stop], mask[:, :stop], cache, pos[:, start:stop], logits_to_keep=1)
        held = [(layer.k.slots - layer.k.residual_len, layer.v.slots - layer.v.residual_len, layer.num_slots)
                for layer in core.layers]
        if stop < total:
            assert all(qk == 0 and qv == 0 for qk, qv, _ in held), (start, held)
            assert all(n <= keep + chunk for _, _, n in held), (start, held)
    assert all(qk > 0 and qv > 0 for qk, qv, _ in held)
    assert all(layer.nbytes() < layer.num_slots * 2 * layer.keys.shape[1] * layer.keys.shape[-1] * 4
               for layer in core.layers)


def test_plane_order_policy(monkeypatch):
    """Plane order where its kernel is faster (CUDA, from PLANES_MIN_ROWS rows), shapes of whole 16-token slices
    only; MEMFIT_KIVI_LAYOUT forces either layout and rejects anything else."""
    from memfit.core import static_quant_store as S
    from memfit.errors import ConfigError

    monkeypatch.setattr(S, "_kernels_here", lambda: True)
    monkeypatch.delenv("MEMFIT_KIVI_LAYOUT", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    two, four = KIVIForm(2, 32, 128, False), KIVIForm(4, 32, 128, False)
    for form in (two, four):
        least = S.PLANES_MIN_ROWS[form.bits]
        assert S._use_planes(form, 128, cuda, least) and not S._use_planes(form, 128, cuda, least - 1)
    assert not S._use_planes(two, 128, cuda, 1)  # one row: the canonical layout (faster through the product)
    assert not S._use_planes(two, 128, cpu, 461)
    assert not S._use_planes(KIVIForm(2, 8, 128, False), 128, cuda, 461)  # groups of 8 tokens: not whole slices
    assert not S._use_planes(KIVIForm(8, 32, 128, False), 128, cuda, 461)
    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", "canonical")
    assert not S._use_planes(two, 128, cuda, 461)
    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", "planes")
    assert S._use_planes(two, 128, cpu, 1) and not S._use_planes(KIVIForm(2, 8, 128, False), 128, cpu, 1)
    monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", "sideways")
    with pytest.raises(ConfigError, match="MEMFIT_KIVI_LAYOUT"):
        S._use_planes(two, 128, cuda, 461)


def test_json_names_the_kivi_code_layout(monkeypatch):
    """`kivi_layout` in a run's result counts the fast KIVI layers by the code layout they decoded from (forced
    here: plane order needs CUDA and a large batch by default); None when nothing decoded from the static store."""
    from memfit.engine import run
    from tests.test_weights import tiny_tokenizer

    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    model, tok = tiny_llama(), tiny_tokenizer()
    prompt = " ".join(f"w{3 + i % 100}" for i in range(70))
    params = {"bits": 2, "group_size": 16, "residual": 32}  # whole 16-token slices: tiny heads have 16 channels
    layers = model.config.num_hidden_layers
    for layout in ("planes", "canonical"):
        monkeypatch.setenv("MEMFIT_KIVI_LAYOUT", layout)
        res = run(prompt, model=(model, tok), method="kivi", params=params, max_new_tokens=4, chat=False,
                  backend="fast")
        assert res.backend == "fast" and res.kivi_layout == {layout: layers}, res.kivi_layout
    assert run(prompt, model=(model, tok), method="snapkv", budget=0.5, max_new_tokens=2, chat=False).kivi_layout is None
