"""Decode kernels: plain-PyTorch references against dense math (CPU, always), kernels against references.

- CPU (default suite): the references agree with `memfit.core.quant` (layout) and with a per-row dense loop.
- `-m gpu` (on the GPU machine): each Triton kernel against its reference on CUDA in bf16; the max abs errors are
  printed (run with `-s` to see them) and appended to $MEMFIT_KERNEL_REPORT (JSONL) when that is set.
- Triton's CPU interpreter: the same kernel checks run on CPU when TRITON_INTERPRET=1 and triton is installed.
"""

from __future__ import annotations

import json
import os

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


# ------------------------------------------------------------------------------------- kernels vs references

_DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    pytest.param("interpret", marks=pytest.mark.skipif(not (interpret_mode() and available()),
                                                       reason="needs TRITON_INTERPRET=1 and triton")),
]


def _report(name, **fields):
    line = {"test": name, **fields}
    print(json.dumps(line))
    path = os.environ.get("MEMFIT_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _setup(device):
    if device == "interpret":
        return "cpu", torch.float16, (1, 8, 2, 64, 128, 32, 32)  # small: the interpreter is slow
    return "cuda", torch.bfloat16, (3, 32, 8, 128, 2048, 128, 64)


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("packed", ["packed", "packed32", "fold", "gather"])
def test_kivi_kernel_matches_reference(device, bits, packed):
    from memfit.kernels.kivi_attention import kivi_decode_attention

    dev, dtype, (b, hq, hkv, d, cq, r, bt) = _setup(device)
    g, scale = 32, d**-0.5
    worst = 0.0
    for seed in range(3):
        q, qk, qv, kr, vr = _kivi_case(b, hq, hkv, d, cq, r, bits, g, dtype, dev, seed=seed + 10 * bits)
        lens_q = [cq, cq - 3 * g, g][:b] if b > 1 else [cq - g]
        lens_r = [0, r // 2 + 3, r][:b] if b > 1 else [r // 2 + 1]
        n_q = torch.tensor(lens_q, dtype=torch.int32, device=dev)
        n_r = torch.tensor(lens_r, dtype=torch.int32, device=dev)
        args = (q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q, n_r)
        ref = R.kivi_decode_attention_ref(*args, bits=bits, group_size=g, scale=scale).float()
        out = torch.full_like(q, float("nan"))
        kivi_decode_attention(*args, bits=bits, group_size=g, scale=scale, block_t=bt, out=out, packed=packed)
        assert torch.isfinite(out).all()
        err = (out.float() - ref).abs().max().item()
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        assert rel < 1e-2, rel
        assert err < 3e-2, err
    _report(
        "kivi_decode_attention",
        device=device,
        bits=bits,
        packed=packed,
        dtype=str(dtype),
        shape=[b, hq, hkv, d, cq, r],
        max_abs_err=worst,
    )


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("packed", ["packed", "packed32"])
def test_kivi_kernel_appends_new_token(device, packed):
    """k_new / v_new are written into residual slot n_r - 1 (split 0 stores them) and used for that slot."""
    from memfit.kernels.kivi_attention import kivi_decode_attention

    dev, dtype, (b, hq, hkv, d, cq, r, bt) = _setup(device)
    bits, g, scale = 2, 32, d**-0.5
    q, qk, qv, kr, vr = _kivi_case(b, hq, hkv, d, cq, r, bits, g, dtype, dev, seed=5)
    gen = torch.Generator().manual_seed(6)
    kn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
    vn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
    old_r = torch.tensor(([3, 0, r - 1] * b)[:b], dtype=torch.int32, device=dev)
    n_q = torch.full((b,), cq, dtype=torch.int32, device=dev)
    kr2, vr2 = R.append_slots(kr, vr, kn, vn, old_r)
    ref = R.kivi_decode_attention_ref(q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr2, vr2,
                                      n_q, old_r + 1, bits=bits, group_size=g, scale=scale).float()
    out = kivi_decode_attention(q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q,
                                old_r + 1, bits=bits, group_size=g, scale=scale, block_t=bt, k_new=kn, v_new=vn,
                                append_at=old_r, packed=packed)
    err = (out.float() - ref).abs().max().item()
    assert err < 3e-2, err
    assert torch.equal(kr, kr2) and torch.equal(vr, vr2)  # the cache now holds the new token


@pytest.mark.parametrize("device", _DEVICES)
def test_decode_attention_kernel_matches_reference(device):
    from memfit.kernels.kivi_attention import decode_attention

    dev, dtype, (b, hq, hkv, d, cq, _, bt) = _setup(device)
    gen = torch.Generator().manual_seed(3)
    c = cq + 37
    q = torch.randn(b, hq, d, generator=gen).to(dev, dtype)
    k = torch.randn(b, hkv, c, d, generator=gen).to(dev, dtype)
    v = torch.randn(b, hkv, c, d, generator=gen).to(dev, dtype)
    n = torch.tensor(([c, 1, c // 2 + 5] * b)[:b], dtype=torch.int32, device=dev)
    ref = R.decode_attention_ref(q, k, v, n, scale=d**-0.5).float()
    out = decode_attention(q, k, v, n, scale=d**-0.5, block_t=bt)
    err = (out.float() - ref).abs().max().item()
    assert err < 3e-2, err
    # fused append: the new token goes to slot n - 1
    kn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
    vn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
    k2, v2 = R.append_slots(k, v, kn, vn, n - 1)
    ref2 = R.decode_attention_ref(q, k2, v2, n, scale=d**-0.5).float()
    out2 = decode_attention(q, k, v, n, scale=d**-0.5, block_t=bt, k_new=kn, v_new=vn, append_at=n - 1)
    err2 = (out2.float() - ref2).abs().max().item()
    assert err2 < 3e-2, err2
    assert torch.equal(k, k2) and torch.equal(v, v2)
    _report("decode_attention", device=device, dtype=str(dtype), shape=[b, hq, hkv, d, c], max_abs_err=max(err, err2))


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("append", [False, True])
def test_h2o_kernel_matches_reference(device, append):
    from memfit.kernels.h2o_decode import h2o_decode

    dev, dtype, (b, hq, hkv, d, cq, _, bt) = _setup(device)
    gen = torch.Generator().manual_seed(4)
    c = cq + 1
    q = torch.randn(b, hq, d, generator=gen).to(dev, dtype)
    k = torch.randn(b, hkv, c, d, generator=gen).to(dev, dtype)
    v = torch.randn(b, hkv, c, d, generator=gen).to(dev, dtype)
    acc = (torch.rand(b, hkv, c, generator=gen) * 4).to(dev)
    pos = torch.stack([torch.randperm(c, generator=gen) for _ in range(b * hkv)]).view(b, hkv, c).int().to(dev)
    n = torch.tensor(([c, c - 9] * b)[:b], dtype=torch.int32, device=dev)
    cur = torch.full((b,), c, dtype=torch.int32, device=dev)
    recent = c // 4
    kw = {}
    k_ref, v_ref, acc_ref_in, pos_ref = k, v, acc, pos
    if append:
        kn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
        vn = torch.randn(b, hkv, d, generator=gen).to(dev, dtype)
        slot = torch.randint(0, c - 9, (b, hkv), generator=gen).int().to(dev)
        k_ref, v_ref, acc_ref_in, pos_ref = R.h2o_append_ref(k, v, acc, pos, kn, vn, slot, cur)
        kw = dict(k_new=kn, v_new=vn, slot=slot.clone())
    out_r, acc_r, vic_r = R.h2o_decode_ref(q, k_ref, v_ref, n, acc_ref_in, pos_ref, cur, recent, scale=d**-0.5)
    acc_k, pos_k = acc.clone(), pos.clone()
    out_k, vic_k = h2o_decode(q, k, v, n, acc_k, pos_k, cur, recent, scale=d**-0.5, block_t=bt, **kw)
    err = (out_k.float() - out_r.float()).abs().max().item()
    acc_err = (acc_k - acc_r).abs().max().item()
    assert err < 3e-2, err
    assert acc_err < 1e-3, acc_err
    assert torch.equal(pos_k, pos_ref)
    if append:
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    # the victim must be a minimum of the reference scores (exact ties aside, the same slot)
    picked = acc_r.gather(-1, vic_k.long()[..., None])[..., 0]
    best = acc_r.gather(-1, vic_r[..., None])[..., 0]
    empty = n[:, None].expand(b, hkv) < c
    assert torch.equal(vic_k.long()[empty], vic_r[empty])
    assert (picked[~empty] <= best[~empty] + 1e-4).all()
    _report(
        "h2o_decode",
        device=device,
        append=append,
        dtype=str(dtype),
        shape=[b, hq, hkv, d, c],
        max_abs_err=err,
        acc_max_abs_err=acc_err,
        victims_equal=bool(torch.equal(vic_k.long(), vic_r)),
    )
