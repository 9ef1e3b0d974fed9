"""KIVI's decode-time flush for the fast backend's static store (`memfit.core.static_quant_store`), in Triton.

Each decode step of the static KIVI store may quantize the oldest full-precision value (per token, groups of G
channels) and a block of N keys (per channel, groups of G tokens), into preallocated code buffers, and overwrite
those ring entries with their dequantized values; whether it does is decided on the device from the step counters
(the step is replayed from a CUDA graph, so the host cannot branch). In plain PyTorch that is some eighty small
launches per layer and step; here it is three: one program per (row, KV head) for the value, one per (row, KV head,
block of channels) for the keys, each returning at once when its side does not flush, and one program that advances
the counters (tokens, quantized keys and values) and prepares the next step's ring slot and kernel lengths.
The counters are either one set shared by every row ((1,): a batch decoded in lockstep) or one set per row ((B,):
requests of different lengths stacked in one buffer, `memfit.core.stacks`).

The arithmetic is `memfit.core.quant.quantize`'s: min / max in fp32, scale = (max - min) / (2^bits - 1) and zero =
min stored in fp16, codes = round-half-even((x - zero) / scale) clamped (a zero scale divides by 1), dequantized as
zero + code * scale; IEEE divisions (`div_rn`), so the codes equal the PyTorch path's (tested in Triton's
interpreter: tests/test_static_quant.py). Reference: `StaticKIVILayer._flush_torch` / `_advance_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["advance_counters", "flush_keys", "flush_values", "supported"]


def supported(key_block: int, group_size: int, bits: int, head_dim: int) -> bool:
    """Block shapes Triton can hold: powers of two (keys per block / G, bytes per group, channels)."""
    cpb = 8 // bits

    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0

    return (key_block % group_size == 0 and pow2(key_block // group_size) and group_size % cpb == 0
            and pow2(group_size // cpb) and pow2(head_dim) and head_dim % group_size == 0 and pow2(head_dim // group_size))


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _flush_values_kernel(
    VR, VC, VS, VZ, T, QV,
    s_rb, s_rh, s_cb, s_ch, s_sb, s_sh, s_t,
    W: tl.constexpr, R: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    PLANES: tl.constexpr = False,
):
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid % HKV
    t = tl.load(T + b * s_t) + 1  # s_t: 0 = one counter for every row, 1 = a counter per row (memfit.core.stacks)
    qv = tl.load(QV + b * s_t)
    if t - qv > R:
        CPB: tl.constexpr = 8 // BITS
        NG: tl.constexpr = D // G
        NB: tl.constexpr = G // CPB
        LEVELS: tl.constexpr = (1 << BITS) - 1
        grp = tl.arange(0, NG)
        byte = tl.arange(0, NB)
        k = tl.arange(0, CPB)
        ch = grp[:, None, None] * G + byte[None, :, None] * CPB + k[None, None, :]  # (NG, NB, CPB)
        slot = qv % W
        ring = VR + b * s_rb + h * s_rh + slot * D + ch
        x = tl.load(ring).to(tl.float32)
        mn = tl.min(tl.min(x, 2), 1)
        mx = tl.max(tl.max(x, 2), 1)
        scale = tl.math.div_rn(mx - mn, tl.full([NG], LEVELS, tl.float32)).to(tl.float16)
        zero = mn.to(tl.float16)
        sf = scale.to(tl.float32)[:, None, None]
        zf = zero.to(tl.float32)[:, None, None]
        s = tl.where(sf > 0, sf, 1.0)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x - zf, s)), 0.0), LEVELS * 1.0)
        if PLANES:  # byte [qv // (16 * CPB), channel, qv % 16], field (qv // 16) % CPB; its bits are still zero
            vaddr = VC + b * s_cb + h * s_ch + (qv // (16 * CPB)) * (D * 16) + ch * 16 + qv % 16
            old = tl.load(vaddr)
            tl.store(vaddr, old | (code.to(tl.int32) << (((qv // 16) % CPB) * BITS)).to(tl.uint8))
        else:
            packed = tl.sum(code.to(tl.int32) << (k * BITS)[None, None, :], 2)  # (NG, NB)
            tl.store(VC + b * s_cb + h * s_ch + qv * (NG * NB) + grp[:, None] * NB + byte[None, :],
                     packed.to(tl.uint8))
        tl.store(VS + b * s_sb + h * s_sh + qv * NG + grp, scale)
        tl.store(VZ + b * s_sb + h * s_sh + qv * NG + grp, zero)
        tl.store(ring, (zf + code * sf).to(VR.dtype.element_ty))


@triton.jit
def _flush_keys_kernel(
    KR, KC, KS, KZ, T, QK,
    s_rb, s_rh, s_cb, s_ch, s_sb, s_sh, s_t,
    W: tl.constexpr, THRESH: tl.constexpr, N: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PLANES: tl.constexpr = False,
):
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid % HKV
    t = tl.load(T + b * s_t) + 1
    qk = tl.load(QK + b * s_t)
    if t - qk >= THRESH:
        CPB: tl.constexpr = 8 // BITS
        NGR: tl.constexpr = N // G
        NB: tl.constexpr = G // CPB
        LEVELS: tl.constexpr = (1 << BITS) - 1
        grp = tl.arange(0, NGR)
        byte = tl.arange(0, NB)
        k = tl.arange(0, CPB)
        ch = cid * BD + tl.arange(0, BD)
        tok = qk + grp[:, None, None, None] * G + byte[None, :, None, None] * CPB + k[None, None, :, None]
        ring = KR + b * s_rb + h * s_rh + (tok % W) * D + ch[None, None, None, :]  # (NGR, NB, CPB, BD)
        x = tl.load(ring).to(tl.float32)
        mn = tl.min(tl.min(x, 2), 1)  # (NGR, BD)
        mx = tl.max(tl.max(x, 2), 1)
        scale = tl.math.div_rn(mx - mn, tl.full([NGR, BD], LEVELS, tl.float32)).to(tl.float16)
        zero = mn.to(tl.float16)
        sf = scale.to(tl.float32)[:, None, None, :]
        zf = zero.to(tl.float32)[:, None, None, :]
        s = tl.where(sf > 0, sf, 1.0)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x - zf, s)), 0.0), LEVELS * 1.0)
        if PLANES:
            # the N tokens in order are N / 16 slices of 16; slice s of the sequence is field s % CPB of byte rows
            # (s // CPB) * 16 + 0..15; PW fields per byte row come from this flush (all CPB once N spans a block)
            PW: tl.constexpr = CPB if N // 16 >= CPB else N // 16
            NBK: tl.constexpr = N // 16 // PW
            c = tl.reshape(code.to(tl.int32), (NBK, PW, 16, BD))
            fields = ((qk // 16 + tl.arange(0, PW)) % CPB) * BITS
            byte_rows = tl.sum(c << fields[None, :, None, None], 1)  # (NBK, 16, BD)
            prow = ((qk // (16 * CPB) + tl.arange(0, NBK)) * 16)[:, None] + tl.arange(0, 16)[None, :]
            kaddr = KC + b * s_cb + h * s_ch + prow[:, :, None] * D + ch[None, None, :]
            old = tl.load(kaddr)
            tl.store(kaddr, old | byte_rows.to(tl.uint8))
        else:
            packed = tl.sum(code.to(tl.int32) << (k * BITS)[None, None, :, None], 2)  # (NGR, NB, BD)
            rows = qk // CPB + grp[:, None] * NB + byte[None, :]
            tl.store(KC + b * s_cb + h * s_ch + rows[:, :, None] * D + ch[None, None, :], packed.to(tl.uint8))
        srow = (qk // G + grp)[:, None] * D + ch[None, :]
        tl.store(KS + b * s_sb + h * s_sh + srow, scale)
        tl.store(KZ + b * s_sb + h * s_sh + srow, zero)
        tl.store(ring, (zf + code * sf).to(KR.dtype.element_ty))


@triton.jit
def _advance_kernel(
    T, QK, QV, SLOT, NQ, NR, batch, s_t,
    W: tl.constexpr, R: tl.constexpr, THRESH: tl.constexpr, N: tl.constexpr, BP: tl.constexpr,
):
    rows = tl.arange(0, BP)
    m = rows < batch
    c = rows * s_t  # s_t = 0: one set of counters for every row (written by lane 0 only); 1: a set per row
    own = m & (rows * (1 - s_t) == 0)  # s_t = 0: lane 0 only; 1: every row
    t = tl.load(T + c, mask=m, other=0) + 1
    qk = tl.load(QK + c, mask=m, other=0)
    qv = tl.load(QV + c, mask=m, other=0)
    qv = tl.where(t - qv > R, qv + 1, qv)
    qk = tl.where(t - qk >= THRESH, qk + N, qk)
    tl.store(T + c, t, mask=own)
    tl.store(QK + c, qk, mask=own)
    tl.store(QV + c, qv, mask=own)
    tl.store(SLOT + c, t % W, mask=own)
    nxt = t + 1
    tl.store(NQ + rows, tl.maximum(nxt - W, 0).to(tl.int32), mask=m)
    tl.store(NR + rows, tl.minimum(nxt, W).to(tl.int32), mask=m)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _counter_stride(counter: torch.Tensor, batch: int) -> int:
    """0 for one counter shared by the rows ((1,)), 1 for one per row ((B,), contiguous: memfit.core.stacks)."""
    if counter.numel() == 1:
        return 0
    if counter.shape != (batch,) or counter.stride(0) != 1:
        raise ValueError(f"step counters must be (1,) or ({batch},) contiguous, got {tuple(counter.shape)}")
    return 1


def flush_values(vr, vc, vs, vz, t_dev, qv_dev, *, ring: int, residual: int, group_size: int, bits: int,
                 planes: bool = False) -> None:
    """`planes`: vc holds plane-order codes (`memfit.core.planes`); the token's bits are OR-ed in."""
    b, h, _, d = vr.shape
    _flush_values_kernel[(b * h,)](
        vr, vc, vs, vz, t_dev, qv_dev, *_strides(vr), *_strides(vc), *_strides(vs), _counter_stride(t_dev, b),
        W=ring, R=residual, HKV=h, D=d, G=group_size, BITS=bits, PLANES=planes, num_warps=1,
    )  # fmt: skip


