"""Compressed linear layers: what is stored, how it is packed, and the plain-PyTorch reference matmul.

One module, `CompressedLinear`, replaces an ``nn.Linear``. It holds a *base* term in one of three storage formats
plus an optional low-rank side branch and the bias:

    y = x @ base(W)^T  [+ (x @ L2^T) @ L1^T]  [+ bias]

Formats (``fmt``), every tensor a registered buffer so ``.to(device)`` and safetensors see it:

* ``"group"`` — dense group quantization with per-group bit widths (RTN, SliM-LLM, the SVDQuant residual).
  The input dimension is cut into ``n_groups`` column groups of ``group_size`` (the last one padded when
  ``in_features`` is not a multiple; the padding is stored and counted). Each column group has one bit width in
  1..8, shared by every output row (SliM-LLM's layout). Groups of equal width form a bucket; bucket ``b`` stores
  ``codes_b``: uint8 ``(out, n_b * group_size * b / 8)``, the groups in ascending index order, each group's codes
  packed little-endian into a contiguous bit stream (group_size is a multiple of 8, so every group starts on a
  byte). ``scales``/``offsets``: fp16 ``(out, n_groups)``; ``group_bits``: uint8 ``(n_groups,)``.
  A weight decodes as ``code * scale + offset`` (asymmetric; the offset is the group's real-valued minimum, as in
  HQQ/KIVI, so 1-bit groups can hold SliM-LLM's binarisation ``mu +- alpha``).
* ``"group_sparse"`` — GQSA: whole (row, group) blocks pruned, the survivors group-quantized at one width. Stored
  like BSR with 1 x group_size blocks: ``row_ptr`` int32 ``(out+1,)``, ``group_idx`` int16 ``(nnz,)``, ``codes``
  uint8 ``(nnz, group_size*bits/8)``, ``scales``/``offsets`` fp16 ``(nnz,)``.
* ``"tiled_csl"`` — Flash-LLM's Tiled-CSL: unstructured sparse weights, tiles of 128 rows x 64 columns, per tile
  its non-zeros as (fp16 value, int16 in-tile position ``r*64 + c``) = 4 bytes each, ``tile_ptr`` int32
  ``(n_tiles+1,)`` prefix sums over tiles in row-major tile order. (The paper interleaves value and position in
  one 32-bit word and swizzles positions for shared-memory banks: GPU-kernel details with the same bytes.)

Low-rank branch: ``lr_l1`` ``(out, r)`` and ``lr_l2`` ``(r, in)`` in fp16 (SVDQuant's 16-bit branch).

The reference matmul never materialises the whole weight: it dequantizes one band of output rows at a time
(about 1 M weights, a multiple of 128 rows) and multiplies. GPU kernels plug in through `register_kernel`
(name -> callable taking ``(layer, x)``); when none is registered for the format and device the reference runs.
Registered: the "group" format on CUDA (`memfit.kernels.group_gemv`, Triton) for decode-sized inputs; prefill-sized
inputs, the other formats and CPUs take the reference.
``weight_bytes`` is the sum of ``numel * element_size`` over every buffer the layer holds (bias included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError

SUPPORTED_BITS = tuple(range(1, 9))
TILE_ROWS, TILE_COLS = 128, 64  # Flash-LLM's tile shape
_BAND_WEIGHTS = 1 << 20  # weights dequantized at once by the reference matmul
MATVEC_ROWS = 8  # inputs of at most this many rows (decode) take the reference's matrix-vector form
FORMATS = ("group", "group_sparse", "tiled_csl")

KernelFn = Callable[["CompressedLinear", torch.Tensor], torch.Tensor]
_KERNELS: dict[tuple[str, str], tuple[str, KernelFn]] = {}


def register_kernel(fmt: str, device_type: str, name: str) -> Callable[[KernelFn], KernelFn]:
    """Decorator: use ``fn(layer, x) -> y`` (the whole layer, bias and low-rank branch included) for ``fmt`` on
    ``device_type``. The reference stays the fallback and the oracle a kernel is tested against."""

    def deco(fn: KernelFn) -> KernelFn:
        _KERNELS[(fmt, device_type)] = (name, fn)
        return fn

    return deco


def kernel_for(fmt: str, device_type: str) -> tuple[str, KernelFn] | None:
    return _KERNELS.get((fmt, device_type))


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ConfigError(f"weight bits must be an integer from 1 to 8, got {bits!r}")
    return int(bits)


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 8 or group_size % 8:
        raise ConfigError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    return int(group_size)


# -- bit packing ---------------------------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., n)`` (each < 2**bits) into uint8 ``(..., n * bits / 8)``: a little-endian bit
    stream (code k occupies stream bits ``[k*bits, (k+1)*bits)``). ``n * bits`` must be a multiple of 8."""
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int16)
    stream = (codes.to(torch.int16).unsqueeze(-1) >> shifts) & 1  # (..., n, bits)
    stream = stream.reshape(*codes.shape[:-1], n * bits // 8, 8)
    weights = torch.tensor([1 << i for i in range(8)], device=codes.device, dtype=torch.int16)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 ``(..., n * bits / 8)`` -> int16 codes ``(..., n)``."""
    fast = _unpack_fast(packed, bits, n)
    return fast.to(torch.int16) if fast is not None else _unpack_stream(packed, bits, n)


def _unpack_fast(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor | None:
    """`unpack_bits` without the int16 cast (uint8 or int64 codes), or None where n is not a multiple of 8.

    Every 8 codes fill ``bits`` whole bytes, so the bytes of 8 codes are read as one integer and the codes shifted
    out of it: a few vector operations per code, where the bit-by-bit expansion costs ~2 x bits (it made the CPU
    reference decode ~15x slower than fp32)."""
    lead = packed.shape[:-1]
    if n % 8 or packed.shape[-1] != n * bits // 8:
        return None
    mask = (1 << bits) - 1
    # one shift per code position (a broadcast shift against a shift vector is ~3x slower on CPU)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: codes never straddle a byte
        if bits == 8:
            return packed
        return torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], -1).reshape(*lead, n)
    chunk = packed.reshape(*lead, n // 8, bits).to(torch.int32 if bits <= 3 else torch.int64)  # 8 * bits bits
    word = chunk[..., 0].clone()
    for i in range(1, bits):
        word |= chunk[..., i] << (8 * i)
    return torch.stack([(word >> (k * bits)) & mask for k in range(8)], -1).reshape(*lead, n)


def _codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes in whatever integer dtype unpacks fastest (the reference converts them to float next)."""
    fast = _unpack_fast(packed, bits, n)
    return fast if fast is not None else _unpack_stream(packed, bits, n)


def _unpack_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.int16)
    stream = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & 1
    stream = stream.reshape(*packed.shape[:-1], n, bits)
    weights = torch.tensor([1 << i for i in range(bits)], device=packed.device, dtype=torch.int16)
    return (stream * weights).sum(-1, dtype=torch.int16)


