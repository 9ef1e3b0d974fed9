"""Batch-1 decode matmul of uniform 4-bit "group" weights with codes held in pair order (Triton, bf16 inputs).

Why: at batch 1 a 4-bit matmul reads a quarter of the bf16 bytes, but a kernel that turns each code into an fp32
(shift, mask, convert, scale) issues ~5 instructions per weight and stays far from the memory bandwidth (memfit's
`group_gemv`, torch's int4 "tinygemm" at 44 % of an H200's copy bandwidth). Here two codes become a bf16 pair with one
LOP3 (OR-ing them into the mantissa of 128.0), one bf16x2 FMA re-centres the pair exactly and a second multiplies it
by two inputs: ~2.25 instructions per weight for that part, 2.8-3.1 for the whole compiled loop (counted from its
sm_90 SASS, loads and scales included, benchmarks/weights/int4_sass.py) against ~10.7 for `group_gemv`'s one-row
form (`_int4_pairs_kernel`).

Layout ("pair order"): the same bytes as memfit's 4-bit stream, (out, in / 2) uint8, reordered inside each block of
32 codes (four 32-bit words): input pair p = 4 i + j (codes 2p, 2p + 1) sits in word j, nibbles i and 4 + i, so the
kernel unpacks pair i of four consecutive words against four consecutive input pairs (one vector load);
`to_pairs` / `from_pairs` convert a buffer. Scales and offsets stay memfit's fp16 (out, n_groups): no extra bytes. Rounding: each word's eight
products are summed pairwise in bf16 (four terms per half) before fp32, against the reference's fp32 throughout.
"""

from __future__ import annotations

import torch

from memfit.kernels.tinygemm import _nibbles  # a byte's low nibble, then its high one

GROUP_SIZES = (32, 64, 128, 256)
MAX_ROWS = 64  # input rows served (decode); more (prefill) dequantize a band for the dense matmul
TARGET_PROGRAMS = 1024  # split the input dimension until about this many programs run per input row


def launch_shape(out_features: int, in_features: int) -> tuple[int, int, int, int | None]:
    """(output rows per program, groups per iteration, warps, split of the input dimension or None for automatic)
    for a weight shape. Measured on an H200 over Llama-3.1-8B's shapes at batch 1, CUDA-graph replays
    (benchmarks/results/gemv_pairs_h200.jsonl): square and q/k/v-sized matrices 16, 8, 4 unsplit (5.8 us for
    4096 x 4096, 6.8 us for q/k/v stacked, against 6.0 and 8.3 us for torch's int4 kernel); wide ones (gate/up
    stacked, 28672 rows) 16, 4, 2 (22.6 against 33.2 us); tall ones (down, 14336 inputs) 32, 4, 2 with the input
    dimension split (12.5 against 16.4 us)."""
    if in_features >= 2 * out_features:
        return 32, 4, 2, None
    if out_features >= 16384:
        return 16, 4, 2, None
    return 16, 8, 4, 1


def resolve_launch(n: int, k_in: int, group_size: int, block_n: int | None = None, gpi: int | None = None,
                   num_warps: int | None = None, split: int | None = None) -> tuple[int, int, int, int, int]:
    """(rows per program, groups per iteration, warps, split, iterations) of a launch: `launch_shape`'s defaults
    where not given, groups per iteration halved until they divide the groups, the split chosen for about
    `TARGET_PROGRAMS` programs where neither the caller nor the shape fixes it."""
    bn0, g0, w0, split0 = launch_shape(n, k_in)
    bn, g = block_n or bn0, gpi or g0
    if split is None and block_n is None:
        split = split0
    n_groups = k_in // group_size
    while n_groups % g:
        g //= 2
    n_iters = n_groups // g
    if split is None:
        split = max(1, min(n_iters, TARGET_PROGRAMS // -(-n // bn)))
    return bn, g, num_warps or w0, split, n_iters


def _bytes(nib: torch.Tensor) -> torch.Tensor:
    """Inverse of `tinygemm._nibbles` for (n, 2 b) nibbles: low nibble first."""
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def to_pairs(codes: torch.Tensor) -> torch.Tensor:
    """memfit's 4-bit stream (uint8 (out, in / 2), code k at nibble k) -> pair order, same shape. In each block of
    32 codes (four words), input pair p = 4 i + j (codes 2p, 2p + 1) goes to word j, nibbles i and 4 + i: the kernel
    unpacks pair i of four consecutive words against four consecutive input pairs."""
    n = codes.shape[0]
    c = _nibbles(codes).reshape(n, -1, 4, 4, 2)  # (row, block, i, j, half)
    return _bytes(c.permute(0, 1, 3, 4, 2).reshape(n, -1))  # (row, block, j, half, i): nibble 4 * half + i of word j


def from_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Undo `to_pairs`."""
    n = codes.shape[0]
    c = _nibbles(codes).reshape(n, -1, 4, 2, 4)  # (row, block, j, half, i)
    return _bytes(c.permute(0, 1, 4, 2, 3).reshape(n, -1))


def shape_ok(out_features: int, in_features: int, group_size: int, widths: set[int]) -> bool:
    return widths == {4} and group_size in GROUP_SIZES and not in_features % group_size and not in_features % 32


_COUNTERS: dict[str, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-row-block arrival counters of the split-K fix-up, zero between calls (the last program of a block resets
    its own): one int32 buffer per device, grown before use (never inside a CUDA graph's recording, which the
    warm-up step precedes)."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
         *, block_n: int | None = None, gpi: int | None = None, num_warps: int | None = None,
         split: int | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """``x`` bf16 (m, in), m <= `MAX_ROWS`, times the pair-ordered 4-bit weight transposed -> bf16 (m, out). Each
    input row runs its own programs (batch-1 decode is what the kernel is built for: m rows cost about m times the
    instructions, the weight's bytes are read once from memory and shared through L2). Keyword arguments are for
    benchmarks (launch shape) and tests (``use_asm=False``: plain Triton arithmetic, for the CPU interpreter)."""
    from memfit import kernels
    from memfit.kernels import _int4_pairs_kernel as K

    if x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS or x.dtype != torch.bfloat16:
        raise ValueError(f"int4_pairs.gemv takes 1..{MAX_ROWS} bf16 input rows")
    m = x.shape[0]
    n, half = codes.shape
    bn, g, warps, split, n_iters = resolve_launch(n, 2 * half, group_size, block_n, gpi, num_warps, split)
    n_blocks = -(-n // bn)
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty(m * split if split > 1 else 1, n, device=x.device, dtype=torch.float32)
    count = _counters(x.device, m * n_blocks) if split > 1 else part
    asm = (not kernels.interpret_mode()) if use_asm is None else use_asm
    K.int4_pairs_gemv_kernel[(m, n_blocks, split)](
        x.view(torch.int32), codes.view(torch.int32), scales, offsets, y, part, count,
        n, n_iters, n_blocks, x.stride(0) // 2, half // 4, scales.stride(0), y.stride(0),
        G=group_size, BLOCK_N=bn, GPI=g, SPLIT=split, USE_ASM=asm, num_warps=warps,
    )
    return y
