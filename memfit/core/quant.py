"""Group-wise KV-cache quantization with real bit-packed storage (shared by KIVI, GEAR and VidKV).

What it is
----------
One quantizer for every quantizing method: `quantize(x, bits, axis, group_size)` turns a KV tensor of shape
(B, H, T, d) into a `QuantizedTensor` whose integer codes really occupy `bits` bits each (packed into uint8),
plus one scale and one zero point per group (fp16 by default). `ResidualQuantBuffer` is the streaming store for
one layer's keys or values: quantized blocks plus a full-precision residual of the most recent tokens.
Pure PyTorch, device-agnostic (CPU and CUDA), no Python loops over tokens.

Scheme (KIVI, Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750)
-----------------------------------------------------------------------------------------------------------
* bits in {1, 2, 4, 8}: asymmetric min-max per group, L = 2^b - 1 levels above the minimum:
  ``scale = (max - min) / L``, ``code = clamp(round((x - min) / scale), 0, L)``, ``x_hat = code * scale + min``.
  The zero point stored is ``min`` itself (a float, as in KIVI), not an integer offset. 1 bit is the same
  formula with two levels {min, max}. Codes are computed against the *stored* (fp16-rounded) scale and min, so
  dequantization is consistent with what was rounded. A constant group (scale 0) decodes to exactly ``min``.
* bits = 1.58 (ternary): symmetric, levels {-1, 0, +1} * scale with the per-group **absmean** scale
  ``scale = mean|x|`` and ``code = clamp(round(x / scale), -1, 1)`` (BitNet-b1.58 rounding, i.e. threshold
  0.5*mean|x|). This is the VidKV *paper* rule; VidKV's released code (`vidkv_quant.unpack_and_dequant_vcache`)
  forgets to multiply by the scale at dequantization and decodes 1 bit as {0, scale} with sign codes - those
  quirks belong in the VidKV method file, not here. No zero point is stored for ternary (``zeros is None``).
* axis="token": per-channel quantization (KIVI keys). Each channel's G consecutive tokens form a group;
  T must be a multiple of G (the caller keeps the remainder in full precision, see `ResidualQuantBuffer`).
* axis="channel": per-token quantization (KIVI values). Each token's d channels are split into d/G groups of
  G consecutive channels; d must be a multiple of G.

Storage layout (what a Triton kernel reads; all tensors contiguous, row-major)
-------------------------------------------------------------------------------
``n_g`` = number of groups along the grouped axis, ``bpg = bytes_per_group(bits, G) = ceil(G / cpb)``
where ``cpb = codes_per_byte(bits)`` = 8 (1 bit), 5 (1.58), 4 (2), 2 (4), 1 (8).

* axis="token":   codes  uint8 (B, H, n_g*bpg, d)   n_g = T/G, packed along tokens, per (B, H, channel);
                  scales (B, H, n_g, d), zeros (B, H, n_g, d)   in `scale_dtype`.
                  Byte row ``g*bpg + j`` (column c) holds tokens ``g*G + j*cpb + k``, k = 0..cpb-1, of channel c.
* axis="channel": codes  uint8 (B, H, T, n_g*bpg)   n_g = d/G, packed along channels, per (B, H, token);
                  scales (B, H, T, n_g), zeros (B, H, T, n_g)   in `scale_dtype`.
                  Byte ``g*bpg + j`` of a token holds channels ``g*G + j*cpb + k``, k = 0..cpb-1.
* Inside a byte (powers of two): code k sits in bits ``[k*bits, (k+1)*bits)`` (first value in the low bits).
  Ternary: codes stored as {0, 1, 2} = {-1, 0, +1} + 1, byte = sum_k code_k * 3^k (max 242).
* Every group starts on a byte boundary; when G is not a multiple of cpb the tail of each group is padded with
  zero codes (only ternary with G % 5 != 0 in practice: G = 32 -> 7 bytes = 1.75 bits/value; G = 40, 80, 160 ->
  exactly 1.6 bits/value). `QuantizedTensor.nbytes()` counts the padding: it is the sum of
  ``numel * element_size`` of codes, scales and zeros, nothing estimated.
* Tokens are always dim 2, like the full-precision cache, so slicing and appending tokens is a slice/cat on
  dim 2 of codes, scales and zeros (for token axis at multiples of G tokens).

Limits: inputs must be finite and within `scale_dtype`'s range (fp16: |x| < 65504); pass
``scale_dtype=torch.bfloat16`` or ``torch.float32`` otherwise. Appending uses ``torch.cat`` (one copy of the
quantized part per append, as KIVI and HF's DynamicCache do), so held bytes are exactly what is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memfit.errors import ConfigError

__all__ = [
    "SUPPORTED_BITS",
    "QuantError",
    "QuantizedTensor",
    "ResidualQuantBuffer",
    "bytes_per_group",
    "codes_per_byte",
    "pack_codes",
    "quantize",
    "unpack_codes",
]

Axis = Literal["token", "channel"]
SUPPORTED_BITS: tuple[float, ...] = (1, 1.58, 2, 4, 8)
TERNARY_BITS = 1.58
_CODES_PER_BYTE = {1: 8, 1.58: 5, 2: 4, 4: 2, 8: 1}


class QuantError(ConfigError, ValueError):
    """Bad quantizer input (bits, axis, group size, shape, dtype). A ValueError and a memfit ConfigError."""


# ----------------------------------------------------------------------------------------------- validation


def _check_bits(bits: float) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in SUPPORTED_BITS:
        raise QuantError(f"bits must be one of {SUPPORTED_BITS} (1.58 = ternary), got {bits!r}")
    return TERNARY_BITS if bits == TERNARY_BITS else int(bits)


def _check_axis(axis: str) -> str:
    if axis not in ("token", "channel"):
        raise QuantError(
            f"axis must be 'token' (per-channel quantization, groups of G tokens: KIVI keys) or "
            f"'channel' (per-token quantization, groups of G channels: KIVI values), got {axis!r}"
        )
    return axis


def _check_group(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuantError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


def _check_kv(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise QuantError(f"{what} must be a torch.Tensor of shape (B, H, T, d), got {type(x).__name__}")
    if x.dim() != 4:
        raise QuantError(f"{what} must have shape (B, H, T, d) (4 dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise QuantError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_scale_dtype(scale_dtype: torch.dtype) -> torch.dtype:
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise QuantError(f"scale_dtype must be a floating-point torch.dtype, got {scale_dtype!r}")
    return scale_dtype


def codes_per_byte(bits: float) -> int:
    """How many codes one uint8 holds: 8 (1 bit), 5 (ternary), 4 (2 bits), 2 (4 bits), 1 (8 bits)."""
    return _CODES_PER_BYTE[_check_bits(bits)]


def bytes_per_group(bits: float, group_size: int) -> int:
    """Bytes of packed codes per group of `group_size` values (each group starts on a byte boundary)."""
    per = codes_per_byte(bits)
    return -(-_check_group(group_size) // per)


# -------------------------------------------------------------------------------------------------- packing


def _trit_weights(ndim_after: int, device: torch.device) -> torch.Tensor:
    """3^k for the k-th trit of a byte, uint8, shaped (5, 1, ..., 1) to broadcast over `ndim_after` dims."""
    w = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=device)
    return w.view(5, *([1] * ndim_after))


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def pack_codes(codes: torch.Tensor, bits: float, dim: int = -1) -> torch.Tensor:
    """Pack integer codes along `dim` into uint8: ceil(n / codes_per_byte(bits)) bytes (zero-padded tail).

    `codes` holds values in [0, 2^bits - 1] (ternary: {0, 1, 2}); any integer dtype. Value k of each byte sits in
    bits [k*bits, (k+1)*bits) (ternary: weight 3^k). Returns a contiguous uint8 tensor.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype == torch.bool or not _is_integer(codes):
        raise QuantError("codes must be an integer torch.Tensor")
    if codes.dim() == 0:
        raise QuantError("codes must have at least one dimension")
    top = 2 if bits == TERNARY_BITS else (1 << int(bits)) - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
        raise QuantError(f"{bits}-bit codes must lie in [0, {top}], got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    return _pack(codes.to(torch.uint8), bits, dim % codes.dim())


def _pack(codes: torch.Tensor, bits: float, dim: int) -> torch.Tensor:
    """pack_codes without validation (uint8 codes already in range, dim >= 0)."""
    per = _CODES_PER_BYTE[bits]
    n = codes.shape[dim]
    nbytes = -(-n // per)
    pad = nbytes * per - n
    if pad:
        pad_shape = list(codes.shape)
        pad_shape[dim] = pad
        codes = torch.cat([codes, codes.new_zeros(pad_shape)], dim)
    if per == 1:
        return codes.contiguous()
    c = codes.unflatten(dim, (nbytes, per))
    base = 3 if bits == TERNARY_BITS else 1 << int(bits)
    out = c.select(dim + 1, 0).contiguous()
    for k in range(1, per):  # at most 8 vectorized passes; codes never overlap, so uint8 never overflows
        out.add_(c.select(dim + 1, k) * (base**k))
    return out


def unpack_codes(packed: torch.Tensor, bits: float, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n` codes along `dim`, as uint8 (ternary codes in {0, 1, 2})."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise QuantError("packed must be a uint8 torch.Tensor (as returned by pack_codes)")
    if packed.dim() == 0:
        raise QuantError("packed must have at least one dimension")
    dim = dim % packed.dim()
    per = _CODES_PER_BYTE[bits]
    capacity = packed.shape[dim] * per
    if not 0 <= n <= capacity:
        raise QuantError(f"cannot unpack n={n} codes from {packed.shape[dim]} bytes of {bits}-bit codes "
                         f"(capacity {capacity})")
    if per == 1:
        return packed.narrow(dim, 0, n)
    p = packed.unsqueeze(dim + 1)
    ndim_after = packed.dim() - dim - 1
    if bits == TERNARY_BITS:
        codes = torch.div(p, _trit_weights(ndim_after, packed.device), rounding_mode="floor").remainder_(3)
    else:
        shifts = (torch.arange(per, device=packed.device, dtype=torch.uint8) * int(bits)).view(
            per, *([1] * ndim_after)
        )
        codes = torch.bitwise_right_shift(p, shifts).bitwise_and_((1 << int(bits)) - 1)
    return codes.flatten(dim, dim + 1).narrow(dim, 0, n)


# ---------------------------------------------------------------------------------------------- the tensor


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor whose storage holds exactly its own elements (so byte counts are honest)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass
class QuantizedTensor:
    """A (B, H, T, d) tensor stored as bit-packed group codes plus per-group scales and zero points.

    Layout (see module docstring): axis="token": codes (B, H, T/G*bpg, d), scales/zeros (B, H, T/G, d);
    axis="channel": codes (B, H, T, d/G*bpg), scales/zeros (B, H, T, d/G). `zeros` is None for ternary.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int, int, int]
    bits: float
    axis: str
    group_size: int
    dtype: torch.dtype = torch.float16  # dtype of the original tensor: default for dequantize()

    # ---- introspection
    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def num_groups(self) -> int:
        """Groups along the grouped axis (T/G for axis='token', d/G for axis='channel')."""
        return self.scales.shape[2] if self.axis == "token" else self.scales.shape[3]

    @property
    def bits_per_value(self) -> float:
        """Code bits actually used per value, padding included (scales/zeros not included)."""
        return 8 * bytes_per_group(self.bits, self.group_size) / self.group_size

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds."""
        return [self.codes, self.scales] + ([] if self.zeros is None else [self.zeros])

    def nbytes(self) -> int:
        """Bytes held: codes + scales + zeros (numel * element_size of each)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ---- dequantization
    def dequantize(self, dtype: torch.dtype | None = None, token_slice: slice | None = None) -> torch.Tensor:
        """Reconstruct (B, H, T', d). `token_slice` (step 1) dequantizes only the groups covering those tokens;
        the result equals ``self.dequantize(dtype)[:, :, token_slice]``."""
        dtype = self.dtype if dtype is None else dtype
        if token_slice is None:
            return self._dequant(self.codes, self.scales, self.zeros, self.shape[2]).to(dtype)
        if not isinstance(token_slice, slice):
            raise QuantError(f"token_slice must be a slice, got {type(token_slice).__name__}")
        start, stop, step = token_slice.indices(self.shape[2])
        if step != 1:
            raise QuantError(f"token_slice must have step 1, got step {step}")
        stop = max(start, stop)
        if self.axis == "channel":
            sl = slice(start, stop)
            zeros = None if self.zeros is None else self.zeros[:, :, sl]
            return self._dequant(self.codes[:, :, sl], self.scales[:, :, sl], zeros, stop - start).to(dtype)
        G = self.group_size
        g0, g1 = start // G, -(-stop // G)
        sub = self._token_groups(g0, g1)
        out = self._dequant(sub.codes, sub.scales, sub.zeros, (g1 - g0) * G)
        return out[:, :, start - g0 * G : stop - g0 * G].to(dtype)

    def _dequant(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, T: int) -> torch.Tensor:
        B, H, _, d = self.shape
        G = self.group_size
        bpg = bytes_per_group(self.bits, G)
        if self.axis == "token":
            ng = T // G
            c = unpack_codes(codes.reshape(B, H, ng, bpg, d), self.bits, G, dim=3)  # (B, H, ng, G, d)
            gdim = 3
        else:
            ng = d // G
            c = unpack_codes(codes.reshape(B, H, T, ng, bpg), self.bits, G, dim=4)  # (B, H, T, ng, G)
            gdim = 4
        s = scales.float().unsqueeze(gdim)
        if self.bits == TERNARY_BITS:
            out = (c.float() - 1.0) * s
        else:
            assert zeros is not None
            out = torch.addcmul(zeros.float().unsqueeze(gdim), c.float(), s)
        return out.reshape(B, H, T, d)

    # ---- slicing / concatenation
    def _token_groups(self, g0: int, g1: int) -> QuantizedTensor:
        bpg = bytes_per_group(self.bits, self.group_size)
        zeros = None if self.zeros is None else self.zeros[:, :, g0:g1]
        B, H, _, d = self.shape
        return QuantizedTensor(self.codes[:, :, g0 * bpg : g1 * bpg], self.scales[:, :, g0:g1], zeros,
                               (B, H, (g1 - g0) * self.group_size, d), self.bits, self.axis, self.group_size,
                               self.dtype)

    def slice_tokens(self, start: int, stop: int) -> QuantizedTensor:
        """Tokens [start, stop) as a QuantizedTensor of views (no copy). For axis='token' both ends must be
        multiples of G (or stop == T)."""
        T = self.shape[2]
        if not (0 <= start <= stop <= T):
            raise QuantError(f"token range [{start}, {stop}) out of bounds for {T} tokens")
        if self.axis == "token":
            G = self.group_size
            if start % G or (stop % G and stop != T):
                raise QuantError(f"axis='token' slices must start and stop on multiples of group_size={G}, "
                                 f"got [{start}, {stop}); use dequantize(token_slice=...) for arbitrary ranges")
            return self._token_groups(start // G, -(-stop // G))
        zeros = None if self.zeros is None else self.zeros[:, :, start:stop]
        B, H, _, d = self.shape
        return QuantizedTensor(self.codes[:, :, start:stop], self.scales[:, :, start:stop], zeros,
                               (B, H, stop - start, d), self.bits, self.axis, self.group_size, self.dtype)

    def cat(self, other: QuantizedTensor) -> QuantizedTensor:
        """Append `other`'s tokens after ours (no re-quantization of either)."""
        return QuantizedTensor.concat([self, other])

    @staticmethod
    def concat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Concatenate along tokens. All parts must share bits, axis, group size, B, H, d, dtypes and device."""
        if not parts:
            raise QuantError("concat needs at least one QuantizedTensor")
        a = parts[0]
        for p in parts[1:]:
            if (p.bits, p.axis, p.group_size) != (a.bits, a.axis, a.group_size):
                raise QuantError(f"cannot concatenate QuantizedTensors with different (bits, axis, group_size): "
                                 f"{(a.bits, a.axis, a.group_size)} vs {(p.bits, p.axis, p.group_size)}")
            if (p.shape[0], p.shape[1], p.shape[3]) != (a.shape[0], a.shape[1], a.shape[3]):
                raise QuantError(f"cannot concatenate QuantizedTensors of shapes {a.shape} and {p.shape}: "
                                 f"B, H and d must match")
            if p.scales.dtype != a.scales.dtype or p.device != a.device:
                raise QuantError("cannot concatenate QuantizedTensors with different scale dtypes or devices")
        if len(parts) == 1:
            return a
        zeros = None if a.zeros is None else torch.cat([p.zeros for p in parts], dim=2)  # type: ignore[misc]
        B, H, _, d = a.shape
        return QuantizedTensor(
            torch.cat([p.codes for p in parts], dim=2),
            torch.cat([p.scales for p in parts], dim=2),
            zeros,
            (B, H, sum(p.shape[2] for p in parts), d),
            a.bits,
            a.axis,
            a.group_size,
            a.dtype,
        )


# --------------------------------------------------------------------------------------------- quantize


def quantize(
    x: torch.Tensor,
    bits: float,
    axis: Axis = "token",
    group_size: int = 32,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantize a (B, H, T, d) tensor group-wise (see module docstring for scheme and layout).

    axis='token' needs T % group_size == 0, axis='channel' needs d % group_size == 0 (else QuantError,
    a ValueError). Arithmetic is done in fp32; scales and zero points are stored in `scale_dtype`.
    """
    bits = _check_bits(bits)
    axis = _check_axis(axis)
    G = _check_group(group_size)
    x = _check_kv(x)
    scale_dtype = _check_scale_dtype(scale_dtype)
    B, H, T, d = x.shape
    if axis == "token":
        if T % G:
            raise QuantError(f"axis='token' groups G={G} consecutive tokens, so T must be a multiple of {G}; "
                             f"got T={T} (keep the last {T % G} tokens in full precision)")
        ng, gdim = T // G, 3
        xf = x.reshape(B, H, ng, G, d).float()
    else:
        if d % G:
            raise QuantError(f"axis='channel' splits each token's d={d} channels into groups of G={G}, "
                             f"so d must be a multiple of {G}")
        ng, gdim = d // G, 4
        xf = x.reshape(B, H, T, ng, G).float()

    if bits == TERNARY_BITS:
        scales = xf.abs().mean(gdim).to(scale_dtype)
        s = scales.float().unsqueeze(gdim)
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = (xf / s).round_().clamp_(-1, 1).add_(1).to(torch.uint8)
        zeros = None
    else:
        levels = (1 << int(bits)) - 1
        mn, mx = torch.aminmax(xf, dim=gdim)
        scales = ((mx - mn) / levels).to(scale_dtype)
        zeros = mn.to(scale_dtype)
        s = scales.float().unsqueeze(gdim)
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = (xf - zeros.float().unsqueeze(gdim)).div_(s).round_().clamp_(0, levels).to(torch.uint8)
    packed = _pack(codes, bits, gdim).flatten(gdim - 1, gdim)
    return QuantizedTensor(
        codes=_owned(packed),
        scales=_owned(scales),
        zeros=None if zeros is None else _owned(zeros),
        shape=(B, H, T, d),
        bits=bits,
        axis=axis,
        group_size=G,
        dtype=x.dtype,
    )


# ------------------------------------------------------------------------------------ streaming residual


class ResidualQuantBuffer:
    """One layer's keys or values: quantized blocks + a full-precision residual of the newest tokens (KIVI).

    flush='block' (default for axis='token', KIVI keys): new tokens join the residual; whenever it holds
    `residual_length` (R) tokens or more, the oldest multiple of R tokens are quantized at once, so after every
    append ``residual_len == num_tokens % R`` (prefill of L tokens quantizes L - L mod R). R must be a multiple
    of group_size for axis='token'.
    flush='sliding' (default for axis='channel', KIVI values; channel axis only): the residual is a sliding
    window of exactly the ``min(R, num_tokens)`` newest tokens; older ones are quantized per token.

    The residual keeps the dtype of the appended tensors. `nbytes()` is the sum of numel * element_size over
    every tensor held (codes, scales, zeros, residual); each held tensor owns exactly its storage.
    """

    def __init__(
        self,
        bits: float,
        axis: Axis,
        group_size: int,
        residual_length: int,
        scale_dtype: torch.dtype = torch.float16,
        flush: Literal["block", "sliding"] | None = None,
    ) -> None:
        self.bits = _check_bits(bits)
        self.axis = _check_axis(axis)
        self.group_size = _check_group(group_size)
        self.scale_dtype = _check_scale_dtype(scale_dtype)
        if flush is None:
            flush = "block" if axis == "token" else "sliding"
        if flush not in ("block", "sliding"):
            raise QuantError(f"flush must be 'block' or 'sliding', got {flush!r}")
        R = residual_length
        if isinstance(R, bool) or not isinstance(R, int) or R < 0:
            raise QuantError(f"residual_length must be a non-negative int, got {R!r}")
        if flush == "sliding" and axis == "token":
            raise QuantError("flush='sliding' quantizes one token at a time, which needs axis='channel'; "
                             "axis='token' groups G tokens, use flush='block'")
        if flush == "block":
            if R < 1:
                raise QuantError("flush='block' needs residual_length >= 1")
            if axis == "token" and R % self.group_size:
                raise QuantError(f"axis='token' quantizes the residual in groups of {self.group_size} tokens, so "
                                 f"residual_length must be a multiple of group_size; got residual_length={R}")
        self.flush = flush
        self.residual_length = R
        self.quantized: QuantizedTensor | None = None
        self.residual: torch.Tensor | None = None

    @property
    def quantized_len(self) -> int:
        return 0 if self.quantized is None else self.quantized.num_tokens

    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.quantized_len + self.residual_len

    def append(self, x: torch.Tensor) -> None:
        """Add tokens x of shape (B, H, t, d), t >= 1 (prefill or decode)."""
        x = _check_kv(x)
        if self.residual is not None:
            r = self.residual
            if (x.shape[0], x.shape[1], x.shape[3]) != (r.shape[0], r.shape[1], r.shape[3]):
                raise QuantError(f"append: expected shape (B={r.shape[0]}, H={r.shape[1]}, t, d={r.shape[3]}), "
                                 f"got {tuple(x.shape)}")
            if x.dtype != r.dtype or x.device != r.device:
                raise QuantError(f"append: expected dtype {r.dtype} on {r.device}, got {x.dtype} on {x.device}")
        elif self.axis == "channel" and x.shape[3] % self.group_size:
            raise QuantError(f"axis='channel' splits each token's d={x.shape[3]} channels into groups of "
                             f"G={self.group_size}, so d must be a multiple of {self.group_size}")
        if x.shape[2] == 0:
            return
        seq = x if self.residual_len == 0 else torch.cat([self.residual, x], dim=2)  # type: ignore[list-item]
        total = seq.shape[2]
        R = self.residual_length
        nq = (total // R) * R if self.flush == "block" else max(0, total - R)
        if nq:
            q = quantize(seq[:, :, :nq], self.bits, self.axis, self.group_size, self.scale_dtype)  # type: ignore
            self.quantized = q if self.quantized is None else self.quantized.cat(q)
        rest = seq[:, :, nq:]
        # never alias the caller's tensor; never keep a view into a bigger buffer
        self.residual = rest.clone(memory_format=torch.contiguous_format) if seq is x else _owned(rest)

    def dequantize_all(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All tokens in order, (B, H, num_tokens, d): dequantized blocks then the residual."""
        if self.residual is None:
            raise QuantError("ResidualQuantBuffer is empty: append tokens before dequantizing")
        dtype = self.residual.dtype if dtype is None else dtype
        res = self.residual.to(dtype)
        if self.quantized is None:
            return res
        return torch.cat([self.quantized.dequantize(dtype), res], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (codes, scales, zeros, residual)."""
        out = [] if self.quantized is None else self.quantized.tensors()
        return out + ([] if self.residual is None else [self.residual])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
