"""Decode kernels: plain-PyTorch references against dense math (CPU, always), kernels against references.

- CPU: the references agree with `memfit.core.quant` (layout) and with a per-row dense loop.
- Kernels, default suite on a machine without CUDA where triton is installed (CI: the test extra brings it): every
  kernel check runs in Triton's CPU interpreter at small shapes, in bf16 computed as the GPU does (see
  `_bf16_like_the_gpu`), about 50 s of CPU.
- `-m gpu` (on the GPU machine): the same checks on CUDA in bf16 at larger shapes.
Every kernel output must be within `_tolerance` (relative, scaled to bf16) of its fp32 reference; that check
rejects a cache with one token dropped or duplicated (test_one_token_off_fails_the_check). The H2O kernel must evict
exactly the reference's victims. Results are printed (run with `-s`) and appended to $MEMFIT_KERNEL_REPORT (JSONL)
when that is set.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from typing import NamedTuple

import pytest
import torch

from memfit.core.quant import quantize
from memfit.core.scoring import attention_probs, reduce_groups
from memfit.kernels import available, interpret_mode
from memfit.kernels import reference as R

# ---------------------------------------------------------------------------------------------------- fixtures


def _kivi_case(b, hq, hkv, d, cq, r, bits, g, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, cq, d, generator=gen) * 2 + 0.5
    v = torch.randn(b, hkv, cq, d, generator=gen)
    qk = quantize(k.to(device), bits, "token", g)
    qv = quantize(v.to(device), bits, "channel", g)
    kr = torch.randn(b, hkv, r, d, generator=gen).to(device, dtype)
    vr = torch.randn(b, hkv, r, d, generator=gen).to(device, dtype)
    q = torch.randn(b, hq, d, generator=gen).to(device, dtype)
    return q, qk, qv, kr, vr


def _dense_loop(q, keys, values, scale):
    """Per-row float64 softmax attention (keys/values: lists of (Hkv, T_b, d) per row)."""
    outs = []
    for i in range(q.shape[0]):
        k, v = keys[i].double(), values[i].double()
        hkv, g = k.shape[0], q.shape[1] // k.shape[0]
        qi = q[i].double().reshape(hkv, g, -1)
        p = torch.softmax(torch.einsum("hgd,htd->hgt", qi, k) * scale, dim=-1)
        outs.append(torch.einsum("hgt,htd->hgd", p, v).reshape(q.shape[1], -1))
    return torch.stack(outs)


# --------------------------------------------------------------------------------------------- CPU: references


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_dequant_matches_quant_layout(bits):
    q, qk, qv, *_ = _kivi_case(2, 4, 2, 64, 96, 8, bits, 32, torch.float32, "cpu")
    dk = R.dequantize_keys(qk.codes, qk.scales, qk.zeros, bits, 32)
    dv = R.dequantize_values(qv.codes, qv.scales, qv.zeros, bits, 32)
    torch.testing.assert_close(dk, qk.dequantize(torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(dv, qv.dequantize(torch.float32), rtol=0, atol=0)


def test_reference_rejects_unsupported_bits():
    with pytest.raises(ValueError):
        R.dequantize_keys(torch.zeros(1, 1, 1, 8, dtype=torch.uint8), torch.zeros(1, 1, 1, 8),
                          torch.zeros(1, 1, 1, 8), 3, 32)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_reference_matches_dense_loop(bits):
    g, scale = 32, 0.125
    q, qk, qv, kr, vr = _kivi_case(3, 8, 2, 64, 128, 32, bits, g, torch.float32, "cpu", seed=bits)
    n_q = torch.tensor([128, 64, 0])
    n_r = torch.tensor([0, 17, 32])
    out = R.kivi_decode_attention_ref(q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr,
                                      n_q, n_r, bits=bits, group_size=g, scale=scale)
    dk, dv = qk.dequantize(torch.float32), qv.dequantize(torch.float32)
    keys = [torch.cat([dk[i, :, : n_q[i]], kr[i, :, : n_r[i]]], dim=1) for i in range(3)]
    values = [torch.cat([dv[i, :, : n_q[i]], vr[i, :, : n_r[i]]], dim=1) for i in range(3)]
    torch.testing.assert_close(out.double(), _dense_loop(q, keys, values, scale), rtol=1e-5, atol=1e-5)


def test_decode_reference_matches_dense_loop():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 3, 40, 32, generator=gen), torch.randn(
        2, 3, 40, 32, generator=gen)
    n = torch.tensor([40, 9])
    out = R.decode_attention_ref(q, k, v, n, scale=0.2)
    ref = _dense_loop(q, [k[i, :, : n[i]] for i in range(2)], [v[i, :, : n[i]] for i in range(2)], 0.2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_h2o_reference_matches_core_scoring():
    """acc update = memfit's attention_probs reduced over the group (H2O reduce='sum'); victim = argmin rule."""
    gen = torch.Generator().manual_seed(2)
    b, hq, hkv, c, d = 2, 8, 2, 24, 16
    q = torch.randn(b, hq, d, generator=gen)
    k, v = torch.randn(b, hkv, c, d, generator=gen), torch.randn(b, hkv, c, d, generator=gen)
    acc = torch.rand(b, hkv, c, generator=gen)
    pos = torch.stack([torch.randperm(c, generator=gen) for _ in range(b * hkv)]).view(b, hkv, c).int()
    n = torch.tensor([c, 20])
    cur = torch.tensor([c - 1, c - 1])
    recent = 5
    out, new_acc, victim = R.h2o_decode_ref(q, k, v, n, acc, pos, cur, recent, scale=0.25)
    valid = (torch.arange(c)[None] < n[:, None])[:, None, :].expand(b, hkv, c)
    probs = attention_probs(q[:, :, None], k, 0.25, valid, causal=False)[:, :, 0]  # (B, Hq, C)
    step = reduce_groups(probs, hkv, "sum")
    torch.testing.assert_close(new_acc, acc + step, rtol=1e-5, atol=1e-6)
    for i in range(b):
        for h in range(hkv):
            if n[i] < c:
                assert int(victim[i, h]) == int(n[i])  # first empty slot
                continue
            cand = [(float(new_acc[i, h, t]), t) for t in range(c) if int(pos[i, h, t]) <= int(cur[i]) - recent]
            assert int(victim[i, h]) == min(cand)[1]
    ref = _dense_loop(q, [k[i, :, : n[i]] for i in range(b)], [v[i, :, : n[i]] for i in range(b)], 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_available_is_a_bool():
    assert isinstance(available(), bool)


# ------------------------------------------------------------------- the check every kernel result must pass

# Unit roundoff of the kernels' storage dtype: bf16 keeps 8 significant bits, fp16 11.
_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def _tolerance(dtype: torch.dtype, units: int = 4) -> float:
    """Relative tolerance of a decode output vector: 4 units of roundoff of the dtype the kernel feeds its dots
    (1.6e-2 in bf16). The kernels round dequantized tiles, probabilities and the output to that dtype (relative
    errors of about one unit each; measured 2e-3 to 9e-3 in bf16, up to 2K tokens); one token more or less in a
    cache of the test shapes moves an output vector by 6e-2 or more (test_one_token_off_fails_the_check). KIVI's
    "fold" path also rounds q x key scale to bf16 (measured 1.3e-2 at 2K tokens): 6 units there. Measurements:
    benchmarks/results/kernel_tests_cpu_interpreter.jsonl (test shapes), kernel_error_interpreter.jsonl (2K)."""
    return units * _ROUNDOFF[dtype]


def _folds_scales(packed) -> bool:
    """Paths that multiply key scales into q in the dot's dtype (one more rounding: `_tolerance`)."""
    from memfit.kernels.kivi_attention import VARIANTS

    spec = VARIANTS.get(packed, packed) if isinstance(packed, str) else packed
    return spec[0] == 2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each (row, query head) output vector: (B, Hq), float64."""
    out, ref = out.double(), ref.double()
    return (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, units: int = 4) -> float:
    """Every output vector within `_tolerance(dtype, units)` of the fp32 reference (relative); returns the worst."""
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    worst, tol = err.max().item(), _tolerance(dtype, units)
    assert worst <= tol, f"relative error {worst:.3g} > {tol:.3g} at (row, head) {divmod(err.argmax().item(), err.shape[1])}"
    return worst


# --------------------------------------------------------------------------- Triton's interpreter (CPU) setup


def _triton_version() -> tuple[int, int] | None:
    if importlib.util.find_spec("triton") is None:
        return None
    m = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("triton"))
    return (int(m[1]), int(m[2])) if m else None


# Triton's interpreter runs these kernels from 3.8 on; 3.0 to 3.6 fail on them (3.0: arange bounds from derived
# constexprs; 3.4, 3.6: a loop bound computed by tl.maximum), so older releases skip the interpreter runs.
_INTERPRETER_MIN = (3, 8)
# Where there is no CUDA device but triton is installed (CI), the kernels run in Triton's CPU interpreter.
_INTERPRET = (_triton_version() or (0, 0)) >= _INTERPRETER_MIN and (interpret_mode() or not torch.cuda.is_available())


def _bf16_like_the_gpu(mp: pytest.MonkeyPatch) -> bool:
    """Make Triton's interpreter compute bf16 as the GPU does; False if this triton's interpreter is not the one
    patched here (the tests then run in fp16).

    The interpreter stores bf16 as raw uint16 and (triton 3.9) multiplies those bit patterns in `tl.dot`, casts
    integers to bf16 bit-wise and truncates fp32 -> bf16 where the GPU rounds to nearest even (triton-lang/triton
    #11584; its debugging guide lists bf16 as unsupported). The kernels use bf16 only in loads, stores, casts and
    dots, so two overrides suffice: dots on the exact fp32 values of bf16 operands (a bf16 product is exact in fp32,
    as in the GPU's fp32-accumulating MMA), and casts to / from bf16 done by torch (round to nearest even)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not all(hasattr(builder, f) for f in ("create_dot", "cast_impl")):
        return False
    handle = interp.TensorHandle
    dot, cast = builder.create_dot, builder.cast_impl

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *args):
        return dot(self, as_fp32(a), as_fp32(b), *args)

    def cast_impl(self, src, dst_type):
        s, t = src.dtype.scalar, dst_type.scalar
        if t == tl.bfloat16 and s != tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return handle(x.view(torch.int16).numpy().view(np.uint16).reshape(src.data.shape), tl.bfloat16)
        if s == tl.bfloat16 and t != tl.bfloat16:
            return as_fp32(src) if t == tl.float32 else cast(self, as_fp32(src), dst_type)
        return cast(self, src, dst_type)

    mp.setattr(builder, "create_dot", create_dot)
    mp.setattr(builder, "cast_impl", cast_impl)
    return True


@pytest.fixture(scope="module")
def interpreter_dtype():
    """Run this module's kernels in Triton's CPU interpreter; yields the dtype to test them in.

    TRITON_INTERPRET is read when a kernel is defined, so the kernel module is (re)loaded under it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        dtype = torch.bfloat16 if _bf16_like_the_gpu(mp) else torch.float16
        _define_kernels_interpreted()
        yield dtype


def _define_kernels_interpreted() -> None:
    """(Re)define the Triton functions the kernels call, and the kernels, under TRITON_INTERPRET=1.

    `triton.jit` chooses compiled or interpreted when a function is defined, and triton was already imported
    (transformers imports it), so its library of jit functions (tl.zeros, tl.sum, tl.argmin, ...: triton.language's
    math, random and standard modules) and memfit's kernel module are executed again; `triton.language` is then
    re-executed to bind the new functions under their public names."""
    import triton.language as tl

    if type(tl.standard.zeros).__name__ != "InterpretedFunction":
        for name in ("triton.language.math", "triton.language.random", "triton.language.standard", "triton.language"):
            importlib.reload(sys.modules[name])
    mod = sys.modules.get("memfit.kernels._decode_kernels")
    if mod is not None and type(mod._split_kernel).__name__ != "InterpretedFunction":
        importlib.reload(mod)
    planes = sys.modules.get("memfit.kernels._kivi_planes_kernel")  # it calls _decode_kernels' helpers: after it
    if planes is not None and type(planes._split_kernel_planes).__name__ != "InterpretedFunction":
        importlib.reload(planes)


_DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    pytest.param("interpret", marks=pytest.mark.skipif(
        not _INTERPRET, reason="needs triton >= 3.8 (the kernels run in its CPU interpreter) and no CUDA device")),
]


class Setup(NamedTuple):
    dev: str
    dtype: torch.dtype
    b: int
    hq: int
    hkv: int
    d: int
    cq: int  # quantized capacity (KIVI) / plain slots
    r: int  # residual capacity (KIVI)
    block_t: int
    seeds: int


def _setup(device: str, request: pytest.FixtureRequest) -> Setup:
    if device == "interpret":  # small: the interpreter runs each program in Python
        return Setup("cpu", request.getfixturevalue("interpreter_dtype"), 3, 8, 2, 64, 128, 32, 32, 1)
    return Setup("cuda", torch.bfloat16, 3, 32, 8, 128, 2048, 128, 64, 3)


def _report(name, **fields):
    line = {"test": name, **fields}
    print(json.dumps(line))
    path = os.environ.get("MEMFIT_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _kivi_lengths(s: Setup, g: int):
    """Per row: (all quantized, no residual), (one group quantized: half a tile, partial residual), (no quantized
    token, full residual)."""
    lens_q = [s.cq, g, 0][: s.b]
    lens_r = [0, s.r // 2 + 3, s.r][: s.b]
    return (torch.tensor(lens_q, dtype=torch.int32, device=s.dev), torch.tensor(lens_r, dtype=torch.int32, device=s.dev))


# ------------------------------------------------------------------------------------- kernels vs references


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("packed", ["packed", "packed32", "fold", "gather", "pipe", (4, 4, 4, 2), "half", "halfpipe"])
def test_kivi_kernel_matches_reference(device, bits, packed, request):
    """Batch of 3 rows (residual empty / partial / full), GQA groups of 4, every quantized-tile code path."""
    from memfit.kernels.kivi_attention import kivi_decode_attention

    s = _setup(device, request)
    g, scale = 32, s.d**-0.5
    units = 6 if _folds_scales(packed) else 4  # see _tolerance
    worst = 0.0
    for seed in range(s.seeds):
        q, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=seed + 10 * bits)
        n_q, n_r = _kivi_lengths(s, g)
        args = (q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q, n_r)
        ref = R.kivi_decode_attention_ref(q.float(), *args[1:], bits=bits, group_size=g, scale=scale)
        out = torch.full_like(q, float("nan"))
        kivi_decode_attention(*args, bits=bits, group_size=g, scale=scale, block_t=s.block_t, out=out, packed=packed)
        worst = max(worst, _assert_close(out, ref, s.dtype, units))
    _report("kivi_decode_attention", device=device, bits=bits, packed=packed, dtype=str(s.dtype),
            shape=[s.b, s.hq, s.hkv, s.d, s.cq, s.r], max_rel_err=worst, tol=_tolerance(s.dtype, units))


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("append", [False, True])
def test_kivi_plane_kernel_matches_reference(device, bits, append, request):
    """The integer-dot kernel over plane-order codes (`layout="planes"`) against the reference on the canonical
    codes: same rows (residual empty / partial / full), with and without the fused append. q x key scale and
    p x value scale are rounded to int8 (one scale per row): held to the bf16 tiles' bound."""
    from memfit.core import planes as P
    from memfit.kernels.kivi_attention import kivi_decode_attention

    s = _setup(device, request)
    g, scale = 32, s.d**-0.5
    worst = 0.0
    for seed in range(s.seeds):
        q, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=seed + 10 * bits)
        n_q, n_r = _kivi_lengths(s, g)
        kc, vc = P.keys_to_planes(qk.codes, bits), P.values_to_planes(qv.codes, bits)
        extra, kn, vn = {}, None, None
        if append:
            gen = torch.Generator().manual_seed(seed)
            kn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
            vn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
            slot = (n_r - 1).clamp(min=0)
            n_r = torch.where(n_r > 0, n_r, torch.ones_like(n_r))
            extra = dict(k_new=kn, v_new=vn, append_at=slot)
            kr_ref, vr_ref = kr.clone(), vr.clone()
            for i in range(s.b):
                kr_ref[i, :, slot[i]], vr_ref[i, :, slot[i]] = kn[i], vn[i]
        else:
            kr_ref, vr_ref = kr, vr
        ref = R.kivi_decode_attention_ref(q.float(), qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros,
                                          kr_ref, vr_ref, n_q, n_r, bits=bits, group_size=g, scale=scale)
        out = torch.full_like(q, float("nan"))
        kivi_decode_attention(q, kc, qk.scales, qk.zeros, vc, qv.scales, qv.zeros, kr, vr, n_q, n_r, bits=bits,
                              group_size=g, scale=scale, block_t=s.block_t, out=out, layout="planes", **extra)
        worst = max(worst, _assert_close(out, ref, s.dtype))
        if append:  # the new token was written into its residual slot
            for i in range(s.b):
                assert torch.equal(kr[i, :, slot[i]], kn[i]) and torch.equal(vr[i, :, slot[i]], vn[i])
    _report("kivi_decode_attention_planes", device=device, bits=bits, append=append, dtype=str(s.dtype),
            shape=[s.b, s.hq, s.hkv, s.d, s.cq, s.r], max_rel_err=worst, tol=_tolerance(s.dtype))


def test_kivi_planes_round_trip_and_token_places():
    """Plane order holds the same codes: back to canonical bit-exact, and each token's code where `token_place`
    says."""
    from memfit.core import planes as P

    for bits in (2, 4):
        cpb, x = 8 // bits, torch.randn(2, 3, 128, 64)
        qk, qv = quantize(x, bits, "token", 32), quantize(x, bits, "channel", 32)
        kp, vp = P.keys_to_planes(qk.codes, bits), P.values_to_planes(qv.codes, bits)
        assert kp.shape == qk.codes.shape and vp.numel() == qv.codes.numel()
        assert torch.equal(P.keys_from_planes(kp, bits), qk.codes)
        assert torch.equal(P.values_from_planes(vp, bits), qv.codes)
        fields = torch.arange(cpb) * bits
        kt = ((qk.codes.int()[..., None, :] >> fields[:, None]) & ((1 << bits) - 1)).reshape(2, 3, 128, 64)
        vt = ((qv.codes.int()[..., None] >> fields) & ((1 << bits) - 1)).reshape(2, 3, 128, 64)
        t = torch.arange(128)
        row, sh = P.token_place(t, bits)
        assert torch.equal((kp.int()[:, :, row] >> sh[:, None]) & ((1 << bits) - 1), kt)
        vbytes = vp.int()[:, :, t // (16 * cpb), :, t % 16]  # advanced indices first: (128, 2, 3, 64)
        assert torch.equal(((vbytes >> sh[:, None, None, None]) & ((1 << bits) - 1)).permute(1, 2, 0, 3), vt)
        with pytest.raises(ValueError, match="plane blocks"):
            P.keys_to_planes(qk.codes[:, :, :1], bits)


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("packed", ["packed", "packed32", "pipe", "half"])
def test_kivi_kernel_appends_new_token(device, packed, request):
    """k_new / v_new are written into residual slot n_r - 1 (split 0 stores them) and used for that slot."""
    from memfit.kernels.kivi_attention import kivi_decode_attention

    s = _setup(device, request)
    bits, g, scale = 2, 32, s.d**-0.5
    q, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=5)
    gen = torch.Generator().manual_seed(6)
    kn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    vn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    old_r = torch.tensor(([3, 0, s.r - 1] * s.b)[: s.b], dtype=torch.int32, device=s.dev)
    n_q = torch.full((s.b,), s.cq, dtype=torch.int32, device=s.dev)
    kr2, vr2 = R.append_slots(kr, vr, kn, vn, old_r)
    ref = R.kivi_decode_attention_ref(q.float(), qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr2,
                                      vr2, n_q, old_r + 1, bits=bits, group_size=g, scale=scale)
    out = kivi_decode_attention(q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q,
                                old_r + 1, bits=bits, group_size=g, scale=scale, block_t=s.block_t, k_new=kn, v_new=vn,
                                append_at=old_r, packed=packed)
    _assert_close(out, ref, s.dtype, 6 if _folds_scales(packed) else 4)
    assert torch.equal(kr, kr2) and torch.equal(vr, vr2)  # the cache now holds the new token


@pytest.mark.parametrize("device", _DEVICES)
def test_decode_attention_kernel_matches_reference(device, request):
    from memfit.kernels.kivi_attention import decode_attention

    s = _setup(device, request)
    gen = torch.Generator().manual_seed(3)
    c = s.cq + 37
    q = torch.randn(s.b, s.hq, s.d, generator=gen).to(s.dev, s.dtype)
    k = torch.randn(s.b, s.hkv, c, s.d, generator=gen).to(s.dev, s.dtype)
    v = torch.randn(s.b, s.hkv, c, s.d, generator=gen).to(s.dev, s.dtype)
    n = torch.tensor(([c, 1, c // 2 + 5] * s.b)[: s.b], dtype=torch.int32, device=s.dev)
    ref = R.decode_attention_ref(q.float(), k, v, n, scale=s.d**-0.5)
    out = decode_attention(q, k, v, n, scale=s.d**-0.5, block_t=s.block_t)
    err = _assert_close(out, ref, s.dtype)
    # fused append: the new token goes to slot n - 1
    kn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    vn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    k2, v2 = R.append_slots(k, v, kn, vn, n - 1)
    ref2 = R.decode_attention_ref(q.float(), k2, v2, n, scale=s.d**-0.5)
    out2 = decode_attention(q, k, v, n, scale=s.d**-0.5, block_t=s.block_t, k_new=kn, v_new=vn, append_at=n - 1)
    err2 = _assert_close(out2, ref2, s.dtype)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    _report("decode_attention", device=device, dtype=str(s.dtype), shape=[s.b, s.hq, s.hkv, s.d, c],
            max_rel_err=max(err, err2), tol=_tolerance(s.dtype))


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("store", ["slots", "kivi", "kivi-planes"])
def test_append_slot_old_contents_never_enter(device, store, request):
    """The appended token's slot may hold anything before the call (static buffers are torch.empty, so NaN bit
    patterns happen, e.g. where uint8 codes lived): the kernel must not read it, since on a GPU split 0 writes the new
    token while another split may be reading that slot, and p = 0 times a NaN is NaN. Found as a served request whose
    greedy tokens turned to 0 (argmax of NaN logits) on the H200. Many splits put the slot away from split 0. (Triton's
    interpreter runs split 0 first, so on CPU this checks the result only; the race needs the GPU.)"""
    from memfit.core import planes as P
    from memfit.kernels.kivi_attention import decode_attention, kivi_decode_attention

    s = _setup(device, request)
    gen = torch.Generator().manual_seed(11)
    kn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    vn = torch.randn(s.b, s.hkv, s.d, generator=gen).to(s.dev, s.dtype)
    q = torch.randn(s.b, s.hq, s.d, generator=gen).to(s.dev, s.dtype)
    if store == "slots":
        c = s.cq + 37
        k = torch.randn(s.b, s.hkv, c, s.d, generator=gen).to(s.dev, s.dtype)
        v = torch.randn(s.b, s.hkv, c, s.d, generator=gen).to(s.dev, s.dtype)
        n = torch.tensor(([c, c // 2 + 5, 9] * s.b)[: s.b], dtype=torch.int32, device=s.dev)
        k2, v2 = R.append_slots(k, v, kn, vn, n - 1)
        ref = R.decode_attention_ref(q.float(), k2, v2, n, scale=s.d**-0.5)
        idx = torch.arange(s.b, device=s.dev)
        k[idx, :, (n - 1).long()] = float("nan")
        v[idx, :, (n - 1).long()] = float("nan")
        out = decode_attention(q, k, v, n, scale=s.d**-0.5, block_t=s.block_t, k_new=kn, v_new=vn, append_at=n - 1,
                               num_splits=c // s.block_t + 1)
    else:
        bits, g = 2, 32
        _, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=12)
        n_q = torch.full((s.b,), s.cq, dtype=torch.int32, device=s.dev)
        slot = torch.tensor(([s.r - 1, 5, 0] * s.b)[: s.b], dtype=torch.int32, device=s.dev)
        kr2, vr2 = R.append_slots(kr, vr, kn, vn, slot)
        ref = R.kivi_decode_attention_ref(q.float(), qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros,
                                          kr2, vr2, n_q, slot + 1, bits=bits, group_size=g, scale=s.d**-0.5)
        idx = torch.arange(s.b, device=s.dev)
        kr[idx, :, slot.long()] = float("nan")
        vr[idx, :, slot.long()] = float("nan")
        kc, vc, layout = qk.codes, qv.codes, "canonical"
        if store == "kivi-planes":
            kc, vc, layout = P.keys_to_planes(kc, bits), P.values_to_planes(vc, bits), "planes"
        out = kivi_decode_attention(q, kc, qk.scales, qk.zeros, vc, qv.scales, qv.zeros, kr, vr, n_q, slot + 1,
                                    bits=bits, group_size=g, scale=s.d**-0.5, block_t=s.block_t, k_new=kn, v_new=vn,
                                    append_at=slot, num_splits=(s.cq + s.r) // s.block_t, layout=layout)
    _assert_close(out, ref, s.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_attention_past_two_to_the_31_elements():
    """A buffer of more than 2^31 elements (a large batch at long context: 64 rows x 8 heads x 32K x 128 is 2^31):
    the last row's attention equals the reference on that row alone (32-bit offsets would wrap, then fault)."""
    from memfit.kernels.kivi_attention import decode_attention

    b, hq, hkv, c, d = 130, 32, 8, 16400, 128  # 2.18e9 elements per buffer
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs ~9 GiB of free GPU memory")
    k = torch.empty(b, hkv, c, d, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    assert k.numel() > 2**31
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device="cuda")
    n = torch.full((b,), c, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, n, scale=d**-0.5)
    ref = R.decode_attention_ref(q[-1:].float(), k[-1:], v[-1:], n[-1:], scale=d**-0.5)
    _assert_close(out[-1:], ref, torch.bfloat16)


@pytest.mark.parametrize("device", [pytest.param("reference", id="reference"), *_DEVICES])
def test_one_token_off_fails_the_check(device, request):
    """The tolerance is tight: the reference over the same KIVI cache with one token dropped or duplicated fails
    `_assert_close`, for each boundary token of row 1 (first / last quantized, first / last residual: where an
    off-by-one would strike), while the kernel passes it. Test shapes (on CUDA too: the check, not the size)."""
    s = _setup("interpret", request) if device == "interpret" else Setup(
        "cuda" if device == "cuda" else "cpu", torch.bfloat16, 3, 8, 2, 64, 128, 32, 32, 1)
    bits, g, scale, row = 2, 32, s.d**-0.5, 1
    q, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=21)
    n_q, n_r = _kivi_lengths(s, g)
    args = (q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q, n_r)
    ref = R.kivi_decode_attention_ref(q.float(), *args[1:], bits=bits, group_size=g, scale=scale)
    dk = R.dequantize_keys(qk.codes, qk.scales, qk.zeros, bits, g)
    dv = R.dequantize_values(qv.codes, qv.scales, qv.zeros, bits, g)
    keys = [torch.cat([dk[i, :, : n_q[i]], kr[i, :, : n_r[i]].float()], dim=1) for i in range(s.b)]
    values = [torch.cat([dv[i, :, : n_q[i]], vr[i, :, : n_r[i]].float()], dim=1) for i in range(s.b)]
    torch.testing.assert_close(_dense_loop(q, keys, values, scale), ref.double(), rtol=1e-5, atol=1e-5)
    nq = int(n_q[row])
    margins = []
    for t in (0, nq - 1, nq, nq + int(n_r[row]) - 1):
        for how in ("drop", "duplicate"):
            keep = [i for i in range(keys[row].shape[1]) if i != t] if how == "drop" else None
            k2, v2 = list(keys), list(values)
            if keep is None:
                k2[row] = torch.cat([keys[row][:, : t + 1], keys[row][:, t:]], dim=1)
                v2[row] = torch.cat([values[row][:, : t + 1], values[row][:, t:]], dim=1)
            else:
                k2[row], v2[row] = keys[row][:, keep], values[row][:, keep]
            err = _rel_err(_dense_loop(q, k2, v2, scale), ref).max().item()
            margins.append(err / _tolerance(s.dtype))
            assert err > _tolerance(s.dtype), f"{how} token {t}: error {err:.3g} within the tolerance"
    if device != "reference":
        from memfit.kernels.kivi_attention import kivi_decode_attention

        out = kivi_decode_attention(*args, bits=bits, group_size=g, scale=scale, block_t=s.block_t)
        err = _assert_close(out, ref, s.dtype)
        _report("one_token_off", device=device, dtype=str(s.dtype), kernel_rel_err=err, tol=_tolerance(s.dtype),
                smallest_perturbation_over_tol=min(margins))


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("append", [False, True])
def test_h2o_kernel_matches_reference(device, append, request):
    from memfit.kernels.h2o_decode import h2o_decode

    s = _setup(device, request)
    b, hkv, d = s.b, s.hkv, s.d
    gen = torch.Generator().manual_seed(4)
    c = s.cq + 1
    q = torch.randn(b, s.hq, d, generator=gen).to(s.dev, s.dtype)
    k = torch.randn(b, hkv, c, d, generator=gen).to(s.dev, s.dtype)
    v = torch.randn(b, hkv, c, d, generator=gen).to(s.dev, s.dtype)
    acc = (torch.rand(b, hkv, c, generator=gen) * 4).to(s.dev)
    pos = torch.stack([torch.randperm(c, generator=gen) for _ in range(b * hkv)]).view(b, hkv, c).int().to(s.dev)
    n = torch.tensor(([c, c - 9] * b)[:b], dtype=torch.int32, device=s.dev)
    cur = torch.full((b,), c, dtype=torch.int32, device=s.dev)
    recent = c // 4
    kw = {}
    k_ref, v_ref, acc_ref_in, pos_ref = k, v, acc, pos
    if append:
        kn = torch.randn(b, hkv, d, generator=gen).to(s.dev, s.dtype)
        vn = torch.randn(b, hkv, d, generator=gen).to(s.dev, s.dtype)
        slot = torch.randint(0, c - 9, (b, hkv), generator=gen).int().to(s.dev)
        k_ref, v_ref, acc_ref_in, pos_ref = R.h2o_append_ref(k, v, acc, pos, kn, vn, slot, cur)
        kw = dict(k_new=kn, v_new=vn, slot=slot.clone())
    out_r, acc_r, vic_r = R.h2o_decode_ref(q.float(), k_ref, v_ref, n, acc_ref_in, pos_ref, cur, recent,
                                           scale=d**-0.5)
    acc_k, pos_k = acc.clone(), pos.clone()
    out_k, vic_k = h2o_decode(q, k, v, n, acc_k, pos_k, cur, recent, scale=d**-0.5, block_t=s.block_t, **kw)
    err = _assert_close(out_k, out_r, s.dtype)
    torch.testing.assert_close(acc_k, acc_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(pos_k, pos_ref)
    if append:
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(vic_k.long(), vic_r)
    _report("h2o_decode", device=device, append=append, dtype=str(s.dtype), shape=[b, s.hq, hkv, d, c],
            max_rel_err=err, acc_max_abs_err=(acc_k - acc_r).abs().max().item())


class _H2OState:
    """One side (kernel or reference) of a teacher-forced H2O decode over a fixed buffer of `cap` slots."""

    def __init__(self, k, v, acc, pos, n, slot):
        self.k, self.v, self.acc, self.pos = k.clone(), v.clone(), acc.clone(), pos.clone()
        self.n, self.slot = n.clone(), slot.clone()


# name: (capacity, score chunk, recent window, zero queries (uniform attention: exact score ties at every step))
_H2O_RUNS = {
    "distinct-scores": (72, 256, 8, False),
    "ties-across-chunks": (136, 64, 0, True),  # chunks of 64 slots; recent=0: the new token is a candidate too
    "ties-across-tiles": (136, 256, 4, True),  # one chunk, two 128-slot tiles
}


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("run", list(_H2O_RUNS))
def test_h2o_kernel_picks_the_reference_victims_over_steps(device, run, request):
    """Teacher-forced decode steps (same queries and new tokens on both sides, each side its own buffers): the
    kernel evicts the same slot as `h2o_decode_ref` at every step and for every (row, KV head), including exact
    score ties (both take the lowest slot index) and while a row's buffer is still filling (its first empty slot).
    Row 0 starts 5 slots short of full, row 1 full."""
    from memfit.kernels.h2o_decode import h2o_decode

    s = _setup(device, request)
    cap, chunk, recent, zero_q = _H2O_RUNS[run]
    b, hq, hkv, d, steps = (2, 2, 1, 32, 10) if device == "interpret" else (3, 32, 8, 128, 200)
    if device == "cuda":
        cap = cap * 16 + 1
    gen = torch.Generator().manual_seed(8)
    dev, dt = s.dev, s.dtype
    k = torch.randn(b, hkv, cap, d, generator=gen).to(dev, dt)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(dev, dt)
    if zero_q:  # scores on a grid of quarters: many slots share the minimum, and keep sharing it
        acc = torch.randint(0, 8, (b, hkv, cap), generator=gen).float() / 4
        acc[..., ::9] = 0  # the minimum in every tile and chunk: a tie the lowest slot must win
    else:
        acc = torch.rand(b, hkv, cap, generator=gen) * 4
    pos = torch.arange(cap, dtype=torch.int32).expand(b, hkv, cap).contiguous()
    n = torch.tensor(([cap - 5] + [cap] * b)[:b], dtype=torch.int32)
    slot = n.clamp(max=cap - 1)[:, None].expand(b, hkv).contiguous()  # row 0: its first empty slot
    sides = [_H2OState(*(t.to(dev) for t in (k, v, acc, pos, n, slot))) for _ in range(2)]
    ker, ref = sides
    ref.slot = ref.slot.long()
    near_ties = 0
    for step in range(steps):
        cur = torch.full((b,), cap + step, dtype=torch.int32, device=dev)
        q = torch.randn(b, hq, d, generator=gen).to(dev, dt) * (0 if zero_q else 1)
        kn = torch.randn(b, hkv, d, generator=gen).to(dev, dt)
        vn = torch.randn(b, hkv, d, generator=gen).to(dev, dt)
        for side in sides:
            side.n = torch.clamp(side.n + 1, max=cap).int()
        out_k, _ = h2o_decode(q, ker.k, ker.v, ker.n, ker.acc, ker.pos, cur, recent, scale=d**-0.5, k_new=kn,
                              v_new=vn, slot=ker.slot, victim=ker.slot, chunk=chunk, num_splits=2,
                              block_t=s.block_t)
        ref.k, ref.v, acc_in, ref.pos = R.h2o_append_ref(ref.k, ref.v, ref.acc, ref.pos, kn, vn, ref.slot, cur)
        out_r, ref.acc, ref.slot = R.h2o_decode_ref(q.float(), ref.k, ref.v, ref.n, acc_in, ref.pos, cur, recent,
                                                    scale=d**-0.5)
        assert torch.equal(ker.pos, ref.pos) and torch.equal(ker.k, ref.k) and torch.equal(ker.v, ref.v)
        torch.testing.assert_close(ker.acc, ref.acc, rtol=1e-5, atol=1e-5)
        _assert_close(out_k, out_r, dt)
        differ = ker.slot.long() != ref.slot
        if differ.any() and device == "cuda" and not zero_q:
            # On the GPU the scores differ from the reference's by fp32 rounding (summation order of the MMA):
            # two candidates closer than that may swap. Accept only such near-ties, then continue from the
            # reference's state so that later steps still compare the selection.
            gap = (ref.acc.gather(-1, ker.slot.long()[..., None]) - ref.acc.gather(-1, ref.slot[..., None])).abs()
            assert (gap[..., 0][differ] <= 1e-5).all(), f"step {step}: not a near-tie"
            near_ties += int(differ.sum())
            for name in ("k", "v", "acc", "pos"):
                setattr(ker, name, getattr(ref, name).clone())
            ker.slot = ref.slot.int()
            continue
        assert not differ.any(), f"step {step}: kernel {ker.slot.tolist()}, reference {ref.slot.tolist()}"
    _report("h2o_victims_over_steps", device=device, run=run, steps=steps, shape=[b, hq, hkv, d, cap],
            near_ties=near_ties, acc_max_abs_err=(ker.acc - ref.acc).abs().max().item())


def test_fp16_models_take_the_fp16_tiles(monkeypatch):
    """fp16 queries get the conversion-free fp16 tiles; bf16 ones keep the fp32 dequantization (their range passes
    fp16's); MEMFIT_KIVI_VARIANT overrides both."""
    from memfit.kernels.kivi_attention import VARIANTS, _policy

    monkeypatch.delenv("MEMFIT_KIVI_VARIANT", raising=False)
    assert _policy(8, 2, torch.float16) == VARIANTS["half"] and _policy(8, 4, torch.float16) == VARIANTS["halfpipe"]
    assert _policy(8, 2, torch.bfloat16) == VARIANTS["packed"] and _policy(8, 4, torch.bfloat16) == VARIANTS["pipe"]
    monkeypatch.setenv("MEMFIT_KIVI_VARIANT", "gather")
    assert _policy(8, 2, torch.float16) == VARIANTS["gather"]


def test_kernel_variant_names_and_numbers():
    """MEMFIT_KIVI_VARIANT takes a name or 'path,warps[,groups,stages]'; anything else is a clear error."""
    from memfit.errors import ConfigError
    from memfit.kernels.kivi_attention import VARIANTS, variant_spec

    assert variant_spec("pipe") == VARIANTS["pipe"] and variant_spec("4,8,2,3") == (4, 8, 2, 3)
    for bad in ("bogus", "1", "1,2,3,4,5"):
        with pytest.raises(ConfigError, match="unknown KIVI kernel variant"):
            variant_spec(bad)
