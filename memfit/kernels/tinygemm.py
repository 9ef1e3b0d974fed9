"""4-bit decode matmul through torch's built-in int4 kernel ("tinygemm", `aten._weight_int4pack_mm`).

The kernel torchao's int4 weight-only layout and gpt-fast call; it ships inside PyTorch's CUDA build (sm80+), so
reusing it costs no dependency. It reads 4-bit codes in its own tiled order (`aten._convert_weight_to_int4pack`,
made for the tensor cores' fragment layout) with one bf16 (scale, zero) pair per group and output column, and
decodes a weight as ``(q - 8) * scale + zero``. memfit's "group" format decodes ``q * scale + offset``, so
``zero = offset + 8 * scale``.

Measured on one H200 (`benchmarks/weights/gemv_variants.py --tinygemm`, Llama-3.1-8B's seven linear shapes, one
token, CUDA-graph replays): 2.27 ms for one token's linears against 5.55 ms for memfit's Triton group GEMV and
3.96 ms for bf16 cuBLAS; four rows 3.21 ms against 25.0 ms.

Storage. A repacked layer keeps its codes buffer (``codes_4``, the same bytes) in tinygemm's order, viewed as
uint8 ``(out, in / 2)``; row band ``[r0, r1)`` (multiples of 8) of that view holds exactly output rows r0..r1 in
tiled order, so the reference dequantizes a band by undoing the order inside it (`unpack_band`). The order is
learnt once per process from the packing op itself (`learn_order`: pack index patterns, read where each index
lands) rather than restated from PyTorch's sources, and checked to repeat tile by tile. The fp16 scales and
offsets stay (the reference, saving and CPUs read them); the bf16 (scale, zero) pairs are one more buffer of
4 bytes per group and output row, counted in the layer's bytes.

Where it does not apply (another bit width, mixed widths, a group size outside 32..256, shapes that are not
multiples of the kernel's tiles, non-bf16 activations, GPUs below sm80) the layer keeps memfit's own Triton kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INNER_K_TILES = 8  # the fastest setting of the op in the measurement above (2, 4 and 8 are valid)
TILE_ROWS, TILE_COLS = 8, 16 * INNER_K_TILES  # one tile: 8 output rows x 128 input columns = 128 int32 words
MAX_ROWS = 64  # decode batches up to this many rows take the kernel; larger inputs (prefill) dequantize a band
GROUP_SIZES = (32, 64, 128, 256)

PackFn = Callable[[torch.Tensor, int], torch.Tensor]
_ORDER: dict[str, torch.Tensor] = {}  # "learnt" -> the inverse order (1024,) int64 on the CPU; str(device) -> a copy


def _aten_pack(pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)


def pair_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``(n, k)`` -> the op's input: uint8 ``(n, k / 2)``, even column in the high nibble."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()


def _nibbles(data: torch.Tensor) -> torch.Tensor:
    """The packed words' bytes, uint8 ``(..., n)`` -> uint8 ``(..., 2 * n)``: nibble j of 32-bit word i (bits 4j..4j+3)
    at position 8 * i + j. The words are little-endian (CPUs and GPUs torch runs on), so that is each byte's low
    nibble, then its high one — read on bytes, never widened to int32 (a prefill band's codes stay one byte each)."""
    return torch.stack([data & 15, data >> 4], -1).flatten(-2)


def learn_order(device: torch.device, pack: PackFn = _aten_pack) -> torch.Tensor:
    """Where each code of a tile lands in the packed words: an inverse order ``inv`` (1024,) such that
    ``nibbles[..., inv]`` lists a tile's codes row by row. Learnt by packing a 16 x 256 matrix (2 x 2 tiles) whose
    codes spell their own index, four bits per pass; raises if the tiles do not share one order."""
    rows, cols = 2 * TILE_ROWS, 2 * TILE_COLS
    index = torch.arange(rows * cols, device=device).view(rows, cols)
    src = torch.zeros(2, 2, TILE_ROWS * TILE_COLS, dtype=torch.int64, device=device)
    for p in range(3):  # 12 bits cover 4096 positions
        packed = pack(pair_codes(((index >> (4 * p)) & 15).to(torch.uint8)), INNER_K_TILES)
        src |= _nibbles(packed.contiguous().view(torch.uint8).reshape(2, 2, -1)).long() << (4 * p)
    r, c = src // cols, src % cols
    tile_r = torch.arange(2, device=device)[:, None, None]
    tile_c = torch.arange(2, device=device)[None, :, None]
    if not (bool((r // TILE_ROWS == tile_r).all()) and bool((c // TILE_COLS == tile_c).all())):
        raise RuntimeError("the int4 packing does not keep 8 x 128 tiles together")
    pos = (r % TILE_ROWS) * TILE_COLS + c % TILE_COLS
    if not bool((pos == pos[0, 0]).all()):
        raise RuntimeError("the int4 packing orders its tiles differently")
    pos = pos[0, 0]
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(pos.numel(), device=device)
    if not torch.equal(pos[inv], torch.arange(pos.numel(), device=device)):
        raise RuntimeError("the int4 packing is not a permutation of a tile")
    return inv.cpu()


def order(device: torch.device) -> torch.Tensor:
    """The learnt inverse order, on ``device`` (learnt on the first CUDA use; a copy kept per device, so a decode
    step inside a CUDA graph copies nothing)."""
    key = str(device)
    if key not in _ORDER:
        if "learnt" not in _ORDER:
            if device.type != "cuda":
                raise RuntimeError("the int4 kernel's order is learnt on a CUDA device first")
            _ORDER["learnt"] = learn_order(device)
        _ORDER[key] = _ORDER["learnt"].to(device)
    return _ORDER[key]


def shape_ok(out_features: int, in_features: int, group_size: int, widths: set[int]) -> bool:
    """Whether a "group" layer of this shape and these bit widths fits the kernel's tiles and group sizes."""
    return (widths == {4} and group_size in GROUP_SIZES and not out_features % TILE_ROWS
            and not in_features % TILE_COLS and not in_features % group_size)


def supported(out_features: int, in_features: int, group_size: int, widths: set[int], device: torch.device) -> bool:
    """Whether a "group" layer of this shape can be repacked for the kernel on ``device`` (CUDA, sm80+)."""
    if device.type != "cuda" or not shape_ok(out_features, in_features, group_size, widths):
        return False
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def repack(codes: torch.Tensor, pack: PackFn = _aten_pack) -> torch.Tensor:
    """uint8 codes ``(out, in)`` (values 0..15) -> the packed words as uint8 ``(out, in / 2)`` (same bytes as
    memfit's own 4-bit stream)."""
    packed = pack(pair_codes(codes), INNER_K_TILES)
    return packed.contiguous().view(torch.uint8).view(codes.shape[0], codes.shape[1] // 2)


def unpack_band(band: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a repacked codes buffer (uint8 ``(r1 - r0, in / 2)``, r0 and r1 multiples of 8) ->
    uint8 codes ``(r1 - r0, in)`` in row order (``inv`` on the band's device)."""
    n, half = band.shape
    k = 2 * half
    data = band.contiguous().view(n // TILE_ROWS, k // TILE_COLS, -1)  # each tile's 512 bytes
    tiles = _nibbles(data)[..., inv]  # (n/8, k/128, 1024) in row-major tile order
    return tiles.view(n // TILE_ROWS, k // TILE_COLS, TILE_ROWS, TILE_COLS).permute(0, 2, 1, 3).reshape(n, k)


def scales_and_zeros(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp16 ``(out, n_groups)`` scales and offsets -> the op's bf16 ``(n_groups, out, 2)`` (scale, zero) pairs."""
    s = scales.float()
    return torch.stack([s, offsets.float() + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def matmul(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` bf16 ``(m, in)`` times the repacked layer's weight transposed -> bf16 ``(m, out)``."""
    n, half = codes.shape
    words = codes.view(torch.int32).view(n // TILE_ROWS, 2 * half // TILE_COLS, 32, INNER_K_TILES // 2)
    return torch.ops.aten._weight_int4pack_mm(x, words, group_size, sz)
