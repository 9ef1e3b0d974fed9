"""The Triton kernel behind `memfit.kernels.int4_pairs` (this module imports triton: import it lazily)."""

from __future__ import annotations

import triton
import triton.language as tl

# One 32-bit word holds four pairs of 4-bit codes in "pair order" (`int4_pairs.to_pairs`): pair i in nibbles i (bits
# 4i..4i+3) and 4 + i. Shifting the word right by 4i and masking 0x000F000F leaves the pair in the two 16-bit
# halves; OR-ing 0x4300 (bf16 128.0, whose last mantissa bit is worth 1) into each half makes the bf16 pair
# (128 + q_a, 128 + q_b), exactly. One bf16x2 FMA subtracts 136 (exact: q - 8 in -8..7) and a second multiplies by
# the pair's two inputs, which the bf16 input holds contiguously: one int32 of the input seen as int32 pairs.
# Four pairs accumulate in the bf16x2 register, then the two halves are summed in fp32. Per word: 3 shifts, 4 LOP3,
# 8 bf16x2 FMAs, 3 instructions to reach fp32: ~2.25 per weight, against ~5 for unpacking each code to fp32.
# `lop3` 0xEA is (a & b) | c. bf16x2 FMA needs sm_80; no sm_90-only instruction is used.
_DOT8_ASM = tl.constexpr("""
{
.reg .b32 w1, w2, w3, p0, p1, p2, p3, one, m136, acc, lo, hi;
.reg .f32 flo, fhi;
mov.b32 one, 0x3F803F80;
mov.b32 m136, 0xC308C308;
shr.u32 w1, $1, 4;
shr.u32 w2, $1, 8;
shr.u32 w3, $1, 12;
lop3.b32 p0, $1, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 p1, w1, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 p2, w2, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 p3, w3, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 p0, p0, one, m136;
fma.rn.bf16x2 p1, p1, one, m136;
fma.rn.bf16x2 p2, p2, one, m136;
fma.rn.bf16x2 p3, p3, one, m136;
mov.b32 acc, 0;
fma.rn.bf16x2 acc, p0, $2, acc;
fma.rn.bf16x2 acc, p1, $3, acc;
fma.rn.bf16x2 acc, p2, $4, acc;
fma.rn.bf16x2 acc, p3, $5, acc;
shl.b32 lo, acc, 16;
and.b32 hi, acc, 0xFFFF0000;
mov.b32 flo, lo;
mov.b32 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


@triton.jit
def _bf16_lo(p):
    return (p << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(p):
    return (p & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _dot8(w, x0, x1, x2, x3, USE_ASM: tl.constexpr):
    """sum over a word's eight codes of (q - 8) * x, in fp32 (the asm path accumulates pairs in bf16 first)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_DOT8_ASM, "=r,r,r,r,r,r", [w, x0, x1, x2, x3], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:  # the same arithmetic in plain Triton (the CPU interpreter cannot run PTX): fp32 throughout
        acc = (((w & 15) - 8).to(tl.float32) * _bf16_lo(x0) + (((w >> 16) & 15) - 8).to(tl.float32) * _bf16_hi(x0))
        acc += (((w >> 4) & 15) - 8).to(tl.float32) * _bf16_lo(x1) + (((w >> 20) & 15) - 8).to(tl.float32) * _bf16_hi(x1)
        acc += (((w >> 8) & 15) - 8).to(tl.float32) * _bf16_lo(x2) + (((w >> 24) & 15) - 8).to(tl.float32) * _bf16_hi(x2)
        acc += (((w >> 12) & 15) - 8).to(tl.float32) * _bf16_lo(x3) + (((w >> 28) & 15) - 8).to(tl.float32) * _bf16_hi(x3)
        return acc


@triton.jit
def _xsum8(x0, x1, x2, x3):
    """The eight bf16 inputs of a word, summed in fp32."""
    return ((_bf16_lo(x0) + _bf16_hi(x0)) + (_bf16_lo(x1) + _bf16_hi(x1))) + (
        (_bf16_lo(x2) + _bf16_hi(x2)) + (_bf16_lo(x3) + _bf16_hi(x3)))


@triton.jit
def int4_pairs_gemv_kernel(
    X32, W, S, OFF, Y, PART, COUNT,
    n, n_iters, n_blocks,
    s_x, s_w, s_s, s_y,
    G: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr, SPLIT: tl.constexpr, USE_ASM: tl.constexpr,
):
    # X32: bf16 input rows seen as int32 pairs; W: codes as int32 words in pair order, (n, k / 8); S, OFF: fp16
    # (n, k / G). Program (m, i, j): input row m (the fastest grid axis, so the programs of several rows that read
    # one weight tile run together and share it through L2), BLOCK_N output rows, iterations j, j + SPLIT, ... of GPI
    # groups each. Per group: sum_k (q_k * s + o) x_k = s * sum_k (q_k - 8) x_k + (o + 8 s) * sum_k x_k. Products
    # accumulate per (row, word) in registers; one reduction at the end.
    # Word w of a group reads input pairs 16 * (w // 4) + 4 * i + w % 4, i = 0..3 (`int4_pairs.to_pairs`): four
    # consecutive words read four consecutive pairs for each i, one vector load. The input is loaded once per
    # (group, word) and broadcast over the rows: in development on the H200, loads spanning the rows (stride 0,
    # which skip the layout conversion through shared memory) ran slower, and so did scales loaded that way.
    GW: tl.constexpr = G // 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    xrow = X32 + pid_m * s_x
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    r3 = rows[:, None, None]
    m3 = rmask[:, None, None]
    gi = tl.arange(0, GPI)[None, :, None]
    wi = tl.arange(0, GW)[None, None, :]
    xo = (wi // 4) * 16 + wi % 4
    shape: tl.constexpr = (BLOCK_N, GPI, GW)
    acc = tl.zeros(shape, dtype=tl.float32)
    accb = tl.zeros((BLOCK_N, GPI, 1), dtype=tl.float32)
    for it in range(pid_k, n_iters, SPLIT):
        g = it * GPI + gi
        words = tl.load(W + r3 * s_w + g * GW + wi, mask=m3, other=0)
        xb = xrow + g * (4 * GW) + xo
        x0 = tl.load(xb)
        x1 = tl.load(xb + 4)
        x2 = tl.load(xb + 8)
        x3 = tl.load(xb + 12)
        part = _dot8(words, tl.broadcast_to(x0, shape), tl.broadcast_to(x1, shape), tl.broadcast_to(x2, shape),
                     tl.broadcast_to(x3, shape), USE_ASM)
        s = tl.load(S + r3 * s_s + g, mask=m3, other=0.0).to(tl.float32)
        o = tl.load(OFF + r3 * s_s + g, mask=m3, other=0.0).to(tl.float32)
        acc += part * s
        accb += (o + 8.0 * s) * tl.sum(_xsum8(x0, x1, x2, x3), axis=2, keep_dims=True)
    y = tl.sum(tl.sum(acc, axis=2) + tl.sum(accb, axis=2), axis=1)
    yrow = Y + pid_m * s_y
    if SPLIT > 1:
        # split-K without atomics on the output (which would need a zeroed fp32 buffer and a cast: two more
        # launches per matmul): each program stores its fp32 partial sums, and the last of a row block's SPLIT
        # programs (a per-block counter, which it resets for the next call) adds them in a fixed order and writes
        # the output once, in its dtype.
        base = PART + pid_m * SPLIT * n
        tl.store(base + pid_k * n + rows, y, mask=rmask)
        counter = COUNT + pid_m * n_blocks + pid_n
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == SPLIT - 1:
            tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in range(SPLIT):
                tot += tl.load(base + j * n + rows, mask=rmask, other=0.0, cache_modifier=".cg")
            tl.store(yrow + rows, tot.to(Y.dtype.element_ty), mask=rmask)
            tl.atomic_xchg(counter, 0)
    else:
        tl.store(yrow + rows, y.to(Y.dtype.element_ty), mask=rmask)
