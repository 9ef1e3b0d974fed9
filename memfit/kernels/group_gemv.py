"""Decode-time matmul of a group-quantized weight (`CompressedLinear` format "group"), in Triton.

What it computes: ``y = x @ W^T`` for a few input rows (decode: M = batch rows, at most `MAX_ROWS`), where W is
stored as `memfit.weights.format` lays out the "group" format: the input dimension cut into groups of G columns,
each group one bit width (1..8) shared by every output row, groups of equal width packed together ("bucket" b:
uint8 ``(N, n_b * G * b / 8)``, each group's codes a little-endian bit stream starting on a byte), and per (row,
group) an fp16 scale and offset (``w = code * scale + offset``).

How: one launch per bucket; programs walk a bucket's groups (g = k-split, k-split + SPLIT, ...) for a block of
output rows, reading the group's packed codes once, unpacking them in registers, dequantizing with the row's scale
and offset and multiplying with the group's G input columns (read in place through the bucket's group indices: x
is never gathered or padded). No dequantized weight is ever written to memory. Three forms:
- one row (batch-1 decode; "row1"): the codes are read as int32 words (widths that tile a word, 1/2/4/8 bits, as
  one contiguous tile; widths that straddle words per code), and every (row, column) product accumulates in its
  own fp32 register across the program's groups, reduced once at the end;
- 2-4 rows ("rows"): the same loads; per group sum_j (code_j * scale + offset) x_j = scale * (codes . x) + offset
  * sum(x), reduced per group;
- 5-64 rows ("dot"): bytes unpacked per code, the dequantized tile cast to the activation dtype for `tl.dot`.
A single bucket whose row blocks fill the GPU writes its output directly in the activation dtype; otherwise
partial sums go to one fp32 output with atomic adds (splits and buckets add into the same rows), whose summation
order is not fixed: results match the reference to fp32 rounding, not bit for bit. Measured on an H200
(benchmarks/weights/gemv_variants.py, one Llama-3.1-8B token's linears at 4 bits; benchmarks/results/
gemv_variants_magic_h200.jsonl, the tl.dot figure from gemv_variants_h200.jsonl): the one-row form at its default
launch shape takes 5.32 ms against 40.5 ms for the tl.dot one and 4.00 ms for torch's bf16 matmul, which reads four
times the bytes: the kernel is bound by unpacking codes, not by memory.

Why our own kernel: the format's per-group widths (SliM-LLM's mixed precision) and its bit-stream packing are
ours; torchao's int4 / HQQ / gemlite kernels each want their own uniform-width layout. Uniform 4-bit layers of bf16
models take a dedicated kernel on the fast backend, their codes reordered in place (no second copy):
`memfit.kernels.int4_pairs` for one decode row (1.52 ms for one token's linears), torch's built-in int4 matmul
(`memfit.kernels.tinygemm`, 2.03 ms) for several (benchmarks/results/gemv_pairs_rows_h200.jsonl; this kernel: 4.71 ms
there). Every other width, and mixed widths, run here.

Reference (and the fallback for prefill-sized inputs, where dequantizing a band and calling the dense matmul is
faster): `CompressedLinear.reference_forward`. Tested against it in Triton's CPU interpreter
(tests/test_weight_kernels.py); speed is measured on the GPU (benchmarks/weights/gpu_decode_speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROWS = 64  # input rows handled here; more (prefill) go to the reference's dense matmul per band
BLOCK_N = 64  # output rows per program
TARGET_PROGRAMS = 512  # enough programs to fill a large GPU at batch 1 (the k-split makes up for few row blocks)
ROWS_MAX_M = 4  # decode rows the register kernel (no tl.dot) serves; more go to the tl.dot kernel
ROWS_BLOCK_N = 32  # output rows per program of the register kernel
ROWS_NUM_WARPS = 2  # warps per program of the register kernel
# the same for its one-row form (batch-1 decode: registers accumulate, one reduction at the end); measured on an H200
# (benchmarks/results/gemv_variants_magic_h200.jsonl, the 7 linears x 32 layers of one Llama-3.1-8B token, 4-bit):
# 8 rows, one warp 5.32 ms; 32 rows, two warps (the earlier default) 6.75 ms in benchmarks/results/gemv_row1_h200.jsonl
ROW1_BLOCK_N = 8
ROW1_NUM_WARPS = 1
MIN_DIRECT_PROGRAMS = 256  # row blocks that fill an H100/H200-class GPU (132 SMs) without a k-split


@dataclass(frozen=True)
class Bucket:
    """The groups of one bit width: their packed codes and, on the device, their group indices (int32)."""

    bits: int
    codes: torch.Tensor  # uint8 (N, n_groups_b * G * bits / 8)
    group_index: torch.Tensor  # int32 (n_groups_b,)

    @property
    def words(self) -> torch.Tensor | None:
        """The codes seen as int32 words (a view: no copy), or None where a row's bytes are not whole words."""
        c, n = self.codes, max(1, self.group_index.numel())
        if (c.shape[-1] // n) % 4 or c.data_ptr() % 4 or c.stride(-1) != 1 or c.stride(0) % 4:
            return None  # a group's codes do not start on a word (G * bits not a multiple of 32), or misaligned
        return c.view(torch.int32)


def supported(group_size: int, rows: int) -> bool:
    """Whether the kernel serves this call: a power-of-two group of 16..256 columns (tl.arange needs a power of
    two; 16 is tl.dot's smallest side) and a decode-sized input."""
    return 16 <= group_size <= 256 and group_size & (group_size - 1) == 0 and 0 < rows <= MAX_ROWS


def group_gemv(
    x: torch.Tensor,
    buckets: list[Bucket],
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    out_features: int,
    out_dtype: torch.dtype | None = None,
    *,
    variant: str = "auto",
    block_n: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``x`` (M, in_features), contiguous, M <= MAX_ROWS -> ``x @ W^T`` (M, out_features) in ``out_dtype``
    (default: x's dtype). ``variant``, ``block_n``, ``split`` and ``num_warps`` are for benchmarks
    (benchmarks/weights/gemv_variants.py); "auto" takes the register kernel where it serves (`ROWS_MAX_M` rows at
    most, groups of whole int32 words; its one-row form "row1" for a single row) and the tl.dot kernel otherwise."""
    m, k_in = x.shape
    out_dtype = x.dtype if out_dtype is None else out_dtype
    live = [b for b in buckets if b.group_index.numel()]
    words = [b.words for b in live]
    rows_ok = m <= ROWS_MAX_M and group_size >= 32 and all(w is not None for w in words)
    if variant == "auto":
        # widths that straddle words (3, 5, 6, 7 bits) keep a (rows, G) accumulator in the one-row form: measured
        # slower there than the 1-4-row form (rtn:3, one token: 34.5 vs 20.5 ms, gemv_variants_magic_h200.jsonl and
        # gemv_variants_h200.jsonl)
        tiled = all(32 % b.bits == 0 for b in live)
        variant = ("row1" if m == 1 and tiled else "rows") if rows_ok else "dot"
    if variant in ("rows", "row1") and not (rows_ok and (variant == "rows" or m == 1)):
        raise ValueError(f"the register kernel needs <= {ROWS_MAX_M} rows (row1: one) and groups of whole int32 "
                         "words")
    from memfit.kernels import _group_gemv_kernel as K  # imports triton: only once the call is known to be valid

    if variant in ("rows", "row1"):
        one = variant == "row1"
        bn = block_n or (ROW1_BLOCK_N if one else ROWS_BLOCK_N)
        n_blocks = -(-out_features // bn)
        # one bucket whose row blocks alone fill the GPU: no k-split, so each output is written once, in its dtype
        direct = len(live) == 1 and (split == 1 or (split is None and n_blocks >= MIN_DIRECT_PROGRAMS))
        y = (torch.empty(m, out_features, dtype=out_dtype, device=x.device) if direct
             else torch.zeros(m, out_features, dtype=torch.float32, device=x.device))
        warps = num_warps or (ROW1_NUM_WARPS if one else ROWS_NUM_WARPS)
        for bucket, w in zip(live, words, strict=True):
            n_groups = bucket.group_index.numel()
            sp = 1 if direct else split or max(1, min(n_groups, TARGET_PROGRAMS // n_blocks))
            consts = dict(BITS=bucket.bits, G=group_size, SPLIT=sp, BLOCK_N=bn, ATOMIC=not direct, num_warps=warps)
            if one:
                K.group_gemv_row1_kernel[(n_blocks, sp)](
                    x, w, bucket.group_index, scales, offsets, y, out_features, k_in, n_groups, w.stride(0),
                    scales.stride(0), **consts)
            else:
                K.group_gemv_rows_kernel[(n_blocks, sp)](
                    x, w, bucket.group_index, scales, offsets, y, m, out_features, k_in, n_groups, x.stride(0),
                    w.stride(0), scales.stride(0), y.stride(0), BLOCK_M=1 if m == 1 else 2 if m == 2 else 4,
                    **consts)
        return y if direct else y.to(out_dtype)
    y = torch.zeros(m, out_features, dtype=torch.float32, device=x.device)
    bn = block_n or BLOCK_N
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    n_blocks = -(-out_features // bn)
    m_blocks = -(-m // block_m)
    extra = {} if num_warps is None else {"num_warps": num_warps}
    for bucket in live:
        n_groups = bucket.group_index.numel()
        sp = split or max(1, min(n_groups, TARGET_PROGRAMS // max(1, n_blocks * m_blocks)))
        K.group_gemv_kernel[(n_blocks, sp, m_blocks)](
            x, bucket.codes, bucket.group_index, scales, offsets, y,
            m, out_features, k_in, n_groups,
            x.stride(0), bucket.codes.stride(0), scales.stride(0), y.stride(0),
            BITS=bucket.bits, G=group_size, SPLIT=sp, BLOCK_M=block_m, BLOCK_N=bn, **extra,
        )
    return y.to(out_dtype)
