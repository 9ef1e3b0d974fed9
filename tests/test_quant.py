"""Tests for memfit.core.quant: packing, layout, accuracy, exact byte accounting, streaming residual buffer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.core.quant import (
    QuantError,
    QuantizedTensor,
    ResidualQuantBuffer,
    pack_codes,
    quantize,
    unpack_codes,
)
from memfit.errors import ConfigError

ALL_BITS = [1, 1.58, 2, 4, 8]
MINMAX_BITS = [1, 2, 4, 8]
# Independent of the module: codes per byte and largest code for each width.
PER_BYTE = {1: 8, 1.58: 5, 2: 4, 4: 2, 8: 1}
MAX_CODE = {1: 1, 1.58: 2, 2: 3, 4: 15, 8: 255}
FAST = settings(max_examples=30, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def _owns_exactly(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------ packing


@FAST
@given(
    bits=st.sampled_from(ALL_BITS),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    n=st.integers(0, 70),
    dim_pos=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_roundtrip(bits: float, lead: list[int], n: int, dim_pos: int, seed: int) -> None:
    shape = list(lead)
    dim = min(dim_pos, len(shape))
    shape.insert(dim, n)
    codes = torch.randint(0, MAX_CODE[bits] + 1, shape, generator=_gen(seed), dtype=torch.int64)
    packed = pack_codes(codes, bits, dim=dim)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.shape[dim] == math.ceil(n / PER_BYTE[bits])
    out = unpack_codes(packed, bits, n, dim=dim)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


def test_pack_bit_order() -> None:
    """First value in the low bits; ternary = sum code_k * 3^k (the layout a kernel relies on)."""
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [1 + 4 + 8 + 128]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [1 + 2 * 4 + 3 * 16, 3]
    assert pack_codes(torch.tensor([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
    assert pack_codes(torch.tensor([2, 1, 0, 0, 1, 2]), 1.58).tolist() == [2 + 3 + 81, 2]
    assert pack_codes(torch.tensor([2, 2, 2, 2, 2]), 1.58).tolist() == [242]
    assert pack_codes(torch.tensor([0, 255, 7]), 8).tolist() == [0, 255, 7]


# --------------------------------------------------------------------------------- reference quantizer


def _ref_quantize(x: torch.Tensor, bits: float, axis: str, G: int):
    """Loop-based reference: unpacked codes (B,H,T,d), per-group scale/zero (fp16), and x_hat (fp32)."""
    B, H, T, d = x.shape
    codes = torch.zeros(B, H, T, d, dtype=torch.long)
    xhat = torch.zeros(B, H, T, d)
    ng = T // G if axis == "token" else d // G
    sshape = (B, H, ng, d) if axis == "token" else (B, H, T, ng)
    scales = torch.zeros(sshape, dtype=torch.float16)
    zeros = torch.zeros(sshape, dtype=torch.float16)
    for b in range(B):
        for h in range(H):
            for g in range(ng):
                for o in range(d if axis == "token" else T):
                    idx = (b, h, slice(g * G, (g + 1) * G), o) if axis == "token" else (b, h, o, slice(g * G, (g + 1) * G))
                    sidx = (b, h, g, o) if axis == "token" else (b, h, o, g)
                    v = x[idx].float()
                    if bits == 1.58:
                        s = v.abs().mean().half().float()
                        c = torch.clamp(torch.round(v / (s if s > 0 else 1.0)), -1, 1)
                        codes[idx] = (c + 1).long()
                        xhat[idx] = c * s
                        scales[sidx] = s
                    else:
                        L = 2 ** int(bits) - 1
                        mn = v.min().half().float()
                        s = ((v.max() - v.min()) / L).half().float()
                        c = torch.clamp(torch.round((v - mn) / (s if s > 0 else 1.0)), 0, L)
                        codes[idx] = c.long()
                        xhat[idx] = c * s + mn
                        scales[sidx], zeros[sidx] = s, mn
    return codes, scales, zeros, xhat


def _ref_pack_layout(codes: torch.Tensor, bits: float, axis: str, G: int) -> torch.Tensor:
    """Expected packed bytes, built byte by byte from the layout stated in the module docstring."""
    B, H, T, d = codes.shape
    per = PER_BYTE[bits]
    bpg = math.ceil(G / per)
    ng = T // G if axis == "token" else d // G
    out = torch.zeros((B, H, ng * bpg, d) if axis == "token" else (B, H, T, ng * bpg), dtype=torch.long)
    base = 3 if bits == 1.58 else 2 ** int(bits)
    for b in range(B):
        for h in range(H):
            for o in range(d if axis == "token" else T):
                for g in range(ng):
                    for j in range(bpg):
                        byte = 0
                        for k in range(per):
                            pos = j * per + k
                            if pos < G:
                                v = codes[b, h, g * G + pos, o] if axis == "token" else codes[b, h, o, g * G + pos]
                                byte += int(v) * base**k
                        if axis == "token":
                            out[b, h, g * bpg + j, o] = byte
                        else:
                            out[b, h, o, g * bpg + j] = byte
    return out


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("G", [8, 10])
def test_layout_matches_reference(bits: float, axis: str, G: int) -> None:
    shape = (2, 2, 2 * G, 3) if axis == "token" else (2, 2, 3, 2 * G)
    x = _randn(shape, seed=int(bits * 100) + G)
    x[0, 0] = 0.0  # include all-constant groups
    q = quantize(x, bits, axis, G)
    codes, scales, zeros, xhat = _ref_quantize(x, bits, axis, G)
    assert q.codes.dtype == torch.uint8 and q.codes.is_contiguous()
    assert torch.equal(q.codes.long(), _ref_pack_layout(codes, bits, axis, G))
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales)
    if bits == 1.58:
        assert q.zeros is None
    else:
        assert q.zeros is not None and torch.equal(q.zeros, zeros)
    torch.testing.assert_close(q.dequantize(torch.float32), xhat, atol=1e-6, rtol=1e-6)
    assert q.dequantize().dtype == x.dtype


# --------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_mse_falls_as_bits_rise(axis: str) -> None:
    x = _randn((2, 4, 256, 64), seed=1)
    mse = [((quantize(x, b, axis, 32).dequantize(torch.float32) - x) ** 2).mean().item() for b in ALL_BITS]
    # 1 bit > ternary (1.58) > 2 > 4 > 8 bits, strictly
    assert all(a > b for a, b in zip(mse, mse[1:], strict=False)), mse
    assert mse[-1] < 1e-4 and mse[0] < 2.5


@FAST
@given(
    bits=st.sampled_from(MINMAX_BITS),
    axis=st.sampled_from(["token", "channel"]),
    G=st.sampled_from([2, 4, 8, 32]),
    scale=st.floats(1e-2, 1e3),
    seed=st.integers(0, 2**16),
)
def test_minmax_error_within_half_step(bits: int, axis: str, G: int, scale: float, seed: int) -> None:
    x = _randn((1, 2, 2 * G, G), seed=seed) * scale + scale / 3
    q = quantize(x, bits, axis, G)
    err = (q.dequantize(torch.float32) - x).abs()
    gdim = 3 if axis == "token" else 4
    s = q.scales.float().unsqueeze(gdim)
    if axis == "token":
        err = err.reshape(1, 2, 2, G, G)
        amax = x.abs().reshape(1, 2, 2, G, G).amax(3, keepdim=True)
    else:
        err = err.reshape(1, 2, 2 * G, 1, G)
        amax = x.abs().reshape(1, 2, 2 * G, 1, G).amax(4, keepdim=True)
    # half a step, plus the fp16 rounding of scale (times up to 255 levels) and of the minimum
    slack = amax * (2**-11) * (2 ** bits) + 1e-6
    assert bool((err <= s / 2 + slack).all())


@pytest.mark.parametrize("bits", ALL_BITS)
def test_constant_and_zero_groups_are_exact(bits: float) -> None:
    x = torch.full((1, 2, 8, 8), 0.75)
    x[0, 1] = 0.0
    torch.testing.assert_close(quantize(x, bits, "token", 8).dequantize(torch.float32), x)
    torch.testing.assert_close(quantize(x, bits, "channel", 4).dequantize(torch.float32), x)


def test_bf16_input_and_float32_scales() -> None:
    x = _randn((1, 2, 64, 32), seed=3, dtype=torch.bfloat16)
    q = quantize(x, 4, "channel", 32, scale_dtype=torch.float32)
    assert q.scales.dtype == torch.float32 and q.zeros is not None and q.zeros.dtype == torch.float32
    y = q.dequantize()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert ((y.float() - x.float()) ** 2).mean() < 0.02


# ----------------------------------------------------------------------------------------- byte counts


def _expected_nbytes(shape: tuple[int, int, int, int], bits: float, axis: str, G: int, scale_bytes: int) -> int:
    B, H, T, d = shape
    groups = B * H * (T // G) * d if axis == "token" else B * H * T * (d // G)
    code_bytes = groups * math.ceil(G / PER_BYTE[bits])
    n_float_tensors = 1 if bits == 1.58 else 2  # ternary stores no zero point
    return code_bytes + n_float_tensors * groups * scale_bytes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize(("shape", "G"), [((1, 3, 64, 64), 32), ((2, 2, 40, 80), 40), ((2, 1, 128, 128), 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_nbytes_closed_form(bits: float, axis: str, shape: tuple, G: int, scale_dtype: torch.dtype) -> None:
    x = _randn(shape, seed=5, dtype=torch.float16)
    q = quantize(x, bits, axis, G, scale_dtype=scale_dtype)
    sb = 2 if scale_dtype == torch.float16 else 4
    assert q.nbytes() == _expected_nbytes(shape, bits, axis, G, sb)
    assert q.nbytes() == sum(t.untyped_storage().nbytes() for t in q.tensors())
    assert all(_owns_exactly(t) for t in q.tensors())
    B, H, T, d = shape
    if bits != 1.58:  # powers of two with G % per_byte == 0: exactly bits/8 bytes per value
        assert q.codes.numel() == B * H * T * d * bits // 8
    elif G % 5 == 0:  # ternary packs exactly 1.6 bits/value when G is a multiple of 5
        assert q.codes.numel() * 8 == B * H * T * d * 8 // 5
        assert q.bits_per_value == 1.6
    bpg = math.ceil(G / PER_BYTE[bits])
    ng = T // G if axis == "token" else d // G
    assert q.codes.shape == ((B, H, ng * bpg, d) if axis == "token" else (B, H, T, ng * bpg))
    assert q.scales.shape == ((B, H, ng, d) if axis == "token" else (B, H, T, ng))


def test_ternary_g32_costs_1_75_bits() -> None:
    q = quantize(_randn((1, 1, 32, 64)), 1.58, "token", 32)
    assert q.codes.numel() == 7 * 64 and q.bits_per_value == 1.75


# ------------------------------------------------------------------------------------ slicing, concat


@FAST
@given(
    bits=st.sampled_from(ALL_BITS),
    axis=st.sampled_from(["token", "channel"]),
    start=st.integers(-50, 50),
    stop=st.one_of(st.none(), st.integers(-50, 50)),
    seed=st.integers(0, 1000),
)
def test_token_slice_equals_slice_of_full(bits: float, axis: str, start: int, stop: int | None, seed: int) -> None:
    x = _randn((2, 2, 40, 16), seed=seed)
    q = quantize(x, bits, axis, 8)
    full = q.dequantize(torch.float32)
    sl = slice(start, stop)
    part = q.dequantize(torch.float32, token_slice=sl)
    assert torch.equal(part, full[:, :, sl])


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_slice_tokens_is_view_and_consistent(axis: str) -> None:
    x = _randn((1, 2, 32, 16), seed=2)
    q = quantize(x, 2, axis, 8)
    sub = q.slice_tokens(8, 24)
    assert sub.num_tokens == 16 and sub.codes.data_ptr() != 0
    assert torch.equal(sub.dequantize(), q.dequantize()[:, :, 8:24])


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cat_equals_quantizing_the_concatenation(bits: float, axis: str) -> None:
    x1, x2 = _randn((2, 3, 16, 16), seed=7), _randn((2, 3, 24, 16), seed=8)
    joined = quantize(x1, bits, axis, 8).cat(quantize(x2, bits, axis, 8))
    whole = quantize(torch.cat([x1, x2], dim=2), bits, axis, 8)
    assert joined.shape == whole.shape == (2, 3, 40, 16)
    for a, b in zip(joined.tensors(), whole.tensors(), strict=True):
        assert torch.equal(a, b)
    assert joined.nbytes() == whole.nbytes()


# --------------------------------------------------------------------------------- residual buffer


def _expected_residual(n: int, R: int, flush: str) -> int:
    return n % R if flush == "block" else min(n, R)


def _check_buffer(buf: ResidualQuantBuffer, stream: torch.Tensor, n: int, flush: str) -> None:
    R = buf.residual_length
    r = _expected_residual(n, R, flush)
    assert buf.num_tokens == n and buf.residual_len == r and buf.quantized_len == n - r
    assert buf.residual is not None
    assert buf.residual.dtype == stream.dtype
    assert torch.equal(buf.residual, stream[:, :, n - r : n])  # the newest r tokens, bit-exact
    if n - r:
        ref = quantize(stream[:, :, : n - r], buf.bits, buf.axis, buf.group_size)  # type: ignore[arg-type]
        assert buf.quantized is not None
        for a, b in zip(buf.quantized.tensors(), ref.tensors(), strict=True):
            assert torch.equal(a, b)
    else:
        assert buf.quantized is None
    # exact byte accounting, independent formula
    B, H, _, d = stream.shape
    q_bytes = _expected_nbytes((B, H, n - r, d), buf.bits, buf.axis, buf.group_size, 2) if n - r else 0
    assert buf.nbytes() == q_bytes + B * H * r * d * stream.element_size()
    assert buf.nbytes() == sum(t.numel() * t.element_size() for t in buf.tensors())
    assert all(_owns_exactly(t) for t in buf.tensors())
    all_ = buf.dequantize_all()
    assert all_.shape == (B, H, n, d) and all_.dtype == stream.dtype
    assert torch.equal(all_[:, :, n - r :], stream[:, :, n - r : n])


BUFFER_CONFIGS = [  # (bits, axis, G, R, flush)
    (2, "token", 4, 8, "block"),  # KIVI keys (small)
    (1.58, "token", 4, 4, "block"),
    (4, "token", 8, 16, "block"),
    (2, "channel", 8, 6, "sliding"),  # KIVI values
    (1, "channel", 8, 0, "sliding"),  # no residual at all
    (8, "channel", 16, 5, "block"),  # GEAR-style blocks on the channel axis
]


@pytest.mark.parametrize(("bits", "axis", "G", "R", "flush"), BUFFER_CONFIGS)
@pytest.mark.parametrize("prefill", [0, 1, 7, 8, 9, 23])
def test_residual_buffer_prefill_then_decode(bits: float, axis: str, G: int, R: int, flush: str, prefill: int) -> None:
    N = prefill + 21
    stream = _randn((2, 3, N, 16), seed=prefill, dtype=torch.float16)
    buf = ResidualQuantBuffer(bits, axis, G, R, flush=flush)  # type: ignore[arg-type]
    n = 0
    if prefill:
        buf.append(stream[:, :, :prefill])
        n = prefill
        _check_buffer(buf, stream, n, flush)
    while n < N:
        buf.append(stream[:, :, n : n + 1])
        n += 1
        _check_buffer(buf, stream, n, flush)


@FAST
@given(
    cfg=st.sampled_from(BUFFER_CONFIGS),
    chunks=st.lists(st.integers(0, 19), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_residual_buffer_random_chunks(cfg: tuple, chunks: list[int], seed: int) -> None:
    bits, axis, G, R, flush = cfg
    N = sum(chunks)
    stream = _randn((1, 2, N, 16), seed=seed, dtype=torch.float16)
    buf = ResidualQuantBuffer(bits, axis, G, R, flush=flush)
    n = 0
    for c in chunks:
        buf.append(stream[:, :, n : n + c])
        n += c
        if n:
            _check_buffer(buf, stream, n, flush)


def test_residual_buffer_defaults_follow_kivi() -> None:
    assert ResidualQuantBuffer(2, "token", 32, 128).flush == "block"  # keys
    assert ResidualQuantBuffer(2, "channel", 32, 128).flush == "sliding"  # values


def test_residual_buffer_does_not_alias_input() -> None:
    buf = ResidualQuantBuffer(2, "token", 4, 8)
    x = _randn((1, 1, 3, 8))
    buf.append(x)
    x.zero_()
    assert buf.residual is not None and buf.residual.abs().sum() > 0


def test_kivi_prefill_split() -> None:
    """KIVI: prefill of L keys quantizes L - L mod R; values keep exactly the last R in full precision."""
    L, R, G = 1000, 128, 32
    x = _randn((1, 2, L, 64), dtype=torch.float16)
    keys = ResidualQuantBuffer(2, "token", G, R)
    values = ResidualQuantBuffer(2, "channel", G, R)
    keys.append(x)
    values.append(x)
    assert (keys.quantized_len, keys.residual_len) == (896, 104)
    assert (values.quantized_len, values.residual_len) == (872, 128)
    assert keys.nbytes() < x.numel() * 2 and values.nbytes() < x.numel() * 2


# ---------------------------------------------------------------------------------------- bad inputs

X = _randn((1, 2, 16, 8))

BAD_CALLS = [
    (lambda: quantize(X, 3, "token", 8), "bits must be one of"),
    (lambda: quantize(X, True, "token", 8), "bits must be one of"),
    (lambda: quantize(X, 2, "tokens", 8), "axis must be 'token'"),
    (lambda: quantize(X, 2, "token", 0), "group_size must be a positive int"),
    (lambda: quantize(X, 2, "token", 6), "T must be a multiple of 6"),
    (lambda: quantize(X, 2, "channel", 3), "d must be a multiple of 3"),
    (lambda: quantize(X[0], 2, "token", 8), r"shape \(B, H, T, d\)"),
    (lambda: quantize(X.long(), 2, "token", 8), "floating-point"),
    (lambda: quantize([1.0], 2, "token", 8), "torch.Tensor"),
    (lambda: quantize(X, 2, "token", 8, scale_dtype=torch.int8), "scale_dtype"),
    (lambda: pack_codes(torch.tensor([0, 4]), 2), r"must lie in \[0, 3\]"),
    (lambda: pack_codes(torch.tensor([-1, 0]), 1.58), r"must lie in \[0, 2\]"),
    (lambda: pack_codes(torch.tensor([0.5]), 2), "integer"),
    (lambda: unpack_codes(torch.zeros(2, dtype=torch.uint8), 2, 9), "capacity 8"),
    (lambda: unpack_codes(torch.zeros(2, dtype=torch.int32), 2, 4), "uint8"),
    (lambda: quantize(X, 2, "token", 8).dequantize(token_slice=slice(0, 8, 2)), "step 1"),
    (lambda: quantize(X, 2, "token", 8).slice_tokens(3, 8), "multiples of group_size"),
    (lambda: quantize(X, 2, "token", 8).cat(quantize(X, 4, "token", 8)), "cannot concatenate"),
    (lambda: quantize(X, 2, "token", 8).cat(quantize(X[:, :1], 2, "token", 8)), "B, H and d must match"),
    (lambda: QuantizedTensor.concat([]), "at least one"),
    (lambda: ResidualQuantBuffer(2, "token", 32, 48), "residual_length must be a multiple of group_size"),
    (lambda: ResidualQuantBuffer(2, "token", 32, 64, flush="sliding"), "needs axis='channel'"),
    (lambda: ResidualQuantBuffer(2, "channel", 32, 0, flush="block"), "residual_length >= 1"),
    (lambda: ResidualQuantBuffer(2, "channel", 32, -1), "non-negative int"),
    (lambda: ResidualQuantBuffer(2, "channel", 32, 8).dequantize_all(), "empty"),
    (lambda: ResidualQuantBuffer(2, "channel", 3, 8).append(X), "d must be a multiple of 3"),
]


@pytest.mark.parametrize(("call", "match"), BAD_CALLS)
def test_bad_inputs_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, QuantError) and isinstance(info.value, ConfigError)


def test_buffer_append_mismatch_raises() -> None:
    buf = ResidualQuantBuffer(2, "channel", 8, 4)
    buf.append(X)
    with pytest.raises(ValueError, match="append: expected shape"):
        buf.append(_randn((1, 2, 1, 16)))
    with pytest.raises(ValueError, match="append: expected dtype"):
        buf.append(X.half())


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cuda_matches_cpu(bits: float, axis: str) -> None:
    x = _randn((2, 4, 256, 64), seed=11, dtype=torch.float16)
    qc = quantize(x, bits, axis, 32)
    qg = quantize(x.cuda(), bits, axis, 32)
    assert qg.codes.is_cuda and qg.nbytes() == qc.nbytes()
    mismatch = (qg.codes.cpu() != qc.codes).float().mean().item()
    assert mismatch < 1e-3
    torch.testing.assert_close(qg.dequantize(torch.float32).cpu(), qc.dequantize(torch.float32), atol=0.05, rtol=0)
    for b in ALL_BITS:
        codes = torch.randint(0, MAX_CODE[b] + 1, (3, 77), device="cuda")
        assert torch.equal(unpack_codes(pack_codes(codes, b), b, 77).long(), codes)
    buf = ResidualQuantBuffer(bits, axis, 32, 64)
    stream = x.cuda()
    buf.append(stream[:, :, :100])
    for i in range(100, 140):
        buf.append(stream[:, :, i : i + 1])
    assert buf.num_tokens == 140
    assert torch.equal(buf.residual, stream[:, :, 140 - buf.residual_len : 140])
    assert buf.nbytes() == sum(t.numel() * t.element_size() for t in buf.tensors())