# -- the module ----------------------------------------------------------------------------------------------------
class CompressedLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is held compressed (see the module docstring for the formats).

    Build it with `from_group`, `from_group_sparse` or `from_tiled_csl`; `add_lowrank` attaches a side branch.
    ``meta`` holds the JSON-able shape information saved in a quantized folder's manifest."""

    @property
    def cuda_graph_safe(self) -> bool:
        """Whether a decode step through this layer can be recorded in a CUDA graph (memfit.backend keeps models
        with an unsafe module off the graph path). The reference matmul reads group widths on the host every forward,
        so only a "group" layer that the CUDA kernel serves is safe, and only for decode-sized inputs
        (`capturable`)."""
        return self.capturable(1)

    def capturable(self, rows: int) -> bool:
        """Whether a forward of ``rows`` input rows stays off the host (it runs in the CUDA kernel)."""
        if self.fmt != "group" or self.scales.device.type != "cuda":
            return False
        if self.kernel_layout == "tinygemm":
            from memfit.kernels import tinygemm

            return 0 < rows <= tinygemm.MAX_ROWS
        if self.kernel_layout == "pairs":
            from memfit.kernels import int4_pairs

            return 0 < rows <= int4_pairs.MAX_ROWS and not _KERNEL_FAILED
        if _KERNEL_FAILED:
            return False
        from memfit.kernels.group_gemv import MAX_ROWS

        return 0 < rows <= MAX_ROWS and _group_buckets(self) is not None

    @property
    def kernel_layout(self) -> str | None:
        """Where the fast backend reordered the 4-bit codes for a decode kernel (`repack_for_decode`): "pairs"
        (`memfit.kernels.int4_pairs`), "tinygemm" (torch's int4 matmul) or None (memfit's own bit stream)."""
        if getattr(self, "tg_scales_zeros", None) is not None:
            return "tinygemm"
        return "pairs" if getattr(self, "_pair_order", False) else None

    @property
    def repacked(self) -> bool:
        """Whether the 4-bit codes are held in a decode kernel's order (`kernel_layout`)."""
        return self.kernel_layout is not None

    def __init__(self, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        if fmt not in FORMATS:
            raise ConfigError(f"unknown compressed-linear format {fmt!r} (known: {', '.join(FORMATS)})")
        self.fmt = fmt
        self.meta = dict(meta)
        self.in_features = int(meta["in_features"])
        self.out_features = int(meta["out_features"])
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def from_group(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor,
        group_bits: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> CompressedLinear:
        """``codes`` int ``(out, n_groups, group_size)``, ``scales``/``offsets`` ``(out, n_groups)`` (stored
        fp16), ``group_bits`` ``(n_groups,)`` in 1..8."""
        out, n_groups, gs = codes.shape
        group_bits = group_bits.to(torch.uint8).cpu()
        tensors: dict[str, torch.Tensor] = {
            "group_bits": group_bits.to(codes.device),
            "scales": scales.to(torch.float16).contiguous(),
            "offsets": offsets.to(torch.float16).contiguous(),
        }
        for b in sorted(set(group_bits.tolist())):
            idx = (group_bits == b).nonzero().flatten().to(codes.device)
            sel = codes.index_select(1, idx).reshape(out, -1)
            tensors[f"codes_{b}"] = pack_bits(sel, b).contiguous()
        meta = {"in_features": in_features, "out_features": out, "group_size": gs, "n_groups": n_groups}
        return cls("group", meta, tensors, bias)

    @classmethod
    def from_group_sparse(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor,
        keep: torch.Tensor,
        bits: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> CompressedLinear:
        """``codes`` ``(out, n_groups, group_size)``, ``scales``/``offsets`` ``(out, n_groups)``, ``keep`` bool
        ``(out, n_groups)``: only kept blocks are stored."""
        out, n_groups, gs = codes.shape
        rows, gidx = keep.nonzero(as_tuple=True)  # row-major order: CSR over blocks
        counts = keep.sum(1).to(torch.int64)
        row_ptr = torch.zeros(out + 1, dtype=torch.int32, device=codes.device)
        row_ptr[1:] = counts.cumsum(0).to(torch.int32)
        tensors = {
            "row_ptr": row_ptr,
            "group_idx": gidx.to(torch.int16),
            "codes": pack_bits(codes[rows, gidx], bits).contiguous(),
            "scales": scales[rows, gidx].to(torch.float16),
            "offsets": offsets[rows, gidx].to(torch.float16),
        }
        meta = {"in_features": in_features, "out_features": out, "group_size": gs, "n_groups": n_groups, "bits": bits}
        return cls("group_sparse", meta, tensors, bias)

    @classmethod
    def from_tiled_csl(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> CompressedLinear:
        """Store the non-zeros of ``weight`` ``(out, in)`` in Tiled-CSL (values rounded to fp16)."""
        out, inf = weight.shape
        values = weight.to(torch.float16)
        nz = values != 0
        r, c = nz.nonzero(as_tuple=True)
        tile = (r // TILE_ROWS) * (-(-inf // TILE_COLS)) + c // TILE_COLS
        order = torch.argsort(tile, stable=True)  # row-major within a tile already; stable keeps it
        r, c, tile = r[order], c[order], tile[order]
        n_tiles = (-(-out // TILE_ROWS)) * (-(-inf // TILE_COLS))
        tile_ptr = torch.zeros(n_tiles + 1, dtype=torch.int32, device=weight.device)
        tile_ptr[1:] = torch.bincount(tile, minlength=n_tiles).cumsum(0).to(torch.int32)
        tensors = {
            "values": values[r, c].contiguous(),
            "locs": ((r % TILE_ROWS) * TILE_COLS + (c % TILE_COLS)).to(torch.int16),
            "tile_ptr": tile_ptr,
        }
        return cls("tiled_csl", {"in_features": inf, "out_features": out}, tensors, bias)

    def add_lowrank(self, l1: torch.Tensor, l2: torch.Tensor) -> CompressedLinear:
        """Attach ``W += l1 @ l2`` (``l1`` ``(out, r)``, ``l2`` ``(r, in)``), stored fp16."""
        self.register_buffer("lr_l1", l1.to(torch.float16).contiguous())
        self.register_buffer("lr_l2", l2.to(torch.float16).contiguous())
        self.meta["rank"] = int(l1.shape[1])
        return self

    # -- accounting --------------------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, scales, offsets, indices, low-rank factors, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def nbytes(self) -> int:
        return self.weight_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, {self.bits_per_weight:.2f} bits/weight"

    # -- dequantization ----------------------------------------------------------------------------------------
    def band_rows(self) -> int:
        """Rows dequantized at once by the reference: a multiple of 128 (Flash-LLM's tile height). On a GPU the
        bands are 16x larger (~64 MiB of fp32 at once): there the Python loop over bands, not memory, is the cost."""
        first = next(self.buffers(recurse=False), None)
        weights = _BAND_WEIGHTS * (16 if first is not None and first.is_cuda else 1)
        return max(TILE_ROWS, (weights // max(1, self.in_features)) // TILE_ROWS * TILE_ROWS)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base term's rows ``r0:r1`` as a dense ``(r1 - r0, in_features)`` tensor (no low-rank, no bias)."""
        if self.fmt == "group":
            w = self._group_rows(r0, r1)
        elif self.fmt == "group_sparse":
            w = self._group_sparse_rows(r0, r1)
        else:
            w = self._tiled_csl_rows(r0, r1)
        return w[:, : self.in_features].to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, with_lowrank: bool = True) -> torch.Tensor:
        """The whole effective weight (tests and calibration only; inference never calls this)."""
        w = self.dequantize_rows(0, self.out_features, torch.float32)
        if with_lowrank and getattr(self, "lr_l1", None) is not None:
            w = w + self.lr_l1.float() @ self.lr_l2.float()
        return w.to(dtype)

    def _group_matvec(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W^T`` for a few rows without forming W: per group, sum_j (code_j * scale + offset) x_j =
        scale * (codes . x) + offset * sum(x), so a band's codes go to float once and are multiplied in place
        (no scale/offset pass over the band, no dequantized copy): ~1.7x faster than dequantize-then-multiply on
        a CPU at decode."""
        gs, n_groups = self.meta["group_size"], self.meta["n_groups"]
        m = x2.shape[0]
        xg = torch.nn.functional.pad(x2.float(), (0, n_groups * gs - self.in_features)).view(m, n_groups, gs)
        xsum = xg.sum(-1)  # (m, n_groups)
        y = torch.empty(m, self.out_features, dtype=torch.float32, device=x2.device)
        widths = self._width_groups()
        step = self.band_rows()
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            scales, offsets = self.scales[r0:r1].float(), self.offsets[r0:r1].float()
            acc = None
            for b, idx in widths:
                n_b = n_groups if idx is None else idx.numel()
                q = self._band_codes(b, r0, r1, n_b * gs).view(r1 - r0, n_b, gs).float()
                xb, sb, ob, xs = ((xg, scales, offsets, xsum) if idx is None
                                  else (xg[:, idx], scales[:, idx], offsets[:, idx], xsum[:, idx]))
                part = (torch.einsum("ogk,mgk->mog", q, xb) * sb).sum(-1) + xs @ ob.T
                acc = part if acc is None else acc + part
            y[:, r0:r1] = acc
        return y.to(x2.dtype)

    def _width_groups(self) -> list[tuple[int, torch.Tensor | None]]:
        """(bit width, its group indices on the layer's device, or None when one width covers every group in order),
        read from ``group_bits`` once per layer and device: a forward reads no host state for it."""
        key = (self.scales.device, self.group_bits.data_ptr())
        cached = getattr(self, "_width_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        bits = self.group_bits.cpu().long()
        widths = sorted(set(bits.tolist()))
        out: list[tuple[int, torch.Tensor | None]] = (
            [(widths[0], None)] if len(widths) == 1
            else [(b, (bits == b).nonzero().flatten().to(self.scales.device)) for b in widths])
        self._width_cache = (key, out)
        return out

    def _band_codes(self, bits: int, r0: int, r1: int, n: int) -> torch.Tensor:
        """Rows r0..r1 of bucket ``bits``'s codes, ``n`` per row, as integers (in row order whatever the layout)."""
        packed = getattr(self, f"codes_{bits}")[r0:r1]
        if self.kernel_layout == "tinygemm":
            from memfit.kernels import tinygemm

            return tinygemm.unpack_band(packed, tinygemm.order(packed.device))
        if self.kernel_layout == "pairs":
            from memfit.kernels import int4_pairs

            return _codes(int4_pairs.from_pairs(packed), bits, n)
        return _codes(packed, bits, n)

    # -- the GPU kernel's layout ---------------------------------------------------------------------------------
    def repack_for_kernel(self, pack: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                          kernel: str = "tinygemm", force: bool = False) -> bool:
        """Hold the 4-bit codes in a decode kernel's order; no-op and False where that kernel does not serve this
        layer. ``kernel``: "pairs" (`memfit.kernels.int4_pairs`: the same bytes reordered inside each word, the fp16
        scales and offsets unchanged) or "tinygemm" (torch's int4 kernel order, `memfit.kernels.tinygemm`, plus its
        bf16 (scale, zero) pairs). The codes buffer keeps its bytes (reordered in place of the old one);
        `canonical_layout` undoes it. ``pack`` (a stand-in for torch's packing op) and ``force`` (skip the device
        check) let tests run it anywhere."""
        from memfit.kernels import tinygemm

        if self.fmt != "group" or self.repacked:
            return self.repacked
        widths = {b for b, _ in self._width_groups()}  # read on the host once per layer and device
        gs = self.meta["group_size"]
        if kernel == "pairs":
            from memfit import kernels
            from memfit.kernels import int4_pairs

            if not int4_pairs.shape_ok(self.out_features, self.in_features, gs, widths):
                return False
            if not force and (self.scales.device.type != "cuda" or not kernels.available()):
                return False
            self.codes_4 = int4_pairs.to_pairs(self.codes_4)
            self._pair_order = True
            self._kernel_buckets = None
            return True
        if not tinygemm.shape_ok(self.out_features, self.in_features, gs, widths):
            return False
        if pack is None and not tinygemm.supported(self.out_features, self.in_features, gs, widths,
                                                   self.scales.device):
            return False  # a stand-in `pack` (tests) runs anywhere
        codes = self._band_codes(4, 0, self.out_features, self.in_features).to(torch.uint8)
        kw = {} if pack is None else {"pack": pack}
        self.codes_4 = tinygemm.repack(codes, **kw)
        self.register_buffer("tg_scales_zeros", tinygemm.scales_and_zeros(self.scales, self.offsets),
                             persistent=False)
        self._kernel_buckets = None
        return True

    def canonical_layout(self) -> None:
        """Undo `repack_for_kernel`: the codes back in memfit's own bit stream (what a saved folder holds)."""
        if not self.repacked:
            return
        codes = self._band_codes(4, 0, self.out_features, self.in_features)
        if self.kernel_layout == "tinygemm":
            del self._buffers["tg_scales_zeros"]
        self._pair_order = False
        self.codes_4 = pack_bits(codes, 4).contiguous()
        self.scales, self.offsets = self.scales.clone(), self.offsets.clone()  # off a group's shared buffers
        self._tg_group = None  # its siblings then run alone

    def _group_rows(self, r0: int, r1: int) -> torch.Tensor:
        gs, n_groups = self.meta["group_size"], self.meta["n_groups"]
        scales, offsets = self.scales[r0:r1].float(), self.offsets[r0:r1].float()
        widths = self._width_groups()
        if widths[0][1] is None:  # one width (RTN, uniform SliM-LLM): no scatter into a separate buffer
            b = widths[0][0]
            q = self._band_codes(b, r0, r1, n_groups * gs).view(r1 - r0, n_groups, gs)
            return torch.addcmul(offsets[:, :, None], q.float(), scales[:, :, None]).view(r1 - r0, n_groups * gs)
        w = torch.empty(r1 - r0, n_groups, gs, dtype=torch.float32, device=self.scales.device)
        for b, idx in widths:
            assert idx is not None
            q = self._band_codes(b, r0, r1, idx.numel() * gs).view(r1 - r0, -1, gs)
            w[:, idx] = torch.addcmul(offsets[:, idx, None], q.float(), scales[:, idx, None])
        return w.view(r1 - r0, n_groups * gs)

    def _kept_blocks(self, r0: int, r1: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``group_sparse``: the stored blocks ``a:b`` of rows ``r0:r1`` and, for each, its row (from ``r0``) and
        group."""
        a, b = int(self.row_ptr[r0]), int(self.row_ptr[r1])
        counts = (self.row_ptr[r0 + 1 : r1 + 1] - self.row_ptr[r0:r1]).long()
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=counts.device), counts)
        return a, b, rows, self.group_idx[a:b].long()

    def _group_sparse_rows(self, r0: int, r1: int) -> torch.Tensor:
        gs, n_groups, bits = self.meta["group_size"], self.meta["n_groups"], self.meta["bits"]
        a, b, rows, groups = self._kept_blocks(r0, r1)
        w = torch.zeros(r1 - r0, n_groups, gs, dtype=torch.float32, device=self.scales.device)
        if b > a:
            vals = unpack_bits(self.codes[a:b], bits, gs).float()
            vals = vals * self.scales[a:b, None].float() + self.offsets[a:b, None].float()
            w[rows, groups] = vals
        return w.view(r1 - r0, n_groups * gs)

    def group_sparse_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``group_sparse`` layer as dense per-block tensors (calibration only, e.g. GQSA's BQPO): the decoded
        weight ``(out, n_g, G)`` with its padded columns, each block's scale and offset ``(out, n_g)`` fp32 (1 and 0
        where pruned) and the kept-block mask ``(out, n_g)``."""
        out, n_g = self.out_features, self.meta["n_groups"]
        _, _, rows, groups = self._kept_blocks(0, out)
        dev = self.scales.device
        keep = torch.zeros(out, n_g, dtype=torch.bool, device=dev)
        scale = torch.ones(out, n_g, device=dev)
        offset = torch.zeros(out, n_g, device=dev)
        keep[rows, groups] = True
        scale[rows, groups], offset[rows, groups] = self.scales.float(), self.offsets.float()
        return self._group_sparse_rows(0, out).view(out, n_g, -1), scale, offset, keep

    def _tiled_csl_rows(self, r0: int, r1: int) -> torch.Tensor:
        if r0 % TILE_ROWS:
            raise ValueError("tiled_csl bands start on a tile boundary")
        n_tc = -(-self.in_features // TILE_COLS)
        t0 = (r0 // TILE_ROWS) * n_tc
        t1 = min(-(-r1 // TILE_ROWS) * n_tc, self.tile_ptr.numel() - 1)
        a, b = int(self.tile_ptr[t0]), int(self.tile_ptr[t1])
        n_rows = (t1 - t0) // n_tc * TILE_ROWS
        w = torch.zeros(n_rows, n_tc * TILE_COLS, dtype=torch.float32, device=self.values.device)
        if b > a:
            counts = (self.tile_ptr[t0 + 1 : t1 + 1] - self.tile_ptr[t0:t1]).long()
            tiles = torch.repeat_interleave(torch.arange(t1 - t0, device=w.device), counts)
            locs = self.locs[a:b].long()
            rows = (tiles // n_tc) * TILE_ROWS + locs // TILE_COLS
            cols = (tiles % n_tc) * TILE_COLS + locs % TILE_COLS
            w[rows, cols] = self.values[a:b].float()
        return w[: r1 - r0]

    # -- matmul ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = kernel_for(self.fmt, x.device.type)
        if found is not None:
            return found[1](self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize one band of output rows at a time and multiply (plain PyTorch; what CI tests). A few rows
        (decode) of the "group" format skip the dequantized weight: see `_group_matvec`."""
        x2 = x.reshape(-1, self.in_features)
        if self.fmt == "group" and x2.shape[0] <= MATVEC_ROWS:
            y = self._group_matvec(x2)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            step = self.band_rows()
            for r0 in range(0, self.out_features, step):
                r1 = min(r0 + step, self.out_features)
                y[:, r0:r1] = x2 @ self.dequantize_rows(r0, r1, x2.dtype).T
        if getattr(self, "lr_l1", None) is not None:
            y += (x2 @ self.lr_l2.to(x2.dtype).T) @ self.lr_l1.to(x2.dtype).T
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def decode_kernels(model: nn.Module) -> dict[str, Any] | None:
    """How the model's compressed layers multiply a decode step's rows here: layers per path ("pairs" and
    "tinygemm": the 4-bit kernels' layouts; "triton-group": memfit's general kernel; "reference": plain PyTorch,
    on CPUs and where no kernel serves), plus "kernel_error" when the Triton kernel failed in this process (every
    layer then takes the reference). None for a model with no compressed layer. `--json` reports it as
    ``weight_kernels``."""
    from memfit import kernels

    counts: dict[str, Any] = {}
    for m in model.modules():
        if not isinstance(m, CompressedLinear):
            continue
        if m.kernel_layout is not None and not (_KERNEL_FAILED and m.kernel_layout == "pairs"):
            path = m.kernel_layout
        elif (m.fmt == "group" and m.scales.device.type == "cuda" and kernels.available() and not _KERNEL_FAILED
              and _group_buckets(m) is not None):
            path = "triton-group"
        else:
            path = "reference"
        counts[path] = counts.get(path, 0) + 1
    if not counts:
        return None
    if _KERNEL_FAILED:
        counts["kernel_error"] = _KERNEL_FAILED[0]
    return counts


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (tied tensors counted once): what the weights cost."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        if hasattr(t, "to_local"):  # a tensor-parallel shard (DTensor): count the bytes this rank holds
            t = t.to_local()
        seen[t.data_ptr() if t.numel() else id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# -- the CUDA kernel of the "group" format ---------------------------------------------------------------------------
def _group_buckets(layer: CompressedLinear) -> list[Any] | None:
    """The layer's buckets for `memfit.kernels.group_gemv` (its own code buffers, not copies, and each bucket's group
    indices as int32 on their device), or None when the kernel cannot serve this layer here (no Triton for this
    device, a group size it does not take). Decided and built once per layer and device, so a decode step reads no
    host state and looks nothing up. The indices (4 bytes per group) are derived from ``group_bits`` and are not
    counted in ``weight_bytes``."""
    from memfit import kernels
    from memfit.kernels.group_gemv import Bucket, supported

    if layer.repacked:  # the Triton kernel reads memfit's own bit stream only
        return None
    key = (layer.scales.device, layer.scales.data_ptr())
    cached = getattr(layer, "_kernel_buckets", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    buckets = None
    if kernels.available() and supported(layer.meta["group_size"], 1):
        bits = layer.group_bits.cpu()
        buckets = [Bucket(b, getattr(layer, f"codes_{b}"),
                          (bits == b).nonzero().flatten().to(torch.int32).to(layer.scales.device))
                   for b in sorted(set(bits.tolist()))]
    layer._kernel_buckets = (key, buckets)
    return buckets


_KERNEL_FAILED: list[str] = []  # the first error of the kernel in this process (then every call takes the reference)


@register_kernel("group", "cuda", "triton-group-gemv")
def group_kernel_forward(layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    """Decode-sized inputs through the Triton kernel (weights read once, packed); larger inputs (prefill) and
    layers it does not serve through the reference, which dequantizes a band at a time for the dense matmul. If the
    kernel cannot run here (a Triton that fails to compile it), the process says so once on stderr and keeps to the
    reference: slower, the same result."""
    from memfit.kernels.group_gemv import MAX_ROWS, group_gemv

    x2 = x.reshape(-1, layer.in_features)
    if layer.kernel_layout == "pairs":
        from memfit.kernels import int4_pairs

        if x2.dtype != torch.bfloat16 or not 0 < x2.shape[0] <= int4_pairs.MAX_ROWS or _KERNEL_FAILED:
            return layer.reference_forward(x)
        try:
            group = getattr(layer, "_tg_group", None)
            y = None if group is None else group.output(layer._tg_index, x, x2)
            if y is None:
                y = int4_pairs.gemv(x2, layer.codes_4, layer.scales, layer.offsets, layer.meta["group_size"])
        except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel falls back to the reference
            _kernel_failed(exc)
            return layer.reference_forward(x)
        return _side_terms(layer, x, x2, y)
    if layer.repacked:
        from memfit.kernels import tinygemm

        if x2.dtype != torch.bfloat16 or not 0 < x2.shape[0] <= tinygemm.MAX_ROWS:
            return layer.reference_forward(x)
        group = getattr(layer, "_tg_group", None)
        y = None if group is None else group.output(layer._tg_index, x, x2)
        if y is None:  # alone (or a group that no longer holds): its own (scale, zero) pairs, contiguous
            y = tinygemm.matmul(x2.contiguous(), layer.codes_4, layer.tg_scales_zeros.contiguous(),
                                layer.meta["group_size"])
        return _side_terms(layer, x, x2, y)
    buckets = _group_buckets(layer)  # built on the first call (a prefill): later decode steps read no host state
    if buckets is None or _KERNEL_FAILED or not 0 < x2.shape[0] <= MAX_ROWS:
        return layer.reference_forward(x)
    try:
        y = group_gemv(x2.contiguous(), buckets, layer.scales, layer.offsets, layer.meta["group_size"],
                       layer.out_features)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel falls back to the reference
        _kernel_failed(exc)
        return layer.reference_forward(x)
    return _side_terms(layer, x, x2, y)


def _kernel_failed(exc: Exception) -> None:
    import sys

    _KERNEL_FAILED.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"memfit: the Triton kernel for group-quantized weights failed here ({_KERNEL_FAILED[0]}); "
          "compressed layers use the reference matmul (slower, same result)", file=sys.stderr)


class Int4Group:
    """Repacked 4-bit layers that read the same input (an attention's q/k/v, an MLP's gate/up) and run as one int4
    matmul: their codes are row blocks of one buffer, and so are their scales and offsets ("pairs" layout) or their
    (scale, zero) pairs ("tinygemm": column blocks); each layer's buffers are views, so the bytes exist once. Both
    orders keep output rows apart (tinygemm's in whole 8-row tiles, listed row block by row block), so the
    concatenated codes are exactly the stacked weight's. The first member called with an input computes every
    member's output; the others, called with the same input tensor, take their part (one decode launch reads the
    three or two matrices instead of one launch each). Like the bf16 projection groups (memfit.adapters.transformers)
    it holds no tensor and only weak references to its layers: `canonical_layout`, a `.to()` or a replaced layer
    breaks the group, and each layer then runs alone."""

    def __init__(self, members: list[CompressedLinear]) -> None:
        import weakref

        self.layout = members[0].kernel_layout
        parts = self._parts()
        with torch.no_grad():
            stacked = {name: torch.cat([getattr(m, name) for m in members], dim) for name, dim in parts}
        offset = 0
        for i, m in enumerate(members):
            n = m.out_features
            for name, dim in parts:
                setattr(m, name, stacked[name].narrow(dim, offset, n))
            m._tg_group, m._tg_index = self, i
            offset += n
        self.members = [weakref.ref(m) for m in members]
        self.sizes = [m.out_features for m in members]
        self.group_size = int(members[0].meta["group_size"])
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = []

    def _parts(self) -> list[tuple[str, int]]:
        """The buffers stacked, with the dimension the output rows run along."""
        if self.layout == "tinygemm":
            return [("codes_4", 0), ("tg_scales_zeros", 1)]
        return [("codes_4", 0), ("scales", 0), ("offsets", 0)]

    def matrices(self) -> tuple[torch.Tensor, ...] | None:
        """The stacked buffers (`_parts`' order) as views over the members' shared storage; None when that no longer
        holds."""
        members = [r() for r in self.members]
        if any(m is None or m.kernel_layout != self.layout or getattr(m, "_tg_group", None) is not self
               for m in members):
            return None
        out = []
        for name, dim in self._parts():
            t0 = getattr(members[0], name)
            offset = 0
            for m in members:
                t = getattr(m, name)
                if (t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                        or t.data_ptr() != t0.data_ptr() + offset * t0.stride(dim) * t0.element_size()
                        or t.stride() != t0.stride()):
                    return None
                offset += t.shape[dim]
            size = list(t0.shape)
            size[dim] = offset
            out.append(t0.as_strided(size, t0.stride()))
        return tuple(out)

    def output(self, index: int, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s base term for input `x` (flattened `x2`), or None when the group no longer holds."""
        if self.input is not x or self.outputs[index] is None:
            stacked = self.matrices()
            if stacked is None:
                return None
            if self.layout == "tinygemm":
                from memfit.kernels import tinygemm

                y = tinygemm.matmul(x2.contiguous(), stacked[0], stacked[1], self.group_size)
            else:
                from memfit.kernels import int4_pairs

                y = int4_pairs.gemv(x2, *stacked, self.group_size)
            self.input, self.outputs = x, list(y.split(self.sizes, dim=-1))
        out = self.outputs[index]
        self.outputs[index] = None
        if all(o is None for o in self.outputs):
            self.input, self.outputs = None, []
        return out


def group_repacked(groups: list[list[nn.Module]]) -> int:
    """Stack each list of sibling layers that read one input into an `Int4Group` where every member is a repacked
    4-bit layer of the same input width, group size and device (idempotent). Returns how many groups hold."""
    count = 0
    for members in groups:
        if len(members) < 2 or not all(isinstance(m, CompressedLinear) and m.repacked for m in members):
            continue
        if len({m.kernel_layout for m in members}) != 1:  # type: ignore[union-attr]
            continue
        current = getattr(members[0], "_tg_group", None)
        if current is not None and current.matrices() is not None and all(
                getattr(m, "_tg_group", None) is current for m in members):
            count += 1
            continue
        first = members[0]
        assert isinstance(first, CompressedLinear)
        if any(m.in_features != first.in_features or m.meta["group_size"] != first.meta["group_size"]
               or m.codes_4.device != first.codes_4.device for m in members):  # type: ignore[union-attr]
            continue
        Int4Group(members)  # type: ignore[arg-type]
        count += 1
    return count


def _side_terms(layer: CompressedLinear, x: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Add the low-rank branch and the bias to a kernel's base term; shape it like ``x``."""
    if getattr(layer, "lr_l1", None) is not None:
        y += (x2 @ layer.lr_l2.to(x2.dtype).T) @ layer.lr_l1.to(x2.dtype).T
    if layer.bias is not None:
        y += layer.bias.to(y.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


INT4_KERNELS = ("pairs", "tinygemm", "none")


def int4_kernel_for(rows: int = 1) -> str:
    """The decode kernel uniform 4-bit layers take for ``rows`` sequences decoding together: ``MEMFIT_INT4_KERNEL``
    when set ("pairs", "tinygemm" or "none"), else "pairs" for one row (`memfit.kernels.int4_pairs`, the fastest at
    batch 1 on an H200, benchmarks/results/gemv_pairs_h200.jsonl) and "tinygemm" for several (torch's int4 matmul
    serves up to 64 rows in one launch; the pair kernel runs each row's programs separately)."""
    import os

    kernel = os.environ.get("MEMFIT_INT4_KERNEL", "")
    if kernel and kernel not in INT4_KERNELS:
        raise ConfigError(f"MEMFIT_INT4_KERNEL={kernel!r}: expected one of {', '.join(INT4_KERNELS)}")
    return kernel or ("pairs" if rows <= 1 else "tinygemm")


def repack_for_decode(model: nn.Module, dtype: torch.dtype, rows: int = 1) -> int:
    """Give every uniform 4-bit "group" layer of ``model`` the layout of the decode kernel `int4_kernel_for(rows)`
    picks (the fast backend calls this on CUDA; only for bf16 activations, both kernels' input type), converting
    layers held in the other one. Returns how many layers hold a kernel layout. "none" (or ``MEMFIT_TINYGEMM=0``)
    keeps memfit's general Triton kernel (for A/B runs). A layer the pair kernel cannot serve tries tinygemm."""
    import os

    kernel = int4_kernel_for(rows)
    if dtype != torch.bfloat16 or kernel == "none" or os.environ.get("MEMFIT_TINYGEMM", "1") == "0":
        return 0
    order = ("pairs", "tinygemm") if kernel == "pairs" else ("tinygemm",)
    count = 0
    for m in model.modules():
        if not isinstance(m, CompressedLinear):
            continue
        if m.kernel_layout is not None and m.kernel_layout != kernel:
            m.canonical_layout()  # held for the other kernel (an earlier call with another batch size)
        count += any(m.repack_for_kernel(kernel=k) for k in order)
    return count