def flush_keys(kr, kc, ks, kz, t_dev, qk_dev, *, ring: int, threshold: int, block: int, group_size: int,
               bits: int, planes: bool = False) -> None:
    """`planes`: kc holds plane-order codes (`memfit.core.planes`; block a multiple of 16 tokens)."""
    b, h, _, d = kr.shape
    bd = min(d, max(16, 4096 // block))  # about 4K elements per program
    _flush_keys_kernel[(b * h, d // bd)](
        kr, kc, ks, kz, t_dev, qk_dev, *_strides(kr), *_strides(kc), *_strides(ks), _counter_stride(t_dev, b),
        W=ring, THRESH=threshold, N=block, HKV=h, D=d, BD=bd, G=group_size, BITS=bits, PLANES=planes, num_warps=4,
    )  # fmt: skip


def advance_counters(t_dev, qk_dev, qv_dev, slot, n_q, n_r, *, ring: int, residual: int, threshold: int,
                     block: int) -> None:
    batch = n_q.shape[0]
    _advance_kernel[(1,)](
        t_dev, qk_dev, qv_dev, slot, n_q, n_r, batch, _counter_stride(t_dev, batch),
        W=ring, R=residual, THRESH=threshold, N=block, BP=triton.next_power_of_2(batch), num_warps=1,
    )  # fmt: skip
