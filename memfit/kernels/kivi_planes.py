"""KIVI codes in "plane" order: the layout the integer-dot decode kernel reads (`memfit.kernels._kivi_i8_kernel`).

Canonical layout (`memfit.core.quant`): key byte row j holds tokens j * CPB + k (k = 0..CPB-1) of each channel, at
bits k * BITS; a value byte holds channels j * CPB + k of one token. Plane layout (same bytes, CPB = 8 // BITS codes
per byte), by blocks of 16 * CPB tokens:
- keys (B, H, T / CPB, D): block n's 16 byte rows n * 16 + r hold tokens n * 16 * CPB + 16 * k + r at bits
  k * BITS ("plane" k). Taking one plane of a row block is one shift and one mask per four bytes, and gives the
  (16 tokens, D channels) int8 codes in the order the int8 tensor-core dot reads them;
- values (B, H, T / (16 * CPB), D, 16): block n holds, for channel d, the same 16 tokens per plane in the 16 bytes
  [n, d, :], so that a plane is a (D, 16) tile whose reduction axis (tokens) is contiguous, as the int8 dot needs.
T must be a multiple of 16 * CPB (the stores round their capacity up). Plain PyTorch: used at freeze / unfreeze
and by the PyTorch flush, and as the tests' way back to the canonical form.
"""

from __future__ import annotations

import torch

__all__ = ["block_tokens", "keys_from_planes", "keys_to_planes", "values_from_planes", "values_to_planes",
           "token_place"]


def block_tokens(bits: int) -> int:
    """Tokens per plane block (16 per plane, 8 // bits planes)."""
    return 16 * (8 // bits)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) bytes -> (..., n, CPB) codes (field k at bits k * bits)."""
    cpb = 8 // bits
    shifts = torch.arange(cpb, device=codes.device, dtype=torch.int32) * bits
    return (codes.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """codes (int32) with CPB fields along `dim` -> bytes (that dim removed)."""
    cpb = 8 // bits
    shape = [1] * codes.dim()
    shape[dim] = cpb
    shifts = (torch.arange(cpb, device=codes.device, dtype=torch.int32) * bits).view(shape)
    return (codes << shifts).sum(dim).to(torch.uint8)


def keys_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical key codes (B, H, T / CPB, D) -> plane order (same shape)."""
    b, h, rows, d = codes.shape
    cpb = 8 // bits
    t = rows * cpb
    if t % block_tokens(bits):
        raise ValueError(f"{t} tokens: plane blocks hold {block_tokens(bits)}")
    c = _unpack(codes, bits).permute(0, 1, 2, 4, 3).reshape(b, h, t, d)  # token order
    c = c.reshape(b, h, t // (16 * cpb), cpb, 16, d)  # (block, plane, row)
    return _pack(c, bits, 3).reshape(b, h, rows, d)


def keys_from_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `keys_to_planes`."""
    b, h, rows, d = codes.shape
    cpb = 8 // bits
    t = rows * cpb
    c = _unpack(codes.reshape(b, h, t // (16 * cpb), 16, d), bits)  # (B, H, n, 16, D, CPB)
    c = c.permute(0, 1, 2, 5, 3, 4).reshape(b, h, t // cpb, cpb, d)  # token = n*16*CPB + 16k + r = row*CPB + field
    return _pack(c, bits, 3)


def values_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical value codes (B, H, T, D / CPB) -> plane order (B, H, T / (16 * CPB), D, 16)."""
    b, h, t, nb = codes.shape
    cpb = 8 // bits
    if t % block_tokens(bits):
        raise ValueError(f"{t} tokens: plane blocks hold {block_tokens(bits)}")
    d = nb * cpb
    c = _unpack(codes, bits).reshape(b, h, t, d)
    c = c.reshape(b, h, t // (16 * cpb), cpb, 16, d).permute(0, 1, 2, 5, 4, 3)  # (n, D, r, plane)
    return _pack(c, bits, 5)


def values_from_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `values_to_planes`: (B, H, T / (16 * CPB), D, 16) -> (B, H, T, D / CPB)."""
    b, h, n, d, _ = codes.shape
    cpb = 8 // bits
    c = _unpack(codes, bits)  # (B, H, n, D, 16, CPB)
    c = c.permute(0, 1, 2, 5, 4, 3).reshape(b, h, n * 16 * cpb, d // cpb, cpb)
    return _pack(c, bits, 4)


def token_place(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plane row of keys, bit shift) of token indices t; the value byte is [t // (16 * CPB), d, t % 16] at the
    same shift."""
    cpb = 8 // bits
    row = (t // (16 * cpb)) * 16 + t % 16
    return row, ((t // 16) % cpb) * bits
