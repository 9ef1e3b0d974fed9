"""The Triton kernels behind `memfit.kernels.group_gemv` (this module imports triton: import it lazily)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale_offset(S, OFF, rows, rmask, gcol, s_s):
    """Each row's fp16 scale and offset of group ``gcol``, in fp32."""
    scale = tl.load(S + rows * s_s + gcol, mask=rmask, other=0.0).to(tl.float32)
    offset = tl.load(OFF + rows * s_s + gcol, mask=rmask, other=0.0).to(tl.float32)
    return scale, offset


@triton.jit
def _as_float(code):
    """Small unsigned integer codes (< 2^23) as fp32 without a conversion instruction (those issue at a fraction of
    the rate of float adds): 0x4B000000 is 2^23 as an fp32, so OR-ing a code into its mantissa gives 2^23 + code,
    and subtracting 2^23 leaves the code, exactly. (On an H200 it made no measurable difference at the earlier
    launch shape, 32 rows and two warps; the 8-row one-warp default was measured with it.)"""
    return (code.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _tiled_codes(W, rows, rmask, g, s_w, BITS: tl.constexpr, G: tl.constexpr):
    """Widths that tile a word (1, 2, 4, 8 bits): the group's int32 words of every row, loaded as one contiguous
    (vectorised) tile and unpacked in registers, as fp32 codes shaped (rows, words, codes per word)."""
    WG: tl.constexpr = G * BITS // 32
    PER: tl.constexpr = 32 // BITS
    wi = tl.arange(0, WG)
    sub = tl.arange(0, PER)
    words = tl.load(W + rows[:, None] * s_w + g * WG + wi[None, :], mask=rmask[:, None], other=0)
    words = words.to(tl.uint32, bitcast=True)
    return _as_float((words[:, :, None] >> (sub * BITS).to(tl.uint32)[None, None, :]) & ((1 << BITS) - 1))


@triton.jit
def _tiled_cols(gcol, BITS: tl.constexpr, G: tl.constexpr):
    """The input columns of `_tiled_codes`' codes, in the same (words, codes per word) shape."""
    WG: tl.constexpr = G * BITS // 32
    PER: tl.constexpr = 32 // BITS
    return gcol * G + tl.arange(0, WG)[:, None] * PER + tl.arange(0, PER)[None, :]


@triton.jit
def _straddling_codes(W, rows, rmask, g, s_w, BITS: tl.constexpr, G: tl.constexpr):
    """Widths that straddle words (3, 5, 6, 7 bits): each code reads its word, and the next one where its high bits
    spill over; fp32 codes shaped (rows, G)."""
    WG: tl.constexpr = G * BITS // 32
    bit = tl.arange(0, G) * BITS
    shift = (bit % 32).to(tl.uint32)
    ptr = W + rows[:, None] * s_w + g * WG + (bit // 32)[None, :]
    code = tl.load(ptr, mask=rmask[:, None], other=0).to(tl.uint32, bitcast=True) >> shift[None, :]
    spill = shift[None, :] + BITS > 32
    hi = tl.load(ptr + 1, mask=rmask[:, None] & spill, other=0).to(tl.uint32, bitcast=True)
    return _as_float((code | tl.where(spill, hi << (32 - shift[None, :]), 0)) & ((1 << BITS) - 1))


@triton.jit
def _store(Y, yptr, acc, ymask, ATOMIC: tl.constexpr):
    if ATOMIC:  # k-split programs or several widths add into one fp32 output
        tl.atomic_add(yptr, acc, mask=ymask)
    else:
        tl.store(yptr, acc.to(Y.dtype.element_ty), mask=ymask)


@triton.jit
def group_gemv_rows_kernel(
    X, W, GIDX, S, OFF, Y,
    m, n, k_in, n_groups,
    s_x, s_w, s_s, s_y,
    BITS: tl.constexpr, G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    # 1-4 input rows. W: the bucket's packed codes seen as int32 words (a group's G * BITS bits are whole words).
    # Per group: sum_j (code_j * scale + offset) * x_j = scale * sum_j code_j x_j + offset * sum_j x_j. Rows past m
    # (BLOCK_M rounds m up) re-read the last row: their sums are never stored.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    mi = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(pid_k, n_groups, SPLIT):
        gcol = tl.load(GIDX + g)
        scale, offset = _scale_offset(S, OFF, rows, rmask, gcol, s_s)
        if (32 % BITS) == 0:
            code3 = _tiled_codes(W, rows, rmask, g, s_w, BITS, G)
            cols3 = _tiled_cols(gcol, BITS, G)
            for r in tl.static_range(BLOCK_M):
                xr = tl.load(X + tl.minimum(m - 1, r) * s_x + cols3, mask=cols3 < k_in, other=0.0).to(tl.float32)
                dot = tl.sum(tl.sum(code3 * xr[None, :, :], axis=2), axis=1)
                part = scale * dot + offset * tl.sum(tl.sum(xr, axis=1), axis=0)
                acc += tl.where(mi[:, None] == r, part[None, :], 0.0)
        else:
            code = _straddling_codes(W, rows, rmask, g, s_w, BITS, G)
            cols = gcol * G + tl.arange(0, G)
            for r in tl.static_range(BLOCK_M):
                xr = tl.load(X + tl.minimum(m - 1, r) * s_x + cols, mask=cols < k_in, other=0.0).to(tl.float32)
                part = scale * tl.sum(code * xr[None, :], axis=1) + offset * tl.sum(xr, axis=0)
                acc += tl.where(mi[:, None] == r, part[None, :], 0.0)
    _store(Y, Y + mi[:, None] * s_y + rows[None, :], acc, (mi[:, None] < m) & rmask[None, :], ATOMIC)


@triton.jit
def group_gemv_row1_kernel(
    X, W, GIDX, S, OFF, Y,
    n, k_in, n_groups,
    s_w, s_s,
    BITS: tl.constexpr, G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
):
    # One input row (batch-1 decode). Every (row, column) product accumulates in its own register across the
    # program's groups and is reduced once at the end: the loop itself has no cross-thread reduction.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    if (32 % BITS) == 0:
        acc3 = tl.zeros((BLOCK_N, G * BITS // 32, 32 // BITS), dtype=tl.float32)
        for g in range(pid_k, n_groups, SPLIT):
            gcol = tl.load(GIDX + g)
            scale, offset = _scale_offset(S, OFF, rows, rmask, gcol, s_s)
            code3 = _tiled_codes(W, rows, rmask, g, s_w, BITS, G)
            cols3 = _tiled_cols(gcol, BITS, G)
            xr = tl.load(X + cols3, mask=cols3 < k_in, other=0.0).to(tl.float32)
            acc3 += (code3 * scale[:, None, None] + offset[:, None, None]) * xr[None, :, :]
        out = tl.sum(tl.sum(acc3, axis=2), axis=1)
    else:
        acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for g in range(pid_k, n_groups, SPLIT):
            gcol = tl.load(GIDX + g)
            scale, offset = _scale_offset(S, OFF, rows, rmask, gcol, s_s)
            code = _straddling_codes(W, rows, rmask, g, s_w, BITS, G)
            cols = gcol * G + tl.arange(0, G)
            xr = tl.load(X + cols, mask=cols < k_in, other=0.0).to(tl.float32)
            acc2 += (code * scale[:, None] + offset[:, None]) * xr[None, :]
        out = tl.sum(acc2, axis=1)
    _store(Y, Y + rows, out, rmask, ATOMIC)


@triton.jit
def group_gemv_kernel(
    X, C, GIDX, S, OFF, Y,
    m, n, k_in, n_groups,
    s_x, s_c, s_s, s_y,
    BITS: tl.constexpr, G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    mrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mrows < m
    j = tl.arange(0, G)
    bit = j * BITS
    byte = bit // 8
    shift = bit % 8
    GB: tl.constexpr = G * BITS // 8  # packed bytes of one group in one row
    code_mask: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(pid_k, n_groups, SPLIT):
        gcol = tl.load(GIDX + g)
        ptr = C + rows[:, None] * s_c + g * GB + byte[None, :]
        word = tl.load(ptr, mask=rmask[:, None], other=0).to(tl.int32)
        if (8 % BITS) != 0:  # a code may straddle two bytes: read the next one too (never past the group's bytes)
            nxt = tl.load(ptr + 1, mask=rmask[:, None] & (byte[None, :] + 1 < GB), other=0).to(tl.int32)
            word = word | (nxt << 8)
        code = (word >> shift[None, :]) & code_mask
        scale, offset = _scale_offset(S, OFF, rows, rmask, gcol, s_s)
        w = code.to(tl.float32) * scale[:, None] + offset[:, None]  # (BLOCK_N, G), dequantized in registers
        cols = gcol * G + j
        xt = tl.load(X + mrows[:, None] * s_x + cols[None, :], mask=mmask[:, None] & (cols[None, :] < k_in),
                     other=0.0)
        if xt.dtype == tl.float32:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    tl.atomic_add(Y + mrows[:, None] * s_y + rows[None, :], acc, mask=mmask[:, None] & rmask[None, :])
